//! An open-loop HTTP/1.1 load generator: requests are scheduled at a fixed rate whatever the
//! server does, and each one's latency is measured from the time it was *meant* to be sent. A
//! stall of the server therefore delays the requests scheduled during it and they count with
//! their whole wait, instead of not being sent at all (no "coordinated omission", as in wrk2).
//!
//! A scheduler thread sleeps until each intended send time (`nanosleep` with a 1 µs timer slack:
//! tokio's timer wheel has a resolution of one millisecond, coarser than the 0.5 ms between two
//! requests at 2000 req/s) and queues that time. One task per keep-alive connection takes queued
//! sends in FIFO order, sends `GET`, reads the whole response and records the latency in an
//! HdrHistogram. When every connection is busy, a send waits in the queue, and the wait counts.
//!
//! The first `warmup` of the run is sent but not recorded. A request that fails or times out is
//! counted as an error, never retried; its connection is reopened for the next request.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Where requests go: an `http://` URL whose host is an IP address (no name resolution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    /// Path and query.
    pub path: String,
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("{url:?} is not a URL"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "{url:?}: only http:// URLs are supported"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("{url:?} has no host"))?;
        let ip: IpAddr = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("{url:?}: the host must be an IP address"))?;
        Ok(Target {
            addr: SocketAddr::new(ip, authority.port_u16().unwrap_or(80)),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// One open-loop run.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    /// Requests per second.
    pub rate: u32,
    /// How long requests are recorded, after the warm-up.
    pub duration: Duration,
    /// How long requests are sent before recording starts.
    pub warmup: Duration,
    /// Keep-alive connections, all opened before the first request.
    pub connections: usize,
    /// How long one request may take before it counts as an error.
    pub timeout: Duration,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50: us(histogram.value_at_quantile(0.5)),
            p90: us(histogram.value_at_quantile(0.9)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

/// What a run measured. Counts are of the recorded part (after the warm-up) unless said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rate: u32,
    pub connections: usize,
    pub duration_seconds: f64,
    /// Requests scheduled (every one was sent).
    pub sent: u64,
    /// Requests answered with a 2xx status.
    pub completed: u64,
    /// Requests that failed, timed out or were answered with another status.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Requests answered with a 2xx status during the whole run, warm-up included: what a
    /// server's CPU time over the whole run is divided by.
    pub completed_with_warmup: u64,
    /// From the intended send time to the last byte of the response, of the completed requests.
    pub latency_us: Percentiles,
    /// From the intended send time to a connection taking the request: the generator's own
    /// delay (its timer, its scheduling, or every connection being busy).
    pub send_lag_us: Percentiles,
}

/// One scheduled request.
struct Slot {
    intended: Instant,
    recorded: bool,
}

/// What the connection tasks record, shared between them.
struct Tally {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    completed_with_warmup: u64,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        // Nanoseconds, up to a minute, three significant digits.
        let histogram = || Histogram::new_with_bounds(1, 60_000_000_000, 3);
        Ok(Tally {
            latency: histogram()?,
            send_lag: histogram()?,
            completed: 0,
            errors: 0,
            first_error: None,
            completed_with_warmup: 0,
        })
    }

    fn record(&mut self, slot: &Slot, taken: Instant, done: Instant, outcome: anyhow::Result<()>) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let ok = outcome.is_ok();
        if ok {
            self.completed_with_warmup += 1;
        }
        if !slot.recorded {
            return;
        }
        self.send_lag
            .saturating_record(nanos(taken.saturating_duration_since(slot.intended)));
        match outcome {
            Ok(()) => {
                self.completed += 1;
                self.latency
                    .saturating_record(nanos(done.saturating_duration_since(slot.intended)));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the connection closes; a failure shows in the next request on it.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on `connection` (reopening it if it is gone) and reads the response.
async fn exchange(target: &Target, connection: &mut Option<Sender>) -> anyhow::Result<()> {
    let mut sender = match connection.take() {
        Some(sender) if !sender.is_closed() => sender,
        _ => connect(target).await?,
    };
    sender.ready().await?;
    let request = Request::get(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    *connection = Some(sender);
    if !status.is_success() {
        bail!("answered {status}");
    }
    Ok(())
}

type Queue = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Slot>>>;

/// One connection's task: takes the next queued request until the schedule ends.
async fn connection_task(
    target: Arc<Target>,
    mut connection: Option<Sender>,
    queue: Queue,
    tally: Arc<Mutex<Tally>>,
    timeout: Duration,
) {
    loop {
        // tokio's mutex is fair: idle tasks take requests in the order they became idle.
        let Some(slot) = queue.lock().await.recv().await else {
            return;
        };
        let taken = Instant::now();
        let outcome = match tokio::time::timeout(timeout, exchange(&target, &mut connection)).await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow!("no response within {timeout:?}")),
        };
        let done = Instant::now();
        tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&slot, taken, done, outcome);
    }
}

/// Queues one slot per `1/rate` from `start` for `warmup + duration`, each at its time.
fn schedule(
    start: Instant,
    rate: u32,
    warmup: Duration,
    duration: Duration,
    queue: mpsc::UnboundedSender<Slot>,
) {
    // SAFETY: PR_SET_TIMERSLACK changes only this thread's timer slack; no pointers involved.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let count = (warmup + duration).as_nanos() * u128::from(rate) / 1_000_000_000;
    for i in 0..count {
        let offset = Duration::from_nanos((i * 1_000_000_000 / u128::from(rate)) as u64);
        let intended = start + offset;
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let slot = Slot {
            intended,
            recorded: offset >= warmup,
        };
        if queue.send(slot).is_err() {
            return;
        }
    }
}

/// Runs the schedule of `config` against its target.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    ensure!(config.rate > 0, "the rate must be positive");
    ensure!(config.connections > 0, "at least one connection is needed");
    ensure!(!config.duration.is_zero(), "the duration must be positive");
    let target = Arc::new(config.target.clone());
    let mut connections = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        connections.push(connect(&target).await?);
    }
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let queue: Queue = Arc::new(tokio::sync::Mutex::new(queue_rx));
    let tally = Arc::new(Mutex::new(Tally::new()?));
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|sender| {
            tokio::spawn(connection_task(
                target.clone(),
                Some(sender),
                queue.clone(),
                tally.clone(),
                config.timeout,
            ))
        })
        .collect();
    let (rate, warmup, duration) = (config.rate, config.warmup, config.duration);
    let start = Instant::now();
    let scheduler = std::thread::Builder::new()
        .name("openloop-schedule".to_owned())
        .spawn(move || schedule(start, rate, warmup, duration, queue_tx))
        .context("starting the scheduler thread")?;
    for task in tasks {
        task.await.context("a connection task panicked")?;
    }
    // The tasks end once the scheduler has dropped its sender, so this does not block.
    scheduler
        .join()
        .map_err(|_| anyhow!("the scheduler thread panicked"))?;

    let tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(Report {
        rate: config.rate,
        connections: config.connections,
        duration_seconds: config.duration.as_secs_f64(),
        sent: tally.completed + tally.errors,
        completed: tally.completed,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        completed_with_warmup: tally.completed_with_warmup,
        latency_us: Percentiles::of(&tally.latency),
        send_lag_us: Percentiles::of(&tally.send_lag),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::Response;
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;

    #[test]
    fn targets() {
        let t: Target = "http://10.96.91.1/".parse().unwrap();
        assert_eq!(t.addr, "10.96.91.1:80".parse().unwrap());
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("10.96.91.1", "/"));
        let t: Target = "http://[::1]:8080/a?b=c".parse().unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(t.path, "/a?b=c");
        assert!("https://10.0.0.1/".parse::<Target>().is_err());
        assert!("http://example.com/".parse::<Target>().is_err());
    }

    /// A loopback server answering 200, or 503 to every third request.
    async fn serve(listener: tokio::net::TcpListener, fail_every_third: bool) {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let status = if fail_every_third && n % 3 == 2 {
                        503
                    } else {
                        200
                    };
                    async move {
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"ok\n")))
                    }
                });
                let _ = server::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn run_against(fail_every_third: bool) -> Report {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, fail_every_third));
        run(&Config {
            target: format!("http://{addr}/").parse().unwrap(),
            rate: 500,
            duration: Duration::from_millis(400),
            warmup: Duration::from_millis(100),
            connections: 4,
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn sends_the_scheduled_requests() {
        let report = run_against(false).await;
        assert_eq!(report.sent, 200);
        assert_eq!((report.completed, report.errors), (200, 0));
        assert_eq!(report.completed_with_warmup, 250);
        assert!(report.latency_us.p50 > 0.0);
        assert!(report.latency_us.p50 <= report.latency_us.p99);
        assert!(report.latency_us.p99 <= report.latency_us.max);
    }

    #[tokio::test]
    async fn counts_bad_statuses_as_errors() {
        let report = run_against(true).await;
        assert_eq!(report.sent, 200);
        assert!(report.errors > 0);
        assert_eq!(report.completed + report.errors, 200);
        assert!(report.first_error.unwrap().contains("503"));
    }
}

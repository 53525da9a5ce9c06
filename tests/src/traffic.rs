//! Steady client traffic from inside a pod: a few workers, each sending one HTTP/1.1 request
//! after another on its own kept-alive connection, as an application would, through the pod's
//! sidecar. Every outcome is recorded with its time: who answered (`x-served-by`) or why it
//! failed. A connection the peer closed between requests is replaced, as clients do; a request
//! that was sent and got no 200 (or no answer in time) is a failure.
//!
//! Tests use it to assert that no request fails while endpoints die, and where requests go; the
//! failover benchmark uses it to count what is lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use crate::netns;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request's outcome: who answered it, or why it failed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request was sent.
    pub sent: Instant,
    /// When its outcome was known.
    pub at: Instant,
    pub result: Result<String, String>,
}

impl Outcome {
    pub fn served_by(&self) -> Option<&str> {
        self.result.as_deref().ok()
    }
}

/// Where the traffic goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The client pod's network namespace.
    pub from: PathBuf,
    /// A service VIP and port.
    pub to: SocketAddr,
    pub host: String,
    pub path: String,
}

/// Workers sending requests until told to stop.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    seen: Arc<Mutex<Vec<Outcome>>>,
}

struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(target: &Target) -> anyhow::Result<Connection> {
    let stream = netns::connect_from(&target.from, target.to).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Connection { sender, task })
}

async fn get(connection: &mut Connection, target: &Target) -> anyhow::Result<String> {
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.host.as_str())
        .body(Empty::new())?;
    let exchange = async {
        connection.sender.ready().await?;
        let response = connection.sender.send_request(request).await?;
        let status = response.status();
        let served_by = response
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let error = response
            .headers()
            .get("keel-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        response.into_body().collect().await?;
        if status != http::StatusCode::OK {
            bail!("status {status} {error}");
        }
        anyhow::Ok(served_by)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no answer within {REQUEST_TIMEOUT:?}"))?
}

fn push(log: &Mutex<Vec<Outcome>>, sent: Instant, result: Result<String, String>) {
    if let Ok(mut log) = log.lock() {
        log.push(Outcome {
            sent,
            at: Instant::now(),
            result,
        });
    }
}

impl Traffic {
    /// Starts `workers` workers, each pausing `pause` between requests.
    pub fn start(target: Target, workers: usize, pause: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|_| {
                let (stop, seen, target) = (stop.clone(), seen.clone(), target.clone());
                tokio::spawn(async move {
                    let mut connection: Option<Connection> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let reusable = match connection.take() {
                            Some(mut c) => c.sender.ready().await.is_ok().then_some(c),
                            None => None,
                        };
                        let mut c = match reusable {
                            Some(c) => c,
                            None => match connect(&target).await {
                                Ok(c) => c,
                                Err(e) => {
                                    push(&seen, sent, Err(format!("connect: {e:#}")));
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                }
                            },
                        };
                        match get(&mut c, &target).await {
                            Ok(who) => {
                                push(&seen, sent, Ok(who));
                                connection = Some(c);
                            }
                            Err(e) => push(&seen, sent, Err(format!("{e:#}"))),
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            workers,
            seen,
        }
    }

    /// Every outcome so far, in the order they were recorded.
    pub fn snapshot(&self) -> Vec<Outcome> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map(|v| v.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the last `n` outcomes all satisfy `pred`.
    pub async fn wait_for_last(
        &self,
        n: usize,
        within: Duration,
        what: &str,
        pred: impl Fn(&Outcome) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.snapshot();
            if seen.len() >= n && seen[seen.len() - n..].iter().all(&pred) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail: Vec<_> = seen.iter().rev().take(10).map(|o| &o.result).collect();
                bail!("traffic never reached: {what}; last outcomes (newest first): {tail:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` more outcomes have been recorded.
    pub async fn wait_for_more(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let target = self.len() + n;
        let deadline = Instant::now() + within;
        while self.len() < target {
            if Instant::now() >= deadline {
                bail!("fewer than {n} requests completed within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the workers and returns every outcome.
    pub async fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in &mut self.workers {
            let _ = worker.await;
        }
        self.snapshot()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}

/// Outcomes per answering endpoint, failures under "FAILED".
pub fn count(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        let key = match &outcome.result {
            Ok(who) => who.clone(),
            Err(_) => "FAILED".to_owned(),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// The failures among `outcomes`.
pub fn failures(outcomes: &[Outcome]) -> Vec<&str> {
    outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(String::as_str))
        .collect()
}

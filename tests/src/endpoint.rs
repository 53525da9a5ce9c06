//! A service endpoint whose faults the test chooses: an HTTP server (HTTP/1.1 and HTTP/2) that
//! answers every request with `x-served-by: <name>` and `x-seen: <what arrived>` (method,
//! target, `Host`, `x-test` and the body, up to 256 bytes), or fails, or hangs, as told. It
//! runs as its own process in a pod (`keel-test-endpoint`, or the failover benchmark
//! re-executing itself) so that a test can kill it for real.
//!
//! Control, on the same port, answered whatever the mode:
//! - `GET /_keel/mode/<mode>` sets the mode: `ok`, `fail` (503), `flaky` (503 half the time, at
//!   random), `hang` (never answers), `delay-<ms>` (answers after a delay);
//! - `GET /_keel/stats` answers `{"name", "served", "failed"}`: requests answered 200 and 503.
//!
//! It must never answer a control request with anything but its own state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How the endpoint answers requests that are not control requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Fail,
    Flaky,
    Hang,
    Delay(Duration),
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "ok" => Mode::Ok,
            "fail" => Mode::Fail,
            "flaky" => Mode::Flaky,
            "hang" => Mode::Hang,
            _ => Mode::Delay(Duration::from_millis(
                s.strip_prefix("delay-")?.parse().ok()?,
            )),
        })
    }

    pub fn name(self) -> String {
        match self {
            Mode::Ok => "ok".into(),
            Mode::Fail => "fail".into(),
            Mode::Flaky => "flaky".into(),
            Mode::Hang => "hang".into(),
            Mode::Delay(d) => format!("delay-{}", d.as_millis()),
        }
    }
}

/// What an endpoint reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub name: String,
    pub served: u64,
    pub failed: u64,
}

struct State {
    name: String,
    mode: AtomicU8,
    delay_ms: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
}

impl State {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            1 => Mode::Fail,
            2 => Mode::Flaky,
            3 => Mode::Hang,
            4 => Mode::Delay(Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))),
            _ => Mode::Ok,
        }
    }

    fn set(&self, mode: Mode) {
        let code = match mode {
            Mode::Ok => 0,
            Mode::Fail => 1,
            Mode::Flaky => 2,
            Mode::Hang => 3,
            Mode::Delay(d) => {
                self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
                4
            }
        };
        self.mode.store(code, Ordering::Relaxed);
    }
}

/// The longest request body `x-seen` shows.
const SEEN_BODY: usize = 256;

fn respond(status: u16, name: &str, body: String) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = http::HeaderValue::from_str(name) {
        response.headers_mut().insert("x-served-by", value);
    }
    response
}

async fn answer(
    state: Arc<State>,
    request: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    if let Some(mode) = path.strip_prefix("/_keel/mode/") {
        return match Mode::parse(mode) {
            Some(mode) => {
                state.set(mode);
                respond(200, &state.name, mode.name())
            }
            None => respond(400, &state.name, format!("unknown mode {mode:?}")),
        };
    }
    if path == "/_keel/stats" {
        let body = serde_json::json!({
            "name": state.name,
            "served": state.served.load(Ordering::Relaxed),
            "failed": state.failed.load(Ordering::Relaxed),
        });
        return respond(200, &state.name, body.to_string());
    }
    // What arrived, for tests of what the proxies forward: the method and target, `Host`,
    // `x-test`, and the body (read whole, as a real application would before answering; shown
    // up to SEEN_BODY bytes, else by its length).
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            if body.len() <= SEEN_BODY {
                String::from_utf8_lossy(&body).into_owned()
            } else {
                format!("<{} bytes>", body.len())
            }
        }
        Err(e) => format!("<unreadable: {e}>"),
    };
    let field = |name| {
        parts
            .headers
            .get(name)
            .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()))
    };
    let seen = format!(
        "{} {} host={} x-test={} body={body}",
        parts.method,
        parts.uri,
        field(http::header::HOST),
        field(http::header::HeaderName::from_static("x-test")),
    );
    let fail = match state.mode() {
        Mode::Ok => false,
        Mode::Fail => true,
        Mode::Flaky => rand::random::<bool>(),
        Mode::Hang => {
            std::future::pending::<()>().await;
            true
        }
        Mode::Delay(d) => {
            tokio::time::sleep(d).await;
            false
        }
    };
    let mut response = if fail {
        state.failed.fetch_add(1, Ordering::Relaxed);
        respond(503, &state.name, "failing as told\n".into())
    } else {
        state.served.fetch_add(1, Ordering::Relaxed);
        respond(200, &state.name, format!("{}\n", state.name))
    };
    if let Ok(value) = http::HeaderValue::from_str(&seen) {
        response.headers_mut().insert("x-seen", value);
    }
    response
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, name: String, mode: Mode) {
    let state = Arc::new(State {
        name,
        mode: AtomicU8::new(0),
        delay_ms: AtomicU64::new(0),
        served: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    state.set(mode);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(state, request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The command line of an endpoint process: `--listen <addr> --name <name> [--mode <mode>]`.
pub fn run_from_args(args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut listen: Option<SocketAddr> = None;
    let mut name = None;
    let mut mode = Mode::Ok;
    let mut args = args;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().context("--listen")?),
            "--name" => name = Some(value),
            "--mode" => mode = Mode::parse(&value).with_context(|| format!("mode {value:?}"))?,
            other => bail!("unknown flag {other}"),
        }
    }
    let listen = listen.context("--listen is required")?;
    let name = name.context("--name is required")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        serve(listener, name, mode).await;
        anyhow::Ok(())
    })
}

/// Talks to endpoints from the host (through their sidecar's inbound side when they have one).
#[derive(Clone)]
pub struct Control {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }
}

impl Control {
    async fn get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let uri: http::Uri = format!("http://{addr}{path}").parse()?;
        let request = http::Request::get(uri).body(Empty::new())?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .with_context(|| format!("GET {path} from {addr}: no answer within 5s"))?
    }

    /// Sets an endpoint's mode.
    pub async fn set_mode(&self, addr: SocketAddr, mode: Mode) -> anyhow::Result<()> {
        let (status, body) = self
            .get(addr, &format!("/_keel/mode/{}", mode.name()))
            .await?;
        if status != 200 {
            bail!(
                "setting {addr} to {}: {status} {}",
                mode.name(),
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// An endpoint's counts.
    pub async fn stats(&self, addr: SocketAddr) -> anyhow::Result<Stats> {
        let (status, body) = self.get(addr, "/_keel/stats").await?;
        if status != 200 {
            bail!(
                "stats of {addr}: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        Ok(Stats {
            name: v["name"].as_str().unwrap_or_default().to_owned(),
            served: v["served"].as_u64().unwrap_or(0),
            failed: v["failed"].as_u64().unwrap_or(0),
        })
    }

    /// Waits until the endpoint at `addr` answers its stats (it is up and reachable).
    pub async fn wait_up(&self, addr: SocketAddr, within: Duration) -> anyhow::Result<Stats> {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.stats(addr).await {
                Ok(stats) => return Ok(stats),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(e.context(format!("endpoint {addr} not up after {within:?}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            Mode::Ok,
            Mode::Fail,
            Mode::Flaky,
            Mode::Hang,
            Mode::Delay(Duration::from_millis(250)),
        ] {
            assert_eq!(Mode::parse(&mode.name()), Some(mode));
        }
        assert_eq!(Mode::parse("delay-x"), None);
        assert_eq!(Mode::parse("sometimes"), None);
    }

    #[tokio::test]
    async fn an_endpoint_answers_as_told() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(serve(listener, "e1".into(), Mode::Ok));
        let control = Control::default();
        let stats = control.wait_up(addr, Duration::from_secs(5)).await?;
        assert_eq!(stats.name, "e1");
        let (status, _) = control.get(addr, "/x").await?;
        assert_eq!(status, 200);
        control.set_mode(addr, Mode::Fail).await?;
        let (status, _) = control.get(addr, "/x").await?;
        assert_eq!(status, 503);
        let stats = control.stats(addr).await?;
        assert_eq!((stats.served, stats.failed), (1, 1));
        Ok(())
    }
}

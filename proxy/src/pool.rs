//! Connections to upstreams (endpoints, or the local app), pooled per address.
//!
//! HTTP/2 upstreams get one multiplexed connection per address, shared by every request (the
//! sidecar-to-sidecar hop: a busy pair of pods shares one connection). HTTP/1 upstreams get a
//! pool of idle keep-alive connections per address; a connection goes back to the pool when its
//! response body has been read to the end, and is dropped otherwise. Bodies are streamed, never
//! buffered whole.
//!
//! This module must never send a request on a connection that is not ready for it, and never
//! report a failure as a connect failure (safe to retry elsewhere) once the request was sent.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustc_hash::FxBuildHasher;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the proxy forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn incoming(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed_unsync()
}

/// The most idle HTTP/1 connections kept per upstream address (Envoy's default circuit breaker
/// allows as many open). A lower limit closes connections that the next burst reopens: with 64,
/// an HTTP/2 client's 160 concurrent streams through one hop closed and reopened 96 upstream
/// connections per round of requests, and throughput fell to a third.
const MAX_IDLE_PER_ADDR: usize = 1024;
/// An idle HTTP/1 connection unused for this long is closed (when a connection to the same
/// address is next returned), so that a burst's connections do not stay open for ever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the request never reached the upstream, so it can go elsewhere unchanged.
    pub fn before_request(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. })
    }
}

/// Opens a TCP connection with a deadline, with Nagle off.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
    }
}

type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// An idle HTTP/1 connection and when it became idle. Per address, the most recently returned
/// is taken first (its buffers are warm, and the oldest age out).
struct Idle {
    since: Instant,
    sender: http1::SendRequest<Body>,
}

/// Pooled upstream connections.
#[derive(Default)]
pub struct Upstreams {
    // FxHash: looked up twice per request (take, give back); keys are endpoint addresses.
    idle_h1: Mutex<HashMap<SocketAddr, VecDeque<Idle>, FxBuildHasher>>,
    h2: Mutex<HashMap<SocketAddr, H2Slot, FxBuildHasher>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upstreams {
    pub fn new() -> Arc<Upstreams> {
        Arc::new(Upstreams::default())
    }

    /// Sends an HTTP/1.1 request to `addr` on an idle pooled connection or a new one. The
    /// request's URI must be in origin form with its `Host` header set.
    pub async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut sender = loop {
            let idle = lock(&self.idle_h1)
                .get_mut(&addr)
                .and_then(VecDeque::pop_back);
            match idle {
                Some(Idle { mut sender, .. }) => {
                    if !sender.is_closed() && sender.ready().await.is_ok() {
                        break sender;
                    }
                }
                None => {
                    let stream = connect(addr, connect_timeout).await?;
                    let (sender, conn) = http1::Builder::new()
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|source| UpstreamError::Handshake { addr, source })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.with_upgrades().await {
                            tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
                        }
                    });
                    break sender;
                }
            }
        };
        let response = sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Request { addr, source })?;
        let keep_alive = !connection_close(response.headers());
        let (parts, body) = response.into_parts();
        let mut body = ReturnToPool {
            inner: body,
            sender: keep_alive.then_some(sender),
            pool: Arc::downgrade(self),
            addr,
        };
        if body.inner.is_end_stream() {
            // No body to read (204, 304, HEAD, content-length: 0): nobody will poll it.
            body.release();
        }
        Ok(Response::from_parts(
            parts,
            body.map_err(BoxError::from).boxed_unsync(),
        ))
    }

    /// Sends a request on the multiplexed HTTP/2 connection to `addr`, opening it if needed.
    /// The request's URI carries the authority the upstream should see.
    pub async fn send_h2(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let slot = lock(&self.h2).entry(addr).or_default().clone();
        let mut sender = {
            let mut held = slot.lock().await;
            match held.as_ref() {
                Some(sender) if !sender.is_closed() => sender.clone(),
                _ => {
                    let stream = connect(addr, connect_timeout).await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .max_header_list_size(crate::serve::MAX_HEAD_BYTES as u32 + 4096)
                        .handshake(TokioIo::new(stream))
                        .await
                        .map_err(|source| UpstreamError::Handshake { addr, source })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    *held = Some(sender.clone());
                    sender
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Request { addr, source })?;
        Ok(response.map(incoming))
    }

    fn give_back(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle_h1);
        let list = idle.entry(addr).or_default();
        while list
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push_back(Idle { since: now, sender });
        }
    }

    /// Open HTTP/2 connections and idle HTTP/1 connections, for status.
    pub fn counts(&self) -> (usize, usize) {
        let idle = lock(&self.idle_h1).values().map(VecDeque::len).sum();
        let h2 = lock(&self.h2).len();
        (h2, idle)
    }
}

fn connection_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// An HTTP/1 response body that returns its connection to the pool once read to the end.
struct ReturnToPool {
    inner: Incoming,
    sender: Option<http1::SendRequest<Body>>,
    pool: Weak<Upstreams>,
    addr: SocketAddr,
}

impl HttpBody for ReturnToPool {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            // A reader that trusts `is_end_stream` (hyper's server does) stops polling after the
            // last frame and never sees `None`: release as soon as the body is complete.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl ReturnToPool {
    fn release(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.give_back(self.addr, sender);
        }
    }
}

/// Headers that describe one connection, not the message; never forwarded (RFC 9110 §7.6.1),
/// and forbidden in HTTP/2.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the few names present decides, where
    // removing each name in turn would hash every one of them.
    if !headers.keys().any(is_hop_by_hop_or_te) {
        return;
    }
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    // HTTP/2 allows TE only as "trailers" (gRPC needs it).
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// Whether `name` is one of the headers [`strip_hop_by_hop`] may remove (the connection-specific
/// headers and TE; headers named by `Connection` are only removed when it is present).
fn is_hop_by_hop_or_te(name: &header::HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_without_hop_by_hop_ones_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "svc".parse().expect("v"));
        h.insert("x-app", "kept".parse().expect("v"));
        h.append("x-app", "twice".parse().expect("v"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert("proxy-connection", "keep-alive".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-private".parse().expect("v"),
        );
        h.insert("x-private", "1".parse().expect("v"));
        h.insert("keep-alive", "timeout=5".parse().expect("v"));
        h.insert(header::TE, "trailers".parse().expect("v"));
        h.insert("x-app", "kept".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(h.get("x-app").is_some());
        h.insert(header::TE, "gzip".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none());
    }

    #[tokio::test]
    async fn http1_connections_are_reused_after_the_body_is_read() {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"hello"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let pool = Upstreams::new();
        for _ in 0..5 {
            let req = Request::builder()
                .uri("/")
                .header(header::HOST, "test")
                .body(empty())
                .expect("request");
            let resp = pool
                .send_h1(addr, Duration::from_secs(1), req)
                .await
                .expect("response");
            // Read as hyper's server does: stop at `is_end_stream`, never waiting for `None`.
            let mut body = resp.into_body();
            let mut read = Vec::new();
            while !body.is_end_stream() {
                let frame = body.frame().await.expect("frame").expect("data");
                read.extend_from_slice(&frame.into_data().expect("data"));
            }
            assert_eq!(&read[..], b"hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_burst_keeps_its_connections_for_the_next_one() {
        use hyper::service::service_fn;
        const BURST: usize = 100;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Every request waits until the whole burst is in flight, so each needs a connection.
        let barrier = Arc::new(tokio::sync::Barrier::new(BURST));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let barrier = barrier.clone();
                        async move {
                            barrier.wait().await;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"hello"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let pool = Upstreams::new();
        for _ in 0..2 {
            let requests = (0..BURST).map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let req = Request::builder()
                        .uri("/")
                        .header(header::HOST, "test")
                        .body(empty())
                        .expect("request");
                    let resp = pool
                        .send_h1(addr, Duration::from_secs(5), req)
                        .await
                        .expect("response");
                    resp.into_body().collect().await.expect("body");
                })
            });
            for request in requests.collect::<Vec<_>>() {
                request.await.expect("request task");
            }
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            BURST,
            "the second burst reused the first one's connections"
        );
        assert_eq!(pool.counts().1, BURST);
    }
}

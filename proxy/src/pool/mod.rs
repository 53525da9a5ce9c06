//! Connections to upstreams (endpoints, or the local app), pooled per address.
//!
//! HTTP/2 upstreams get one multiplexed connection per address, shared by every request (the
//! sidecar-to-sidecar hop: a busy pair of pods shares one connection). HTTP/1 upstreams get a
//! pool of idle keep-alive connections per address; a connection goes back to the pool when its
//! response body has been read to the end, and is dropped otherwise. Bodies are streamed, never
//! buffered whole. Plaintext HTTP/1 goes through [`http1`] and HTTP/2 through [`http2`], both
//! driven by the request's own task; upgrades and HTTP/1 over mTLS through hyper's client, a
//! task per connection.
//!
//! A caller may pass [`Connect`] options: the idle timeout closes a connection that carried no
//! request for that long (an HTTP/1 connection at most the pool's own limit, by default
//! [`DEFAULT_H1_POOL_IDLE_TIMEOUT`]), and an [`Admission`] (the service's circuit breakers) is
//! asked before a connection is opened and before a request waits for one; a refusal is
//! [`UpstreamError::Overflow`], returned at once.
//!
//! Connections to another sidecar that expects mTLS ([`Connect::peer`]) are TLS from the first
//! byte, checked against the identity the endpoint must prove (see [`crate::tls`]), and pooled per
//! address *and* identity, so a connection is never reused for a peer it was not verified for.
//!
//! This module must never send a request on a connection that is not ready for it, never report
//! a failure as a connect failure (safe to retry elsewhere) once the request was sent, and never
//! fall back to plaintext for a peer that expects mTLS.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as hyper_http1;
use hyper_util::rt::TokioIo;
use keel_proto::spiffe::SpiffeId;
use rustc_hash::FxBuildHasher;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::tls::{Carried, MeshConnectError, MeshTls};

pub mod http1;
pub mod http2;

/// A connection to an upstream: plain TCP, or mTLS to another sidecar.
pub type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Who an upstream connection goes to: an address, and the identity to expect there when the
/// connection is mTLS.
pub type PeerKey = (SocketAddr, Option<Arc<SpiffeId>>);

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
/// An HTTP/2 connection that carried nothing for this long is closed, unless the caller set an
/// idle timeout of its own (a service's `idleTimeout`).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an HTTP/1 connection may wait in the pool for its next request, by default (the
/// sidecar's `--http1-pool-idle-timeout`); a service's shorter `idleTimeout` wins. Linkerd's
/// proxy uses the same 3 s, for the same two reasons: the pool is a stack, so a connection left
/// idle that long was not needed, and it costs the upstream a socket and a worker's attention
/// (and the sidecar a socket; a connection of hyper's client, over mTLS, also its buffers,
/// about 33 KiB by valgrind's massif); and it stays below the keep-alive timeouts of common
/// servers (5 s for Node.js and Apache httpd), so the pool does not reuse a connection that the
/// upstream is closing at that moment. A plaintext connection is closed within a quarter of
/// this after it passes (see [`sweep_http1`]): 3.75 s at most, still below them.
pub const DEFAULT_H1_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

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
    #[error("mTLS to {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: MeshConnectError,
    },
    #[error("{addr} expects mTLS but this proxy runs without an identity")]
    NoIdentity { addr: SocketAddr },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    /// The connection failed before the request was written: it can go elsewhere unchanged.
    #[error("request to {addr} not sent: {source}")]
    Unsent {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    /// A circuit breaker refused a connection to `addr` or a wait for one.
    #[error("{limit} reached for {addr}")]
    Overflow {
        addr: SocketAddr,
        limit: &'static str,
    },
}

impl UpstreamError {
    /// Whether the request never reached the upstream, so it can go elsewhere unchanged.
    pub fn before_request(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. })
    }
}

/// A unit of a circuit breaker's limit, given back when dropped.
pub type Permit = Box<dyn Send + Sync>;

/// Circuit breakers the pool consults; refusals name the limit.
pub trait Admission: Send + Sync {
    /// A request must wait for a connection (one being opened, or one with room for another
    /// stream): a permit for the wait.
    fn pending(&self) -> Result<Permit, &'static str>;
    /// A connection is about to be opened: a permit for its lifetime.
    fn connection(&self) -> Result<Permit, &'static str>;
}

/// How to reach an upstream.
#[derive(Clone, Copy)]
pub struct Connect<'a> {
    pub timeout: Duration,
    /// A connection that carries no request for this long is closed.
    pub idle_timeout: Option<Duration>,
    pub admission: Option<&'a dyn Admission>,
    /// The identity to require over mTLS; `None` connects in plaintext.
    pub peer: Option<&'a Arc<SpiffeId>>,
}

impl<'a> Connect<'a> {
    /// A connect deadline and nothing else.
    pub fn timeout(timeout: Duration) -> Connect<'static> {
        Connect {
            timeout,
            idle_timeout: None,
            admission: None,
            peer: None,
        }
    }

    /// The same, over mTLS to `peer` when it is set.
    pub fn to_peer(self, peer: Option<&'a Arc<SpiffeId>>) -> Connect<'a> {
        Connect { peer, ..self }
    }

    fn admit(
        &self,
        addr: SocketAddr,
        ask: impl Fn(&dyn Admission) -> Result<Permit, &'static str>,
    ) -> Result<Option<Permit>, UpstreamError> {
        match self.admission {
            None => Ok(None),
            Some(a) => ask(a)
                .map(Some)
                .map_err(|limit| UpstreamError::Overflow { addr, limit }),
        }
    }
}

/// When a connection last carried a request, for its idle timeout.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Requests on it now.
    active: AtomicUsize,
    /// When it last became idle, in nanoseconds since `epoch`.
    idle_since: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    fn begin(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(now, Ordering::Release);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves once the connection has carried nothing for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let wait = if self.active.load(Ordering::Acquire) > 0 {
                timeout
            } else {
                let since = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
                let idle = self.epoch.elapsed().saturating_sub(since);
                if idle >= timeout {
                    return;
                }
                timeout - idle
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Runs a connection's task until it ends, or until it has been idle for `idle_timeout`; the
/// circuit breaker's permit is held as long, and `ended` runs at the end.
///
/// An async block, not an `async fn`: an `async fn` keeps its arguments twice, as captured and
/// as moved into its body, and the block polls the connection where it was captured. With the
/// connection moved into the `select!` as well, and the spawning task's own copy, an upstream
/// HTTP/1 connection's task was 5.7 KB, three times the connection (`-Zprint-type-sizes`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the connection twice"
)]
fn drive<F, E>(
    mut conn: F,
    addr: SocketAddr,
    idle_timeout: Option<Duration>,
    activity: Arc<Activity>,
    permit: Option<Permit>,
    ended: impl FnOnce() + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    F: std::future::Future<Output = Result<(), E>> + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    async move {
        let result = match idle_timeout {
            Some(timeout) => tokio::select! {
                result = &mut conn => Some(result),
                () = activity.idle_for(timeout) => None,
            },
            None => Some((&mut conn).await),
        };
        match result {
            Some(Err(e)) => tracing::debug!(%addr, error = %e, "upstream connection ended"),
            Some(Ok(())) => {}
            None => tracing::debug!(%addr, "upstream connection closed after its idle timeout"),
        }
        // The connection first: its socket closes and its senders see it closed before the
        // permit is free again and the pool forgets it.
        drop(conn);
        drop(permit);
        ended();
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

type H2Slot = Arc<tokio::sync::Mutex<Option<http2::Connection>>>;

/// An idle HTTP/1 connection.
type IdleH1 = (hyper_http1::SendRequest<Body>, Arc<Activity>);

/// An idle plaintext HTTP/1 connection, since when, and for how long it may stay so.
struct IdleHttp1 {
    conn: http1::Connection,
    /// When it went back to the pool.
    since: Instant,
    /// How long it may wait there: the pool's limit, or the shorter idle timeout of the service
    /// whose request gave it back.
    limit: Duration,
}

/// Pooled upstream connections.
pub struct Upstreams {
    // FxHash: looked up twice per request (take, give back); keys are endpoint addresses.
    /// Idle plaintext HTTP/1 connections ([`http1`]), most recently used last.
    idle_http1: Mutex<HashMap<SocketAddr, Vec<IdleHttp1>, FxBuildHasher>>,
    /// Whether a task is closing the idle ones past their limit.
    sweeping: AtomicBool,
    /// Idle HTTP/1 connections of hyper's client: over mTLS, or kept after an upgrade that the
    /// upstream declined.
    idle_h1: Mutex<HashMap<PeerKey, Vec<IdleH1>, FxBuildHasher>>,
    h2: Mutex<HashMap<PeerKey, H2Slot, FxBuildHasher>>,
    /// The proxy's mTLS state, when it has an identity.
    tls: Option<Arc<MeshTls>>,
    /// The longest an HTTP/1 connection waits in the pool for a request.
    h1_idle_limit: Duration,
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
    /// A pool that closes HTTP/1 connections idle for `h1_idle_limit` (or a service's shorter
    /// idle timeout).
    pub fn new(tls: Option<Arc<MeshTls>>, h1_idle_limit: Duration) -> Arc<Upstreams> {
        Arc::new(Upstreams {
            idle_http1: Mutex::default(),
            sweeping: AtomicBool::new(false),
            idle_h1: Mutex::default(),
            h2: Mutex::default(),
            tls,
            h1_idle_limit,
        })
    }

    /// Opens a connection to `addr`: mTLS carrying `carried` when `peer` is the identity to
    /// expect there, plain TCP otherwise.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: Option<&Arc<SpiffeId>>,
        carried: Carried,
        timeout: Duration,
    ) -> Result<UpstreamIo, UpstreamError> {
        let tcp = connect(addr, timeout).await?;
        let Some(peer) = peer else {
            return Ok(Either::Left(tcp));
        };
        let tls = self
            .tls
            .as_ref()
            .ok_or(UpstreamError::NoIdentity { addr })?;
        let handshake = tls.connect(tcp, peer, carried);
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(stream)) => Ok(Either::Right(stream)),
            Ok(Err(source)) => Err(UpstreamError::Tls { addr, source }),
            Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        }
    }

    /// Sends an HTTP/1.1 request to `addr` (over mTLS when `peer` is set) on an idle pooled
    /// connection or a new one. The request's URI must be in origin form with its `Host` header
    /// set.
    pub fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        peer: Option<&Arc<SpiffeId>>,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> {
        self.send_h1_with(addr, Connect::timeout(connect_timeout).to_peer(peer), req)
    }

    /// [`Upstreams::send_h1`] with an idle timeout and circuit breakers for new connections.
    ///
    /// Plaintext requests go through [`http1`], upgrades and mTLS through hyper's client (see
    /// [`through_hyper`]).
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its request argument twice"
    )]
    pub fn send_h1_with(
        self: &Arc<Self>,
        addr: SocketAddr,
        options: Connect<'_>,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> {
        if through_hyper(&options, req.method(), req.headers()) {
            futures::future::Either::Left(self.send_h1_hyper(addr, options, req))
        } else {
            futures::future::Either::Right(async move {
                let (head, body) = req.into_parts();
                self.send_http1(addr, options, &head, body).await
            })
        }
    }

    /// [`Upstreams::send_h1_with`] for a caller that keeps the request's head to send it again
    /// (a retry): [`http1`] encodes the head from the reference, so it is not copied; hyper's
    /// client takes a request by value, so it gets the head and the caller a copy in its place
    /// ([`head_for_hyper`]).
    pub fn send_h1_kept<'a>(
        self: &'a Arc<Self>,
        addr: SocketAddr,
        options: Connect<'a>,
        head: &'a mut Parts,
        body: Body,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + 'a {
        if through_hyper(&options, &head.method, &head.headers) {
            futures::future::Either::Left(self.send_h1_hyper(
                addr,
                options,
                Request::from_parts(head_for_hyper(head), body),
            ))
        } else {
            futures::future::Either::Right(self.send_http1(addr, options, head, body))
        }
    }

    /// Sends a plaintext request with [`http1`], on an idle connection or a new one. A request
    /// the connection gives back (nothing of it written, or a reused connection closed before
    /// answering an idempotent request without a body) goes once more, on a new connection.
    ///
    /// A function returning an async block rather than an `async fn`: an `async fn`'s future
    /// holds its arguments twice (as captured and as moved into its body), and the body would
    /// make that future, and every future around it, larger.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its body argument twice"
    )]
    fn send_http1<'a>(
        self: &'a Arc<Self>,
        addr: SocketAddr,
        options: Connect<'a>,
        head: &'a Parts,
        mut body: Body,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + 'a {
        async move {
            let idle_limit = options
                .idle_timeout
                .map_or(self.h1_idle_limit, |t| t.min(self.h1_idle_limit));
            let mut fresh = false;
            loop {
                let conn = match (!fresh)
                    .then(|| self.take_http1(addr, idle_limit))
                    .flatten()
                {
                    Some(conn) => conn,
                    // Boxed for the reason `new_h1` is.
                    None => Box::pin(self.new_http1(addr, options)).await?,
                };
                match conn.send(head, body).await {
                    Ok(response) => {
                        return Ok(response.map(|inner| {
                            let mut body = PooledBody {
                                inner,
                                pool: Arc::downgrade(self),
                                addr,
                                idle_limit,
                            };
                            // No body to read (204, 304, HEAD, content-length: 0).
                            body.release();
                            body.boxed_unsync()
                        }));
                    }
                    Err(e) => match e.body {
                        Some(again) if !fresh => {
                            body = again;
                            fresh = true;
                        }
                        Some(_) if !e.written => {
                            return Err(UpstreamError::Unsent {
                                addr,
                                source: e.error.into(),
                            });
                        }
                        _ => {
                            return Err(UpstreamError::Request {
                                addr,
                                source: e.error.into(),
                            });
                        }
                    },
                }
            }
        }
    }

    /// The most recently used idle plaintext connection to `addr` that is still usable and has
    /// waited less than its own limit and `idle_limit` (the taking request's). The sweep closes a
    /// connection only some time after its limit has passed, so a limit shorter than the pool's
    /// is checked here; with the pool's limit on both sides, the clock is not read.
    fn take_http1(&self, addr: SocketAddr, idle_limit: Duration) -> Option<http1::Connection> {
        let mut now = None;
        let mut idle = lock(&self.idle_http1);
        let list = idle.get_mut(&addr)?;
        while let Some(IdleHttp1 { conn, since, limit }) = list.pop() {
            let limit = limit.min(idle_limit);
            if limit < self.h1_idle_limit {
                let now = *now.get_or_insert_with(Instant::now);
                if now.saturating_duration_since(since) >= limit {
                    continue;
                }
            }
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Opens a plaintext connection to `addr`, within the circuit breakers.
    async fn new_http1(
        &self,
        addr: SocketAddr,
        options: Connect<'_>,
    ) -> Result<http1::Connection, UpstreamError> {
        let _pending = options.admit(addr, |a| a.pending())?;
        let permit = options.admit(addr, |a| a.connection())?;
        let stream = connect(addr, options.timeout).await?;
        Ok(http1::Connection::new(stream, permit))
    }

    /// Pools a plaintext connection whose exchange ended cleanly, until `idle_limit` from now.
    fn give_back_http1(
        self: &Arc<Self>,
        addr: SocketAddr,
        conn: http1::Connection,
        idle_limit: Duration,
    ) {
        let since = Instant::now();
        {
            let mut idle = lock(&self.idle_http1);
            let list = idle.entry(addr).or_default();
            if list.len() >= MAX_IDLE_PER_ADDR {
                return;
            }
            list.push(IdleHttp1 {
                conn,
                since,
                limit: idle_limit,
            });
        }
        if !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep_http1(Arc::downgrade(self), self.h1_idle_limit));
        }
    }

    /// hyper's client: a task per connection, reached through its channel.
    ///
    /// An async block, not an `async fn`, for the reason [`Upstreams::send_http1`] is one.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its request argument twice"
    )]
    fn send_h1_hyper(
        self: &Arc<Self>,
        addr: SocketAddr,
        options: Connect<'_>,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> {
        async move {
            let key: PeerKey = (addr, options.peer.cloned());
            let mut fresh = false;
            let (response, sender, activity) = loop {
                let (mut sender, activity) = self.h1_sender(&key, options, fresh).await?;
                activity.begin();
                match sender.try_send_request(req).await {
                    Ok(response) => break (response, sender, activity),
                    Err(mut e) => {
                        activity.end();
                        match e.take_message() {
                            // A pooled connection the upstream had just closed: once more, on a
                            // new connection (hyper gives the request back only if unsent).
                            Some(unsent) if !fresh => {
                                req = unsent;
                                fresh = true;
                            }
                            Some(_) => {
                                return Err(UpstreamError::Unsent {
                                    addr,
                                    source: e.into_error().into(),
                                });
                            }
                            None => {
                                return Err(UpstreamError::Request {
                                    addr,
                                    source: e.into_error().into(),
                                });
                            }
                        }
                    }
                }
            };
            let keep_alive = !connection_close(response.headers());
            Ok(self.pooled_response(key, response, keep_alive, sender, activity))
        }
    }

    /// An idle pooled connection to `key` that is still usable, or a new one (always a new one
    /// when `fresh`).
    async fn h1_sender(
        self: &Arc<Self>,
        key: &PeerKey,
        options: Connect<'_>,
        fresh: bool,
    ) -> Result<IdleH1, UpstreamError> {
        loop {
            let idle = if fresh {
                None
            } else {
                lock(&self.idle_h1).get_mut(key).and_then(Vec::pop)
            };
            match idle {
                Some((mut sender, activity)) => {
                    if !sender.is_closed() && sender.ready().await.is_ok() {
                        return Ok((sender, activity));
                    }
                }
                // Boxed: opening a connection (TCP, maybe TLS, the HTTP/1 handshake) is a
                // future of kilobytes that every request's future would otherwise carry inline
                // and copy, although almost every request finds a pooled connection.
                None => return Box::pin(self.new_h1(key, options)).await,
            }
        }
    }

    /// Opens a new HTTP/1 connection to `key`'s address, within the circuit breakers. When it
    /// ends (closed by either side, or idle past its timeout) it leaves the pool: an idle
    /// entry's handle holds the connection's request queue.
    async fn new_h1(
        self: &Arc<Self>,
        key: &PeerKey,
        options: Connect<'_>,
    ) -> Result<IdleH1, UpstreamError> {
        let addr = key.0;
        let _pending = options.admit(addr, |a| a.pending())?;
        let permit = options.admit(addr, |a| a.connection())?;
        let stream = self
            .connect(addr, options.peer, Carried::Http1, options.timeout)
            .await?;
        let (sender, conn) = hyper_http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr,
                source: source.into(),
            })?;
        let activity = Activity::new();
        let idle_timeout = options
            .idle_timeout
            .map_or(self.h1_idle_limit, |t| t.min(self.h1_idle_limit));
        let pool = Arc::downgrade(self);
        let (key, ended) = (key.clone(), activity.clone());
        tokio::spawn(drive(
            conn.with_upgrades(),
            addr,
            Some(idle_timeout),
            ended.clone(),
            permit,
            move || {
                if let Some(pool) = pool.upgrade() {
                    pool.forget_h1(&key, &ended);
                }
            },
        ));
        Ok((sender, activity))
    }

    /// The response, with a body that gives the connection back to the pool once read.
    fn pooled_response(
        self: &Arc<Self>,
        key: PeerKey,
        response: Response<Incoming>,
        keep_alive: bool,
        sender: hyper_http1::SendRequest<Body>,
        activity: Arc<Activity>,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let sender = if keep_alive {
            Some((sender, activity))
        } else {
            activity.end();
            None
        };
        let mut body = ReturnToPool {
            inner: body,
            sender,
            pool: Arc::downgrade(self),
            key,
        };
        if body.inner.is_end_stream() {
            // No body to read (204, 304, HEAD, content-length: 0): nobody will poll it.
            body.release();
        }
        Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
    }

    /// Sends a request on the multiplexed HTTP/2 connection to `addr` (mTLS when `peer` is
    /// set), opening it if needed. The request's URI carries the authority the upstream should
    /// see.
    pub async fn send_h2(
        &self,
        addr: SocketAddr,
        peer: Option<&Arc<SpiffeId>>,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        self.send_h2_with(addr, Connect::timeout(connect_timeout).to_peer(peer), req)
            .await
    }

    /// [`Upstreams::send_h2`] with an idle timeout and circuit breakers for a new connection and
    /// for requests that must wait for one.
    ///
    /// An async block, not an `async fn`, for the reason [`Upstreams::send_h1_with`] is one.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold its request argument twice"
    )]
    pub fn send_h2_with(
        &self,
        addr: SocketAddr,
        options: Connect<'_>,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> {
        async move {
            let slot = lock(&self.h2)
                .entry((addr, options.peer.cloned()))
                .or_default()
                .clone();
            // A live connection that takes streams: nothing to admit, unless the request must
            // wait for a stream.
            let ready = slot.try_lock().ok().and_then(|held| match held.as_ref() {
                Some(conn) if !conn.is_closed() => Some(conn.clone()),
                _ => None,
            });
            let (conn, waiting) = match ready.and_then(|mut conn| conn.is_ready().then_some(conn)) {
                // At the peer's limit of concurrent streams: this request waits for a stream.
                Some(conn) if options.admission.is_some() && conn.is_full() => {
                    (conn, options.admit(addr, |a| a.pending())?)
                }
                Some(conn) => (conn, None),
                None => {
                    let _pending = options.admit(addr, |a| a.pending())?;
                    // Boxed for the reason `new_h1` is: kilobytes, and rarely needed.
                    let conn = Box::pin(self.h2_connection(addr, &slot, options)).await?;
                    (conn, None)
                }
            };
            let (head, body) = req.into_parts();
            conn.send(head, body, waiting).await.map_err(|e| match e {
                http2::SendError::Unsent(e) => UpstreamError::Unsent {
                    addr,
                    source: e.into(),
                },
                http2::SendError::Failed(e) => UpstreamError::Request {
                    addr,
                    source: e.into(),
                },
            })
        }
    }

    /// The HTTP/2 connection to `addr`, opened if there is none (one request opens it while the
    /// others wait for it).
    async fn h2_connection(
        &self,
        addr: SocketAddr,
        slot: &H2Slot,
        options: Connect<'_>,
    ) -> Result<http2::Connection, UpstreamError> {
        let mut held = slot.lock().await;
        if let Some(mut conn) = held.as_ref().filter(|c| !c.is_closed()).cloned()
            && conn.is_ready()
        {
            return Ok(conn);
        }
        let permit = options.admit(addr, |a| a.connection())?;
        let stream = self
            .connect(addr, options.peer, Carried::Http2, options.timeout)
            .await?;
        let (conn, driven) =
            http2::Connection::handshake(stream, crate::serve::MAX_HEAD_BYTES as u32 + 4096)
                .await
                .map_err(|source| UpstreamError::Handshake {
                    addr,
                    source: source.into(),
                })?;
        tokio::spawn(drive(
            Box::pin(driven),
            addr,
            options.idle_timeout.or(Some(DEFAULT_IDLE_TIMEOUT)),
            conn.activity().clone(),
            permit,
            || {},
        ));
        *held = Some(conn.clone());
        Ok(conn)
    }

    fn give_back(&self, key: PeerKey, (sender, activity): IdleH1) {
        activity.end();
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle_h1);
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((sender, activity));
        }
    }

    /// Takes an ended connection (known by its `activity`) out of the idle pool, if it is there.
    fn forget_h1(&self, key: &PeerKey, activity: &Arc<Activity>) {
        let mut idle = lock(&self.idle_h1);
        if let Some(list) = idle.get_mut(key) {
            list.retain(|(_, a)| !Arc::ptr_eq(a, activity));
            if list.is_empty() {
                idle.remove(key);
            }
        }
    }

    /// Open HTTP/2 connections and idle HTTP/1 connections, for status.
    pub fn counts(&self) -> (usize, usize) {
        let idle = lock(&self.idle_h1).values().map(Vec::len).sum::<usize>()
            + lock(&self.idle_http1).values().map(Vec::len).sum::<usize>();
        let h2 = lock(&self.h2).len();
        (h2, idle)
    }
}

/// Closes idle plaintext HTTP/1 connections past their limit, a few times per pool limit
/// (`limit`), until the pool has none left: so that an idle connection lives between its limit and
/// a quarter more, and a pool with none costs no timer. One given back under a service's shorter
/// limit is not taken once that has passed ([`Upstreams::take_http1`]), and goes at the next sweep.
async fn sweep_http1(pool: Weak<Upstreams>, limit: Duration) {
    let tick = (limit / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut idle = lock(&pool.idle_http1);
        idle.retain(|_, list| {
            list.retain(|entry| now.saturating_duration_since(entry.since) < entry.limit);
            !list.is_empty()
        });
        if idle.is_empty() {
            // Under the lock: a connection given back after this starts a new sweep.
            pool.sweeping.store(false, Ordering::Release);
            return;
        }
    }
}

/// A plaintext HTTP/1 response body that gives its connection back to the pool as soon as the
/// response is complete.
struct PooledBody {
    inner: http1::ResponseBody,
    pool: Weak<Upstreams>,
    addr: SocketAddr,
    idle_limit: Duration,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(conn) = self.inner.take_reusable()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.give_back_http1(self.addr, conn, self.idle_limit);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // A reader that trusts `is_end_stream` (hyper's server does) stops polling after the last
        // frame: the connection goes back with it.
        if self.inner.is_end_stream() {
            self.release();
        }
        polled.map(|frame| frame.map(|frame| frame.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn connection_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| http1::has_token(v.as_bytes(), b"close"))
}

/// An HTTP/1 response body that returns its connection to the pool once read to the end.
struct ReturnToPool {
    inner: Incoming,
    sender: Option<IdleH1>,
    pool: Weak<Upstreams>,
    key: PeerKey,
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
            Poll::Ready(Some(Err(_))) => self.discard(),
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
        match (self.sender.take(), self.pool.upgrade()) {
            (Some(idle), Some(pool)) => pool.give_back(self.key.clone(), idle),
            (Some((_, activity)), None) => activity.end(),
            (None, _) => {}
        }
    }

    /// Drops the connection rather than pool it.
    fn discard(&mut self) {
        if let Some((_, activity)) = self.sender.take() {
            activity.end();
        }
    }
}

impl Drop for ReturnToPool {
    fn drop(&mut self) {
        // Not read to the end: the connection cannot be reused.
        self.discard();
    }
}

/// A head the caller keeps for retries, to send with hyper's HTTP/1 client, which takes it by
/// value: the head itself, with a copy left in its place. The copy is what stays, not what is
/// sent: hyper's client parses a response's fields into the emptied map of the request it
/// sent, reserving room there by the size of the map's index table, and a copy keeps the table
/// with room for its own entries only, so that sending copies made every response's fields grow
/// it twice (callgrind).
fn head_for_hyper(head: &mut Parts) -> Parts {
    let kept = head.clone();
    std::mem::replace(head, kept)
}

/// Whether an HTTP/1 request goes through hyper's client rather than [`http1`]: over mTLS, or
/// an upgrade (`Upgrade`, or `CONNECT`), which hands the connection over to [`hyper::upgrade`].
fn through_hyper(options: &Connect<'_>, method: &http::Method, headers: &HeaderMap) -> bool {
    options.peer.is_some()
        || method == http::Method::CONNECT
        || headers.contains_key(header::UPGRADE)
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
        // `Connection: TE` is how an HTTP/1 client sends `TE` (RFC 9110 §10.1.4): TE is decided
        // below, like any other.
        .filter(|name| name != header::TE)
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
    // HTTP/2 allows TE only as "trailers" (gRPC needs it), spelled so and in one field: h2
    // refuses `Trailers`, and an h2 peer refuses a request with any other TE field.
    let te = headers.get_all(header::TE);
    let other = te
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let respell = te.iter().count() > 1 || te.iter().any(|v| v != "trailers");
    if other {
        headers.remove(header::TE);
    } else if respell {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
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
        // h2 takes the value in lower case only, and in one field.
        h.insert(header::TE, "Trailers".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        h.append(header::TE, "trailers".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get_all(header::TE).iter().count(), 1);
        h.append(header::TE, "gzip".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none());
        // Named by `Connection`, as an HTTP/1 client sends it.
        h.insert(header::CONNECTION, "TE".parse().expect("v"));
        h.insert(header::TE, "trailers".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        assert!(h.get(header::CONNECTION).is_none());
    }

    /// An HTTP/1 upstream that answers `hello`: its address, how many connections it accepted,
    /// and each connection's number (from 1) as it ends.
    async fn hello_upstream() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<usize>,
    ) {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"hello"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    let _ = ended_tx.send(number);
                });
            }
        });
        (addr, accepted, ended)
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header(header::HOST, "test")
            .body(empty())
            .expect("request")
    }

    #[tokio::test]
    async fn http1_connections_are_reused_after_the_body_is_read() {
        let (addr, accepted, _) = hello_upstream().await;
        let pool = Upstreams::new(None, Duration::from_secs(60));
        for _ in 0..5 {
            let req = get();
            let resp = pool
                .send_h1(addr, None, Duration::from_secs(1), req)
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
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An upstream that closes each connection after one response, without saying so: a pooled
    /// connection is dead by the next request, which must go out on a new one.
    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_upstream_is_replaced() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(stream);
            }
        });
        let pool = Upstreams::new(None, Duration::from_secs(60));
        let options = Connect {
            timeout: Duration::from_secs(1),
            idle_timeout: Some(Duration::from_secs(60)),
            admission: None,
            peer: None,
        };
        for _ in 0..5 {
            let req = get();
            let resp = pool
                .send_h1_with(addr, options, req)
                .await
                .expect("a new connection replaces the dead one");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
    }

    /// An upstream that answers a connection's first request and closes it on reading the
    /// second, without a word: the close races the request, as when an upstream's keep-alive
    /// timeout fires just as the pool reuses the connection. An idempotent request without a
    /// body goes again on a new connection; a POST fails, since the upstream may have acted on it.
    #[tokio::test]
    async fn a_request_on_a_connection_closed_as_it_went_out_is_resent_only_when_safe() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        let pool = Upstreams::new(None, Duration::from_secs(60));
        let send = |method: http::Method| {
            let mut req = get();
            *req.method_mut() = method;
            pool.send_h1(addr, None, Duration::from_secs(5), req)
        };
        let first = send(http::Method::GET).await.expect("first");
        first.into_body().collect().await.expect("body");
        let again = send(http::Method::GET)
            .await
            .expect("resent on a new connection");
        let body = again.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let error = send(http::Method::POST).await.expect_err("not resent");
        assert!(!error.before_request(), "{error}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The pool's HTTP/1 limit closes a connection that waits too long for its next request,
    /// although the service's idle timeout is longer; the next request opens a new one.
    #[tokio::test]
    async fn an_http1_connection_idle_in_the_pool_past_its_limit_is_closed() {
        let (addr, _, mut closed) = hello_upstream().await;
        let pool = Upstreams::new(None, Duration::from_millis(50));
        let options = Connect {
            timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(3600)),
            admission: None,
            peer: None,
        };
        let resp = pool
            .send_h1_with(addr, options, get())
            .await
            .expect("first");
        resp.into_body().collect().await.expect("body");
        assert_eq!(
            pool.counts().1,
            1,
            "back in the pool once its body was read"
        );
        let first = tokio::time::timeout(Duration::from_secs(30), closed.recv()).await;
        assert_eq!(first.expect("closed by the pool's limit"), Some(1));
        // The connection's task takes it out of the pool as it ends, just after the close.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.counts().1 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.counts().1, 0, "a closed connection left the pool");
        let resp = pool
            .send_h1_with(addr, options, get())
            .await
            .expect("second");
        resp.into_body().collect().await.expect("body");
        let second = tokio::time::timeout(Duration::from_secs(30), closed.recv()).await;
        assert_eq!(
            second.expect("the second connection too"),
            Some(2),
            "the second request went out on a new connection"
        );
    }

    /// A service's idle timeout shorter than the pool's limit holds between sweeps: a connection
    /// idle past it is not reused (the upstream may be closing it), whichever request takes it.
    #[tokio::test]
    async fn a_service_idle_timeout_shorter_than_the_pool_limit_is_kept() {
        let (addr, accepted, _) = hello_upstream().await;
        // The pool's limit is long: no sweep runs during the test.
        let pool = Upstreams::new(None, Duration::from_secs(60));
        let with_idle_timeout = |idle_timeout| Connect {
            timeout: Duration::from_secs(5),
            idle_timeout,
            admission: None,
            peer: None,
        };
        let short = with_idle_timeout(Some(Duration::from_millis(100)));
        let pool = &pool;
        let send = move |options| async move {
            let resp = pool
                .send_h1_with(addr, options, get())
                .await
                .expect("response");
            resp.into_body().collect().await.expect("body");
        };
        send(short).await;
        send(short).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused within 100 ms");
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(short).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "not reused after 100 ms"
        );
        // Given back under the short limit, not reused by a request under the pool's own.
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(with_idle_timeout(None)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // Given back under the pool's limit, not reused by a request under a short one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(short).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        send(with_idle_timeout(None)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "a fresh one is reused");
    }

    #[tokio::test]
    async fn an_idle_connection_closes_after_its_idle_timeout() {
        let activity = Activity::new();
        activity.begin();
        // Busy: never idle, however long it waits.
        let timeout = Duration::from_millis(50);
        let busy = tokio::time::timeout(Duration::from_millis(300), activity.idle_for(timeout));
        assert!(busy.await.is_err());
        activity.end();
        let idle = tokio::time::timeout(Duration::from_secs(10), activity.idle_for(timeout));
        assert!(idle.await.is_ok());
    }

    /// An HTTP/2 upstream that answers `hello` (`/slow` 5 s after it notifies `slow`), and
    /// shuts each connection down gracefully once `shut(n)` resolves for it (`n` counts from
    /// 1): its address, and how many connections it accepted.
    async fn hello_h2_upstream<S, F>(
        shut: S,
        slow: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, Arc<AtomicUsize>)
    where
        S: Fn(usize) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shut = shut(counter.fetch_add(1, Ordering::SeqCst) + 1);
                let slow = slow.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let slow = slow.clone();
                        async move {
                            if req.uri().path() == "/slow" {
                                slow.notify_one();
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"hello"),
                            )))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = &mut conn => {}
                        () = shut => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Sends `path` over HTTP/2 through `pool` and expects `hello`.
    async fn hello_h2(pool: Arc<Upstreams>, addr: SocketAddr, options: Connect<'_>, path: &str) {
        let get = Request::builder()
            .uri(format!("http://{addr}{path}"))
            .body(empty())
            .expect("request");
        let response = pool
            .send_h2_with(addr, options, get)
            .await
            .expect("response");
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "hello");
    }

    #[tokio::test]
    async fn an_http2_connection_closed_by_either_side_is_replaced() {
        // The upstream closes each connection a second after it opened.
        let (addr, accepted) = hello_h2_upstream(
            |_| tokio::time::sleep(Duration::from_secs(1)),
            Arc::default(),
        )
        .await;
        let pool = Upstreams::new(None, DEFAULT_H1_POOL_IDLE_TIMEOUT);
        let plain = Connect::timeout(Duration::from_secs(5));
        let idle = Connect {
            idle_timeout: Some(Duration::from_millis(50)),
            ..plain
        };
        hello_h2(pool.clone(), addr, plain, "/").await;
        hello_h2(pool.clone(), addr, plain, "/").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused");
        // Closed by the upstream.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        hello_h2(pool.clone(), addr, idle, "/").await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "replaced after the upstream closed it"
        );
        // Closed by the pool, idle past its timeout (well before the upstream's second).
        tokio::time::sleep(Duration::from_millis(150)).await;
        hello_h2(pool.clone(), addr, idle, "/").await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "replaced after its idle timeout"
        );
        assert_eq!(pool.counts().0, 1);
    }

    #[tokio::test]
    async fn a_connection_going_away_with_a_request_open_is_replaced_for_the_next() {
        let shut_down = Arc::new(tokio::sync::Notify::new());
        let shut_first = shut_down.clone();
        let slow_arrived = Arc::new(tokio::sync::Notify::new());
        // The first connection is shut down on a signal; the others stay.
        let (addr, accepted) = hello_h2_upstream(
            move |n| {
                let shut_first = shut_first.clone();
                async move {
                    if n == 1 {
                        shut_first.notified().await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                }
            },
            slow_arrived.clone(),
        )
        .await;
        let pool = Upstreams::new(None, DEFAULT_H1_POOL_IDLE_TIMEOUT);
        let plain = Connect::timeout(Duration::from_secs(5));
        let slow = tokio::spawn(hello_h2(pool.clone(), addr, plain, "/slow"));
        slow_arrived.notified().await;
        shut_down.notify_one();
        // Until the GOAWAY reaches the pool's connection, requests still go on it and are
        // answered there; then they go on a new one, while `/slow` is open on the first.
        let deadline = Instant::now() + Duration::from_secs(4);
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "no new connection after the GOAWAY"
            );
            hello_h2(pool.clone(), addr, plain, "/").await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!slow.is_finished(), "`/slow` was still open");
        slow.await.expect("the open request is answered");
    }

    #[tokio::test]
    async fn a_burst_keeps_its_connections_for_the_next_one() {
        use hyper::service::service_fn;
        const BURST: usize = 100;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        // Every request waits until the whole burst is in flight, so each needs a connection.
        let barrier = Arc::new(tokio::sync::Barrier::new(BURST));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
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
        let pool = Upstreams::new(None, Duration::from_secs(60));
        for _ in 0..2 {
            let requests = (0..BURST).map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let req = get();
                    let resp = pool
                        .send_h1(addr, None, Duration::from_secs(5), req)
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
            accepted.load(Ordering::SeqCst),
            BURST,
            "the second burst reused the first one's connections"
        );
        assert_eq!(pool.counts().1, BURST);
    }
}

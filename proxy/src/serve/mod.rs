//! Serving connections: the accept loop, draining on shutdown, HTTP connection serving, and the
//! request-forwarding details the inbound and outbound sides share (authority, URI forms,
//! upgrades, error answers).
//!
//! Draining: a [`DrainTrigger`] stops every accept loop (closing its listener, so that new
//! connections are refused), asks every HTTP connection to finish (HTTP/2 GOAWAY, HTTP/1 close
//! after the response in flight) and waits for connections and upgraded splices to end, up to a
//! deadline. This module must never drop a request in flight before that deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::balance::{Balancers, InFlight};
use crate::config::ConfigStore;
use crate::metrics::Metrics;
use crate::pool::{self, Body, BoxError, Upstreams};

mod http1;

/// The largest request head accepted from a client, on either HTTP version, counted as HTTP/2
/// counts a header list (see [`head_too_large`]); beyond it the client gets 431 with
/// `keel-error: headers-too-large`. The sidecar-to-sidecar hop allows the same, so what the
/// outbound side accepts the inbound side accepts too.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// The most header fields an HTTP/1 request may carry (hyper's default limit); beyond it, 431
/// with `keel-error: headers-too-large`.
pub const MAX_HEADERS: usize = 100;
/// hyper's own limits on an HTTP/1 head, twice keel's. hyper answers a head it cannot parse
/// within its limits itself, with a bare 431 that cannot carry `keel-error`; with room above
/// keel's limits, every head up to twice the limit reaches keel's check and is told why. (A
/// limit of more than 100 fields costs hyper a small allocation per request head.)
const HYPER_MAX_HEAD_BYTES: usize = 2 * MAX_HEAD_BYTES;
const HYPER_MAX_HEADERS: usize = 2 * MAX_HEADERS;

/// What every connection handler needs.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<ConfigStore>,
    pub balancers: Arc<Balancers>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head (the first, on a port declared
    /// HTTP, counted from the connection's start), with its body when that is one read whole
    /// with the head (see [`http1`]), and how long an idle keep-alive connection is kept.
    pub head_timeout: Duration,
    /// The inbound listener's port: never a destination the proxy forwards to.
    pub inbound_port: u16,
    /// The proxy's mTLS state, when it has an identity.
    pub tls: Option<Arc<crate::tls::MeshTls>>,
}

/// The listening side of draining: connections watch it.
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<DrainState>,
    tracker: TaskTracker,
}

#[derive(Debug, Default)]
struct DrainState {
    /// Set (before `notify` wakes the waiters) once draining has started.
    draining: AtomicBool,
    notify: Notify,
}

impl Drain {
    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Acquire)
    }

    /// Resolves once draining has started.
    ///
    /// Every HTTP connection polls this beside the connection itself, on every wakeup of its
    /// task: after the first poll has registered the task's waker, a poll only reads a flag.
    pub async fn signaled(&mut self) {
        let notified = self.state.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a trigger in between still wakes this task.
        notified.as_mut().enable();
        if self.state.draining.load(Ordering::Acquire) {
            return;
        }
        DrainFlag {
            state: &self.state,
            notified,
            registered: false,
        }
        .await
    }
}

/// Waits for [`DrainState::draining`]: the first poll registers the task's waker with the
/// `Notify` (a tokio task's waker wakes that task wherever it runs, so once is enough); later
/// polls, which come from the task's other wakeups, only read the flag.
struct DrainFlag<'a, N> {
    state: &'a DrainState,
    notified: Pin<&'a mut N>,
    registered: bool,
}

impl<N: Future<Output = ()>> Future for DrainFlag<'_, N> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !self.registered {
            if self.notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.registered = true;
        }
        Poll::Pending
    }
}

/// The triggering side of draining.
#[derive(Debug)]
pub struct DrainTrigger {
    state: Arc<DrainState>,
    tracker: TaskTracker,
}

impl DrainTrigger {
    pub fn new() -> (DrainTrigger, Drain) {
        let state = Arc::new(DrainState::default());
        let tracker = TaskTracker::new();
        (
            DrainTrigger {
                state: state.clone(),
                tracker: tracker.clone(),
            },
            Drain { state, tracker },
        )
    }

    /// Starts draining and waits for every connection to end, at most `deadline`. Returns
    /// whether they all ended in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.state.draining.store(true, Ordering::Release);
        self.state.notify.notify_waiters();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Accepts connections until draining starts, running `handle` for each in a tracked task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, mut drain: Drain, handle: F)
where
    F: Fn(TcpStream, SocketAddr, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    drain.tracker.spawn(handle(stream, client, drain.clone()));
                }
                Err(e) => {
                    // Out of descriptors or a transient error: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = drain.signaled() => return,
        }
    }
}

/// Serves HTTP/1 or HTTP/2 on `stream`, answering each request with `handler`, until the
/// client goes away or draining finishes the connection gracefully.
///
/// HTTP/1: a client may half-close (shut its write side) once its request is sent and still
/// gets the response. One that has sent part of a request head and nothing more for
/// `head_timeout` gets 408 with `keel-error: request-timeout`; an idle keep-alive connection is
/// closed after that long without a word, as HTTP/1.1 allows. Requests without a body or with
/// a small one by length are served by [`http1`] (a small body is read whole with its head, in
/// the head's time); a connection's first other request hands it to hyper's server.
///
/// The connection is built before the returned future, which holds it once: an `async fn`
/// would keep `stream` as its argument besides the copy inside the connection, and lay the
/// HTTP/1 and the HTTP/2 connection side by side. That was 2.7 KB of every plaintext
/// connection's future and 11 KB of every mTLS one's (`-Zprint-type-sizes`).
pub fn serve_http<S, F, Fut>(
    stream: S,
    http2: bool,
    head_timeout: Duration,
    mut drain: Drain,
    handler: F,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    if http2 {
        let service = hyper_service(handler);
        // Boxed: `graceful_shutdown` needs it pinned, and pinning it in the future would move
        // it there a second time.
        let mut conn = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .max_header_list_size(MAX_HEAD_BYTES as u32 + 4096)
                .serve_connection(TokioIo::new(stream), service),
        );
        futures::future::Either::Left(async move {
            tokio::select! {
                served = conn.as_mut() => log_end(served),
                _ = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    log_end(conn.await);
                }
            }
        })
    } else {
        futures::future::Either::Right(http1::serve(stream, head_timeout, drain, handler))
    }
}

/// `handler` as hyper's service: each request's body becomes a [`Body`].
fn hyper_service<F, Fut>(
    handler: F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Send
+ 'static
where
    F: Fn(Request<Body>) -> Fut + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    service_fn(move |req: Request<Incoming>| {
        // Boxed: the request's future is several KB (it holds the upstream send, its connect
        // and its timeout), and hyper moves the service's future by value: the HTTP/1
        // dispatcher stores it, the HTTP/2 server spawns a task per stream holding it. Without
        // the box those copies were 13-19% of a sidecar's instructions in the pair (callgrind).
        // Allocated first and then written, so that the optimizer can build the future in the
        // box: `Box::pin(handler(req))` built it on the stack and copied all of it in, a copy
        // gone from the release build's profile this way (callgrind).
        let answer = Box::into_pin(Box::write(
            Box::new_uninit(),
            handler(req.map(pool::incoming)),
        ));
        async move { Ok::<_, Infallible>(answer.await) }
    })
}

/// Serves the rest of an HTTP/1 connection with hyper's server: `io` starts with what
/// [`http1::serve`] read of the request it handed over.
async fn serve_hyper_http1<S, F, Fut>(io: S, head_timeout: Duration, mut drain: Drain, handler: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .half_close(true)
        .max_buf_size(HYPER_MAX_HEAD_BYTES)
        .max_headers(HYPER_MAX_HEADERS)
        .serve_connection(TokioIo::new(io), hyper_service(handler))
        .with_upgrades();
    let served = tokio::select! {
        // The connection first: one handed over with a request already read must take that
        // request in before draining asks it to finish, or hyper, with nothing read yet, would
        // close without answering it.
        biased;
        served = &mut conn => served,
        _ = drain.signaled() => {
            Pin::new(&mut conn).graceful_shutdown();
            (&mut conn).await
        }
    };
    match served {
        Err(e) if e.is_timeout() => {
            // hyper closes without a word; a client that was sending a head is told why. What
            // it sent is still in the connection's read buffer.
            if let Some(parts) = conn.into_parts().filter(|parts| !parts.read_buf.is_empty()) {
                answer_raw(
                    parts.io.into_inner(),
                    StatusCode::REQUEST_TIMEOUT,
                    "request-timeout",
                    None,
                )
                .await;
            }
        }
        served => log_end(served),
    }
}

fn log_end(served: Result<(), hyper::Error>) {
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Copies both ways until both sides are done, passing half-closes through. Returns the bytes
/// sent to the client and received from it. It borrows the streams: a caller's future that
/// moved them in would hold them twice.
pub async fn copy_bidirectional<A, B>(client: &mut A, upstream: &mut B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional(client, upstream).await {
        Ok((from_client, to_client)) => (to_client, from_client),
        Err(e) => {
            tracing::debug!(error = %e, "opaque connection ended with an error");
            (0, 0)
        }
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`).
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| pool::http1::has_token(v.as_bytes(), b"upgrade"));
    if !asks || req.version() == http::Version::HTTP_2 {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Joins the client's and the upstream's upgraded connections once both are ready. The splice
/// outlives the HTTP connection it came from, so it is a task of `drain`'s own: draining waits
/// for it (up to the deadline) like for any connection.
pub fn splice_upgrade(
    drain: &Drain,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    drain.tracker.spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

/// The authority a request is addressed to: the URI's, else the `Host` header.
pub fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    authority_of(req.uri(), req.headers())
}

fn authority_of<'a>(uri: &'a Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// `http://<authority><path?query>`, as an HTTP/2 client sends it (`:authority` kept).
pub fn absolute_uri(authority: &str, uri: &Uri) -> Uri {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .unwrap_or_else(|_| uri.clone())
}

/// Rewrites `uri` to the path and query alone, as an HTTP/1.1 request line carries them; one
/// in that form already is left as it is.
pub fn to_origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
}

/// Sets `Host` from `authority` unless the request has one.
pub fn set_host(headers: &mut http::HeaderMap, authority: &str) {
    if !headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(authority)
    {
        headers.insert(header::HOST, value);
    }
}

/// Sets `Host`, unless the request has one, from the authority it names (its URI's), or else
/// from `addr`, the address it was sent to. Nothing is looked up when it has one.
pub fn ensure_host(parts: &mut Parts, addr: SocketAddr) {
    if !parts.headers.contains_key(header::HOST) {
        let authority = NamedAuthority::of(parts, addr);
        set_host(&mut parts.headers, authority.as_str());
    }
}

/// The authority a request names (see [`request_authority`]), or else the address it was sent
/// to, held apart from the request's head so that the head can be rewritten while it is in use.
/// It shares the URI's or the `Host` field's bytes rather than copying them.
#[derive(Debug, Clone)]
pub enum NamedAuthority {
    Uri(http::uri::Authority),
    Host(HeaderValue),
    Address(String),
}

impl NamedAuthority {
    pub fn of(parts: &Parts, addr: SocketAddr) -> NamedAuthority {
        if let Some(authority) = parts.uri.authority() {
            return NamedAuthority::Uri(authority.clone());
        }
        match parts.headers.get(header::HOST) {
            Some(host) if host.to_str().is_ok() => NamedAuthority::Host(host.clone()),
            _ => NamedAuthority::Address(addr.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            NamedAuthority::Uri(authority) => authority.as_str(),
            // Checked to be text when taken.
            NamedAuthority::Host(host) => host.to_str().unwrap_or_default(),
            NamedAuthority::Address(addr) => addr,
        }
    }
}

/// Whether a request certainly carries no body, so it can be sent again as it is.
pub fn has_no_body(parts: &Parts) -> bool {
    let declared_empty = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_none_or(|v| v.as_bytes() == b"0")
        && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    declared_empty
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
        )
}

/// Runs `send` with an optional deadline.
///
/// Not an `async fn`: one would hold `send` twice (as its argument and inside the timeout), and
/// request futures are moved and copied by the byte.
pub fn with_timeout<F: Future>(
    timeout: Option<Duration>,
    send: F,
) -> impl Future<Output = Result<F::Output, tokio::time::error::Elapsed>> {
    use futures::FutureExt;
    match timeout {
        Some(t) => futures::future::Either::Left(tokio::time::timeout(t, send)),
        None => futures::future::Either::Right(send.map(Ok)),
    }
}

/// The header of the proxy's own answers that names the reason.
pub const KEEL_ERROR: HeaderName = HeaderName::from_static("keel-error");

/// An answer of the proxy's own, naming the reason in `keel-error`.
pub fn error_response(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut response = Response::new(pool::full(format!("{reason}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(KEEL_ERROR, HeaderValue::from_static(reason));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether a request's headers exceed [`MAX_HEAD_BYTES`] (counted as HTTP/2 does: name, value
/// and 32 bytes of overhead each) or, over HTTP/1, [`MAX_HEADERS`] fields.
pub fn head_too_large<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    (req.version() != http::Version::HTTP_2 && headers.len() > MAX_HEADERS)
        || headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
            > MAX_HEAD_BYTES
}

/// Answers a client of a port declared HTTP that did not speak HTTP, then closes: 400
/// (`not-http`) when it sent something else, 408 (`request-timeout`) when it sent nothing at all
/// before detection gave up, and nothing when it already closed without a byte.
pub async fn refuse_not_http(stream: TcpStream) {
    let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // Not waiting: detection has already waited as long as it would.
    let (status, reason) = match socket2::SockRef::from(&stream).peek(&mut first) {
        Ok(0) => return,
        Ok(_) => (StatusCode::BAD_REQUEST, "not-http"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            (StatusCode::REQUEST_TIMEOUT, "request-timeout")
        }
        Err(_) => return,
    };
    answer_raw(stream, status, reason, None).await;
}

/// The most of a connection's first HTTP/1 request head [`refuse_malformed_head`] looks at.
const FIRST_HEAD_PEEK: usize = 8 << 10;

/// Checks the first HTTP/1 request head of a connection before hyper serves it, and answers one
/// hyper would refuse itself: 400 with `keel-error: bad-request` and, in the body, what is wrong
/// and on which line of the head; 431 with `keel-error: headers-too-large` for more fields than
/// hyper takes. hyper answers both with a bare status that says nothing. Returns whether it
/// answered; the connection is then closed.
///
/// It looks only at what has arrived (a peek, no waiting) and at most [`FIRST_HEAD_PEEK`]
/// bytes of it: a head still arriving, or longer, is left to hyper, whose answers to it, as to
/// the later heads of a keep-alive connection, are the bare ones.
pub async fn refuse_malformed_head(stream: &mut TcpStream) -> bool {
    let problem = {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_HEAD_PEEK];
        match socket2::SockRef::from(&*stream).peek(&mut buf) {
            Ok(n) => {
                // SAFETY: `peek` initialised the first `n` bytes.
                let head = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                check_head(head).err()
            }
            Err(_) => None,
        }
    };
    let Some(problem) = problem else {
        return false;
    };
    tracing::debug!(%problem, "malformed HTTP/1 request head refused");
    match problem {
        HeadProblem::TooManyHeaders => {
            answer_raw(
                stream,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                None,
            )
            .await
        }
        HeadProblem::Malformed { .. } => {
            let detail = problem.to_string();
            answer_raw(
                stream,
                StatusCode::BAD_REQUEST,
                "bad-request",
                Some(&detail),
            )
            .await
        }
    }
    true
}

/// Why an HTTP/1 request head is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadProblem {
    /// More header fields than hyper takes.
    TooManyHeaders,
    /// It cannot be parsed; `line` counts from 1, the request line.
    Malformed { what: String, line: Option<usize> },
}

impl std::fmt::Display for HeadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadProblem::TooManyHeaders => {
                write!(f, "more than {HYPER_MAX_HEADERS} header fields")
            }
            HeadProblem::Malformed {
                what,
                line: Some(line),
            } => write!(f, "malformed request head: {what} on line {line}"),
            HeadProblem::Malformed { what, line: None } => {
                write!(f, "malformed request head: {what}")
            }
        }
    }
}

/// Checks the start of a connection's bytes as an HTTP/1 request head with the rules hyper's
/// server applies (httparse with hyper's defaults, then the request target, `Content-Length`
/// and `Transfer-Encoding`), so that what passes here hyper accepts too. A head that is not
/// whole yet is judged on what there is of it.
pub fn check_head(head: &[u8]) -> Result<(), HeadProblem> {
    let mut fields = [httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let complete = match req.parse(head) {
        Ok(status) => status.is_complete(),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadProblem::TooManyHeaders),
        Err(e) => {
            return Err(HeadProblem::Malformed {
                what: e.to_string(),
                line: failing_line(head),
            });
        }
    };
    if let Some(path) = req.path
        && path.parse::<Uri>().is_err()
    {
        return Err(HeadProblem::Malformed {
            what: format!("invalid request target {:?}", truncate(path, 64)),
            line: Some(1),
        });
    }
    if !complete {
        return Ok(());
    }
    let http11 = req.version == Some(1);
    let mut chunked = None;
    let mut length = None;
    for (i, field) in req.headers.iter().enumerate() {
        let line = Some(i + 2);
        let malformed = |what: &str| HeadProblem::Malformed {
            what: what.to_owned(),
            line,
        };
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(malformed("transfer-encoding in an HTTP/1.0 request"));
            }
            let last = std::str::from_utf8(field.value)
                .ok()
                .and_then(|v| v.rsplit(',').next());
            chunked = Some(last.is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked")));
        } else if field.name.eq_ignore_ascii_case("content-length") && chunked.is_none() {
            let value = field.value;
            let parsed = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
                .flatten();
            match (parsed, length) {
                (None, _) => return Err(malformed("invalid content-length")),
                (Some(n), Some(before)) if n != before => {
                    return Err(malformed("content-length values that differ"));
                }
                (Some(n), _) => length = Some(n),
            }
        }
    }
    if chunked == Some(false) {
        return Err(HeadProblem::Malformed {
            what: "transfer-encoding whose last coding is not chunked".to_owned(),
            line: None,
        });
    }
    Ok(())
}

/// The line of `head` on which httparse first fails, counting the request line as 1: the first
/// prefix ending with a line break that httparse refuses.
fn failing_line(head: &[u8]) -> Option<usize> {
    let mut fields = [httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut start = 0;
    for line in 1.. {
        let Some(end) = head[start..].iter().position(|b| *b == b'\n') else {
            // The last, unfinished line.
            return (start < head.len()).then_some(line);
        };
        let end = start + end + 1;
        if line == 1 {
            if httparse::Request::new(&mut fields)
                .parse(&head[..end])
                .is_err()
            {
                return Some(1);
            }
        } else if httparse::parse_headers(&head[start..end], &mut fields[..1]).is_err() {
            return Some(line);
        }
        start = end;
    }
    None
}

/// `s`, cut to at most `max` bytes on a character boundary, for an error message.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes an answer of the proxy's own straight to a connection that has no HTTP server on it
/// (any more), then closes it: at most a second, a client that reads nothing is not waited for.
/// The body is `reason`, or `reason: detail`.
async fn answer_raw<S: AsyncWrite + Unpin>(
    mut stream: S,
    status: StatusCode,
    reason: &str,
    detail: Option<&str>,
) {
    use tokio::io::AsyncWriteExt;
    let body = match detail {
        Some(detail) => format!("{reason}: {detail}\n"),
        None => format!("{reason}\n"),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nkeel-error: {reason}\r\ncontent-type: text/plain; \
         charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Keeps `in_flight` alive until the response body has been sent (or dropped).
pub fn track(response: Response<Body>, in_flight: InFlight) -> Response<Body> {
    response.map(|body| {
        http_body_util::BodyExt::boxed_unsync(Tracked {
            inner: body,
            _in_flight: in_flight,
        })
    })
}

struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malformed(what: &str, line: Option<usize>) -> Result<(), HeadProblem> {
        Err(HeadProblem::Malformed {
            what: what.to_owned(),
            line,
        })
    }

    #[test]
    fn heads_hyper_takes_pass() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nx-half",
            b"GET /x?y=1 HTTP/1.0\nHost: a\n\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT a.b:443 HTTP/1.1\r\n\r\n",
            b"GET http://a.b/c HTTP/1.1\r\n\r\n",
            b"GET ",
        ] {
            assert_eq!(
                check_head(head),
                Ok(()),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_malformed_head_is_named_with_its_line() {
        let cases: [(&[u8], Result<(), HeadProblem>); 8] = [
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nbad name: 1\r\n\r\n",
                malformed("invalid header name", Some(3)),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nx: a\x01b\r\n\r\n",
                malformed("invalid header value", Some(3)),
            ),
            (
                b"GET / HTTP/9.9\r\n\r\n",
                malformed("invalid HTTP version", Some(1)),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nstill arriving\x7f",
                malformed("invalid header name", Some(3)),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
                malformed("invalid content-length", Some(3)),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                malformed("content-length values that differ", Some(3)),
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                malformed("transfer-encoding in an HTTP/1.0 request", Some(2)),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                malformed("transfer-encoding whose last coding is not chunked", None),
            ),
        ];
        for (head, expected) in cases {
            assert_eq!(
                check_head(head),
                expected,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        let fields: String = (0..=HYPER_MAX_HEADERS)
            .map(|i| format!("x{i}: 1\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        assert_eq!(
            check_head(many.as_bytes()),
            Err(HeadProblem::TooManyHeaders)
        );
        assert_eq!(
            HeadProblem::Malformed {
                what: "invalid header name".to_owned(),
                line: Some(3)
            }
            .to_string(),
            "malformed request head: invalid header name on line 3"
        );
    }

    #[test]
    fn uri_forms() {
        let mut uri: Uri = "http://a.b:80/x?y=1".parse().expect("uri");
        to_origin_form(&mut uri);
        assert_eq!(uri, "/x?y=1");
        to_origin_form(&mut uri);
        assert_eq!(uri, "/x?y=1");
        let mut star: Uri = "*".parse().expect("uri");
        to_origin_form(&mut star);
        assert_eq!(star, "*");
        assert_eq!(
            absolute_uri("svc.ns", &"/p".parse().expect("uri")),
            "http://svc.ns/p"
        );
    }

    #[test]
    fn a_named_authority_is_the_uri_s_then_host_then_the_address() {
        let addr: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let named = |req: Request<()>| {
            let (parts, ()) = req.into_parts();
            NamedAuthority::of(&parts, addr).as_str().to_owned()
        };
        let both = Request::get("http://a.b:81/x")
            .header(header::HOST, "c.d")
            .body(())
            .expect("request");
        assert_eq!(named(both), "a.b:81");
        let host = Request::get("/x")
            .header(header::HOST, "c.d")
            .body(())
            .expect("request");
        assert_eq!(named(host), "c.d");
        let not_text = Request::get("/x")
            .header(
                header::HOST,
                HeaderValue::from_bytes(b"\xff").expect("value"),
            )
            .body(())
            .expect("request");
        assert_eq!(named(not_text), "10.0.0.1:8080");
        assert_eq!(
            named(Request::get("/x").body(()).expect("request")),
            "10.0.0.1:8080"
        );
    }

    #[test]
    fn a_missing_host_is_the_uri_s_authority_or_the_address() {
        let addr: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let host = |req: Request<()>| {
            let (mut parts, ()) = req.into_parts();
            ensure_host(&mut parts, addr);
            let hosts: Vec<_> = parts
                .headers
                .get_all(header::HOST)
                .iter()
                .cloned()
                .collect();
            hosts
        };
        let kept = Request::get("http://a.b/x")
            .header(header::HOST, "c.d")
            .body(())
            .expect("request");
        assert_eq!(host(kept), ["c.d"]);
        let from_uri = Request::get("http://a.b:81/x").body(()).expect("request");
        assert_eq!(host(from_uri), ["a.b:81"]);
        let from_address = Request::get("/x").body(()).expect("request");
        assert_eq!(host(from_address), ["10.0.0.1:8080"]);
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("req");
        assert_eq!(upgrade_protocol(&req).expect("upgrade"), "websocket");
        let plain = Request::builder()
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("req");
        assert!(upgrade_protocol(&plain).is_none());
    }

    #[test]
    fn bodiless_requests() {
        let (get, _) = Request::get("/").body(()).expect("req").into_parts();
        assert!(has_no_body(&get));
        let (post, _) = Request::post("/").body(()).expect("req").into_parts();
        assert!(!has_no_body(&post));
        let (chunked, _) = Request::get("/")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(())
            .expect("req")
            .into_parts();
        assert!(!has_no_body(&chunked));
    }

    #[tokio::test]
    async fn draining_wakes_connections_that_wait_and_is_seen_by_late_ones() {
        let (trigger, drain) = DrainTrigger::new();
        let mut waiting = drain.clone();
        let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
        // A connection task: polled for its own reasons many times, then only the drain can
        // wake it.
        let waiter = tokio::spawn(async move {
            let signaled = waiting.signaled();
            tokio::pin!(signaled);
            for _ in 0..100 {
                tokio::select! {
                    _ = signaled.as_mut() => return false,
                    _ = tokio::task::yield_now() => {}
                }
            }
            let _ = waiting_tx.send(());
            signaled.as_mut().await;
            true
        });
        waiting_rx.await.expect("the waiter polled 100 times");
        let mut late = drain.clone();
        assert!(trigger.drain(Duration::from_secs(5)).await);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("draining wakes the waiting task");
        assert!(woken.expect("waiter"), "the drain came before it started");
        tokio::time::timeout(Duration::from_secs(1), late.signaled())
            .await
            .expect("a drain that already started is seen at once");
    }

    #[test]
    fn heads_are_too_large_by_size_or_by_count_over_http1() {
        let with = |fields: usize, value: usize, version: http::Version| {
            let mut req = Request::get("/").version(version);
            for i in 0..fields {
                req = req.header(format!("x-{i}"), "v".repeat(value));
            }
            req.body(()).expect("req")
        };
        assert!(!head_too_large(&with(
            MAX_HEADERS,
            10,
            http::Version::HTTP_11
        )));
        assert!(head_too_large(&with(
            MAX_HEADERS + 1,
            10,
            http::Version::HTTP_11
        )));
        // HTTP/2 counts bytes only: the hop between sidecars adds its own header.
        assert!(!head_too_large(&with(
            MAX_HEADERS + 1,
            10,
            http::Version::HTTP_2
        )));
        assert!(head_too_large(&with(
            1,
            MAX_HEAD_BYTES,
            http::Version::HTTP_2
        )));
        assert!(!head_too_large(&with(
            1,
            MAX_HEAD_BYTES - 64,
            http::Version::HTTP_11
        )));
    }

    #[test]
    fn errors_name_their_reason() {
        let r = error_response(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["keel-error"], "no-endpoints");
    }
}

//! HTTP/2 to an upstream (another sidecar, or an HTTP/2 app), with h2's client driven by the
//! task of the request it carries.
//!
//! hyper's HTTP/2 client hands every request over a channel to its connection's task, spawns a
//! task per request to wait for the response, and hands the response back over another channel.
//! In the sidecar pair that was 17% of the client sidecar's instructions per request
//! (callgrind): the spawns, the channels, and the copies of each request's futures into its
//! tasks. Here the request's own future opens the stream and waits for the response head, and
//! the response body is read from the stream as it is polled. Only the connection has a task:
//! h2's [`h2::client::Connection`], which reads and writes the socket for every stream, with
//! keep-alive pings. A request body that is not all in hand when the stream opens (streaming
//! gRPC, a large upload) is sent by a task of its own, since it may still be going after the
//! response head came back.
//!
//! What this client does as hyper's did: it advertises the same flow-control windows, sends
//! `Content-Length` when a request body's length is known, and reads a response's
//! `Content-Length` into its body's size hint (an HTTP/1 client downstream gets the length,
//! not chunks); a stream reset with `NO_ERROR` after the response ends the body without an
//! error (RFC 9113 §8.1). What it adds: a stream the peer refused, or left unprocessed when it
//! went away (`REFUSED_STREAM`, or above a `GOAWAY`'s last stream), is [`SendError::Unsent`],
//! since RFC 9113 §8.7 guarantees nothing of it was processed.
//!
//! Callers strip connection-specific fields first ([`super::strip_hop_by_hop`]); h2 refuses a
//! request that carries any.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::{Activity, Body, BoxError, Permit};

/// The flow-control windows this client advertises, per stream and per connection: hyper's
/// client defaults, which the sidecars used before this client replaced it. A stream's 2 MiB
/// lets a response of that size flow without waiting for the reader.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
/// The most a stream buffers to send beyond what the peer's window allows (hyper's default).
const MAX_SEND_BUFFER: usize = 1 << 20;
/// The most streams opened before the peer's SETTINGS say how many it takes (hyper's value: the
/// least RFC 9113 §6.5.2 recommends a peer to allow); more wait for them.
const INITIAL_MAX_STREAMS: usize = 100;
/// How often a connection with requests open checks, with a PING, that its peer still answers,
/// and how long it waits for the answer before it closes the connection (and fails its
/// requests): a peer that vanished without closing (a node gone) is found in 40 s at most.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request that failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The peer processed nothing of it: it may go elsewhere, body and all.
    #[error(transparent)]
    Unsent(h2::Error),
    /// It may have been processed.
    #[error(transparent)]
    Failed(h2::Error),
}

/// Why a connection's task ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no answer to a keep-alive ping within {KEEP_ALIVE_TIMEOUT:?}")]
    KeepAliveTimeout,
}

/// An open HTTP/2 connection: cloned by every request that goes on it.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    activity: Arc<Activity>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// Opens HTTP/2 on `io`. Returns the connection, and the future that drives it, for the
    /// caller to spawn; once that future ends, [`Connection::is_closed`] says so.
    pub async fn handshake<T>(
        io: T,
        max_header_list_size: u32,
    ) -> Result<(Connection, impl Future<Output = Result<(), Ended>> + Send), h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(max_header_list_size)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_STREAMS)
            .enable_push(false)
            .handshake::<T, Bytes>(io)
            .await?;
        let activity = Activity::new();
        let closed = Arc::new(AtomicBool::new(false));
        let pings = conn.ping_pong();
        let driven = {
            let activity = activity.clone();
            // Set however the future ends: run out, or dropped (closed for idleness).
            let closed = ClosedOnDrop(closed.clone());
            async move {
                let _closed = closed;
                match pings {
                    Some(pings) => tokio::select! {
                        ended = &mut conn => ended.map_err(Ended::from),
                        () = keep_alive(pings, &activity) => Err(Ended::KeepAliveTimeout),
                    },
                    None => (&mut conn).await.map_err(Ended::from),
                }
            }
        };
        Ok((
            Connection {
                sender,
                activity,
                closed,
            },
            driven,
        ))
    }

    /// The connection's record of requests and idleness, for its idle timeout.
    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Whether the connection has ended (closed by either side, or failed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether the connection takes new streams. One that failed, or whose peer is shutting it
    /// down (GOAWAY), takes none, though its task goes on with the streams it has: it is marked
    /// closed here, for the pool to open another.
    pub fn is_ready(&mut self) -> bool {
        if let Poll::Ready(Err(_)) = ready_now(&mut self.sender) {
            self.closed.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Whether a new request would wait for another to end, at the peer's limit of concurrent
    /// streams. An estimate, from the requests whose response bodies are held: h2 may have
    /// closed a stream whose body is still to be read, and does not tell how many it has open.
    /// A request the estimate lets through may still wait in h2, without a permit; one it holds
    /// back is refused, when the circuit breaker does, with nothing sent. Checking after the
    /// stream was queued instead would send a refused request once its turn came, and reset it.
    pub fn is_full(&self) -> bool {
        self.activity.active.load(Ordering::Acquire) >= self.sender.current_max_send_streams()
    }

    /// Sends a request, whose URI carries the scheme and authority the peer should see, and
    /// resolves to the response once its head has come. The response body holds the stream
    /// (and counts as a request on the connection) until it is read to the end or dropped.
    ///
    /// A request beyond the peer's limit of concurrent streams waits in h2 for another to end,
    /// holding `waiting` (a circuit breaker's permit, taken when [`Connection::is_full`]) until
    /// its stream opens.
    ///
    /// Dropping the future before the response resets the stream (`CANCEL`).
    pub fn send(
        mut self,
        mut head: Parts,
        body: Body,
        waiting: Option<Permit>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'static {
        let active = Active::begin(&self.activity);
        async move {
            set_content_length(&mut head, &body);
            let end_of_stream = body.is_end_stream();
            let sent = self
                .sender
                .send_request(Request::from_parts(head, ()), end_of_stream);
            let (response, stream) = match sent {
                Ok(sent) => sent,
                Err(e) if e.is_io() || e.is_go_away() || e.is_library() => {
                    // The connection failed or is going away: the stream was never opened.
                    self.closed.store(true, Ordering::Release);
                    return Err(SendError::Unsent(e));
                }
                Err(e) => return Err(SendError::Failed(e)),
            };
            if let Some(waiting) = waiting {
                // Ready once this stream is no longer queued behind the limit; an error is the
                // stream's too, and its response reports it.
                let _ = std::future::poll_fn(|cx| self.sender.poll_ready(cx)).await;
                drop(waiting);
            }
            let (cancel, count) = if end_of_stream {
                drop(stream);
                (None, Count::Alone(active))
            } else {
                let mut pump = Pump {
                    stream,
                    body,
                    chunk: None,
                };
                // Most bodies are in hand already (a buffered POST): sent from here, no task.
                let sent = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pump).poll(cx)));
                match sent.await {
                    Poll::Ready(()) => (None, Count::Alone(active)),
                    Poll::Pending => {
                        let shared = Arc::new(active);
                        (Some(pump.spawn(shared.clone())), Count::Shared(shared))
                    }
                }
            };
            let response = response.await.map_err(|e| {
                let refused = e.reason() == Some(Reason::REFUSED_STREAM) && e.is_reset();
                if e.is_remote() && (refused || e.is_go_away()) {
                    SendError::Unsent(e)
                } else {
                    SendError::Failed(e)
                }
            })?;
            if let Some(cancel) = cancel {
                cancel.disarm();
            }
            let (parts, recv) = response.into_parts();
            let remaining = content_length(&parts.headers).or(recv.is_end_stream().then_some(0));
            let body = ResponseBody {
                recv,
                remaining,
                data_done: false,
                _count: count,
            };
            Ok(Response::from_parts(parts, Body::new(body)))
        }
    }
}

/// Whether `sender` may open a stream now: an error once the connection failed or its peer sent
/// GOAWAY. A fresh clone has opened no stream, so it is never pending.
fn ready_now(sender: &mut SendRequest<Bytes>) -> Poll<Result<(), h2::Error>> {
    sender.poll_ready(&mut Context::from_waker(std::task::Waker::noop()))
}

/// Marks a connection closed when its driving future is done or dropped.
struct ClosedOnDrop(Arc<AtomicBool>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Resolves when a ping sent while requests were open went unanswered for
/// [`KEEP_ALIVE_TIMEOUT`]; runs as long as the connection otherwise.
async fn keep_alive(mut pings: h2::PingPong, activity: &Activity) {
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        if activity.active.load(Ordering::Acquire) == 0 {
            continue;
        }
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection failed: its own future ends with the reason.
            Ok(Err(_)) => std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// `Content-Length` for a body of known length, when the request has none: a length of zero
/// only for methods whose requests have a body by definition (RFC 9110 §8.6).
fn set_content_length(head: &mut Parts, body: &Body) {
    let Some(len) = body.size_hint().exact() else {
        return;
    };
    let defined = !matches!(
        head.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    );
    if (len != 0 || defined) && !head.headers.contains_key(header::CONTENT_LENGTH) {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The length a response's `Content-Length` fields agree on, if they do.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter().map(|v| {
        std::str::from_utf8(v.as_bytes())
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    let first = values.next()??;
    values.all(|v| v == Some(first)).then_some(first)
}

/// A request on the connection, until its response body ends or is dropped.
struct Active(Arc<Activity>);

impl Active {
    fn begin(activity: &Arc<Activity>) -> Active {
        activity.begin();
        Active(activity.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A request's one count on its connection: the response body's alone, or shared with the task
/// that sends its request body.
enum Count {
    Alone(#[expect(dead_code, reason = "held until dropped")] Active),
    Shared(#[expect(dead_code, reason = "held until dropped")] Arc<Active>),
}

/// Sends a request body on its stream, a frame at a time as the peer's window allows, with
/// the trailers; stops at the peer's reset or the body's failure (resetting the stream).
struct Pump {
    stream: SendStream<Bytes>,
    body: Body,
    /// A frame read from the body that waits for the window, and whether it is the last.
    chunk: Option<(Bytes, bool)>,
}

impl Pump {
    /// Goes on sending in a task of its own, until done, or until the returned guard is
    /// dropped without [`Cancel::disarm`] (the request was given up before its response came),
    /// which resets the stream.
    fn spawn(mut self, active: Arc<Active>) -> Cancel {
        let (cancel, cancelled) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // The request counts on the connection while its body is sent, whether or not its
            // response is still read: the connection is not idle, and keep-alive pings go on.
            let _active = active;
            let cancelled = tokio::select! {
                given_up = cancelled => given_up.is_ok(),
                () = &mut self => return,
            };
            if cancelled {
                self.stream.send_reset(Reason::CANCEL);
            } else {
                self.await;
            }
        });
        Cancel(Some(cancel))
    }
}

impl Future for Pump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // Registered first, so that a reset wakes this while it waits for the body or for
            // the window.
            if let Poll::Ready(reset) = this.stream.poll_reset(cx) {
                tracing::debug!(?reset, "upstream stopped the request body");
                return Poll::Ready(());
            }
            if let Some((data, last)) = this.chunk.take() {
                // h2 takes a frame larger than the window and sends it as the window opens;
                // waiting for some window first keeps the body from being read faster than
                // the peer takes it.
                if this.stream.capacity() == 0 {
                    this.chunk = Some((data, last));
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "request body not sent");
                            return Poll::Ready(());
                        }
                        None => return Poll::Ready(()),
                    }
                }
                if let Err(e) = this.stream.send_data(data, last) {
                    tracing::debug!(error = %e, "request body not sent");
                    return Poll::Ready(());
                }
                if last {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let last = this.body.is_end_stream();
                        if data.is_empty() {
                            // No window needed: only the end of the stream is sent.
                            if last {
                                if let Err(e) = this.stream.send_data(data, true) {
                                    tracing::debug!(error = %e, "request body not ended");
                                }
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A claim of one byte, not the frame's length: a frame waiting for the
                        // window holds none of the connection's window that other streams need.
                        this.stream.reserve_capacity(1);
                        this.chunk = Some((data, last));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.stream.reserve_capacity(0);
                            if let Err(e) = this.stream.send_trailers(trailers) {
                                tracing::debug!(error = %e, "request trailers not sent");
                            }
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed");
                    this.stream.send_reset(reset_reason(&*e));
                    return Poll::Ready(());
                }
                None => {
                    if let Err(e) = this.stream.send_data(Bytes::new(), true) {
                        tracing::debug!(error = %e, "request body not ended");
                    }
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The reason to reset a stream with when its request body failed: the reason of the stream
/// reset that failed it downstream (a gRPC client's `CANCEL` reaches the server as one), else
/// `CANCEL`: keel gave the stream up (a client gone, an attempt superseded by a retry). A
/// downstream connection's own error (`GOAWAY`) is not this stream's to report.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(reason) = e
            .downcast_ref::<h2::Error>()
            .filter(|e| !e.is_go_away())
            .and_then(h2::Error::reason)
        {
            return reason;
        }
        cause = e.source();
    }
    Reason::CANCEL
}

/// Resets a request's stream when dropped before [`Cancel::disarm`].
struct Cancel(Option<oneshot::Sender<()>>);

impl Cancel {
    /// The response came: the body goes on to its end.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            let _ = cancel.send(());
        }
    }
}

/// A response body read from its stream, giving the window back as it is read.
struct ResponseBody {
    recv: RecvStream,
    /// What is left of the `Content-Length`, if it was given.
    remaining: Option<u64>,
    data_done: bool,
    _count: Count,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(ended(e)),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(ended(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A response stream's error as its body reports it: a reset with `NO_ERROR` ends the body, as
/// a server that answered without reading the whole request sends it (RFC 9113 §8.1).
fn ended(e: h2::Error) -> Option<Result<Frame<Bytes>, BoxError>> {
    if e.reason() == Some(Reason::NO_ERROR) {
        None
    } else {
        Some(Err(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    const NO_WAIT: Option<Permit> = None;

    /// A request body whose frames the test sends when it chooses.
    fn streamed() -> (Frames, Body) {
        let (tx, rx) = mpsc::channel(8);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, Body::new(body))
    }

    fn request(method: Method) -> Parts {
        let (parts, ()) = Request::builder()
            .method(method)
            .uri("http://web.test/items?q=1")
            .header("x-test", "v")
            .body(())
            .expect("request")
            .into_parts();
        parts
    }

    /// A client connection to a peer on loopback, and the peer's side, handshaken.
    async fn connected() -> (Connection, h2::server::Connection<TcpStream, Bytes>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let server = tokio::spawn(h2::server::handshake(accepted.expect("accept").0));
        let (conn, driven) = Connection::handshake(client.expect("connect"), 64 << 10)
            .await
            .expect("handshake");
        tokio::spawn(driven);
        (conn, server.await.expect("task").expect("server handshake"))
    }

    type Accepted = (http::Request<RecvStream>, h2::server::SendResponse<Bytes>);

    /// Drives the peer's connection in a task, handing over each request it accepts.
    fn serve(mut server: h2::server::Connection<TcpStream, Bytes>) -> mpsc::Receiver<Accepted> {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(Ok(accepted)) = server.accept().await {
                if tx.send(accepted).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_body_streams_both_ways_after_the_response_head_with_trailers() {
        let (conn, server) = connected().await;
        let mut accepted = serve(server);
        let (frames, body) = streamed();
        let sent = tokio::spawn(conn.clone().send(request(Method::POST), body, NO_WAIT));
        let (req, mut respond) = accepted.recv().await.expect("request");
        assert_eq!(req.uri(), "http://web.test/items?q=1");
        assert_eq!(req.headers()["x-test"], "v");
        // The length is unknown: none is sent.
        assert!(req.headers().get(header::CONTENT_LENGTH).is_none());
        // The head goes back before any of the body came.
        let mut out = respond
            .send_response(Response::new(()), false)
            .expect("respond");
        let response = sent.await.expect("task").expect("response");
        // One request on the connection, though its body's task and its response both hold it.
        assert_eq!(conn.activity.active.load(Ordering::Acquire), 1);
        let mut response_body = response.into_body();
        let mut request_body = req.into_body();
        for chunk in ["one", "two"] {
            frames
                .send(Ok(Frame::data(Bytes::from(chunk))))
                .await
                .expect("frame");
            let got = request_body.data().await.expect("data").expect("data");
            let _ = request_body.flow_control().release_capacity(got.len());
            assert_eq!(got, chunk);
            out.send_data(got, false).expect("echo");
            let frame = response_body.frame().await.expect("frame").expect("frame");
            assert_eq!(frame.into_data().expect("data"), chunk);
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        frames
            .send(Ok(Frame::trailers(trailers.clone())))
            .await
            .expect("trailers");
        assert!(request_body.data().await.is_none());
        let got = request_body.trailers().await.expect("trailers");
        assert_eq!(got.as_ref(), Some(&trailers));
        out.send_trailers(trailers.clone()).expect("trailers");
        let frame = response_body.frame().await.expect("frame").expect("frame");
        assert_eq!(frame.into_trailers().expect("trailers"), trailers);
        assert!(response_body.frame().await.is_none());
        assert!(response_body.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_in_hand_goes_with_its_length_and_the_answer_s_length_is_its_size() {
        let (conn, server) = connected().await;
        let mut accepted = serve(server);
        let sent =
            tokio::spawn(conn.send(request(Method::PUT), super::super::full("abc"), NO_WAIT));
        let (req, mut respond) = accepted.recv().await.expect("request");
        assert_eq!(req.headers()[header::CONTENT_LENGTH], "3");
        let mut request_body = req.into_body();
        assert_eq!(
            request_body.data().await.expect("data").expect("data"),
            "abc"
        );
        assert!(request_body.data().await.is_none());
        let answer = Response::builder()
            .header(header::CONTENT_LENGTH, "5")
            .body(())
            .expect("response");
        let mut out = respond.send_response(answer, false).expect("respond");
        out.send_data(Bytes::from_static(b"hello"), true)
            .expect("data");
        let response = sent.await.expect("task").expect("response");
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let got = response.into_body().collect().await.expect("body");
        assert_eq!(got.to_bytes(), "hello");
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_pass_both_ways() {
        let (conn, server) = connected().await;
        let mut accepted = serve(server);
        // 3 MiB up, streamed in frames of 64 KiB: many times the peer's window of 64 KiB, so
        // the body's task waits for window. 6 MiB down: more than this client's windows, 2 MiB
        // for the stream and 5 MiB for the connection.
        let (frames, body) = streamed();
        let feed = tokio::spawn(async move {
            for _ in 0..48 {
                let frame = Frame::data(Bytes::from(vec![7u8; 64 << 10]));
                frames.send(Ok(frame)).await.expect("frame");
            }
        });
        let sent = tokio::spawn(conn.clone().send(request(Method::POST), body, NO_WAIT));
        let (req, mut respond) = accepted.recv().await.expect("request");
        let mut request_body = req.into_body();
        let mut received = 0;
        while let Some(data) = request_body.data().await {
            let data = data.expect("data");
            received += data.len();
            let _ = request_body.flow_control().release_capacity(data.len());
        }
        assert_eq!(received, 48 << 16);
        feed.await.expect("fed");
        let mut out = respond
            .send_response(Response::new(()), false)
            .expect("respond");
        let response = sent.await.expect("task").expect("response");
        let down = tokio::spawn(async move {
            for _ in 0..96 {
                out.reserve_capacity(64 << 10);
                while out.capacity() < 64 << 10 {
                    match std::future::poll_fn(|cx| out.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        other => panic!("no window: {other:?}"),
                    }
                }
                out.send_data(Bytes::from(vec![9u8; 64 << 10]), false)
                    .expect("data");
            }
            out.send_data(Bytes::new(), true).expect("end");
        });
        let got = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
            .await
            .expect("the body flows")
            .expect("body")
            .to_bytes();
        assert_eq!(got.len(), 96 << 16);
        down.await.expect("sent");
    }

    #[tokio::test]
    async fn a_refused_stream_is_unsent_and_another_reset_is_not() {
        let (conn, server) = connected().await;
        let mut accepted = serve(server);
        for (reason, unsent) in [
            (Reason::REFUSED_STREAM, true),
            (Reason::INTERNAL_ERROR, false),
        ] {
            let sent = tokio::spawn(conn.clone().send(
                request(Method::GET),
                super::super::empty(),
                NO_WAIT,
            ));
            let (_req, mut respond) = accepted.recv().await.expect("request");
            respond.send_reset(reason);
            let error = sent.await.expect("task").expect_err("reset");
            assert_eq!(
                matches!(error, SendError::Unsent(_)),
                unsent,
                "{reason:?}: {error}"
            );
        }
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn a_request_given_up_before_its_answer_resets_its_stream() {
        let (conn, server) = connected().await;
        let mut accepted = serve(server);
        let (_frames, body) = streamed();
        let sent = tokio::spawn(conn.clone().send(request(Method::POST), body, NO_WAIT));
        let (req, _respond) = accepted.recv().await.expect("request");
        sent.abort();
        let mut request_body = req.into_body();
        let got = tokio::time::timeout(Duration::from_secs(60), request_body.data())
            .await
            .expect("the stream is reset")
            .expect("an end")
            .expect_err("reset");
        assert_eq!(got.reason(), Some(Reason::CANCEL), "{got}");
        assert_eq!(conn.activity.active.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_pings_is_given_up() {
        let (conn, mut server) = connected().await;
        let sent = tokio::spawn(conn.clone().send(
            request(Method::GET),
            super::super::empty(),
            NO_WAIT,
        ));
        // The peer takes the request, and then reads nothing more: its pings go unanswered.
        let accepted = server.accept().await.expect("request").expect("request");
        tokio::time::pause();
        let started = tokio::time::Instant::now();
        let error = tokio::time::timeout(Duration::from_secs(120), sent)
            .await
            .expect("given up in time")
            .expect("task")
            .expect_err("given up");
        assert!(matches!(error, SendError::Failed(_)), "{error}");
        // The first ping went out one interval after the handshake, a moment before `started`.
        let least = KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT - Duration::from_secs(1);
        assert!(started.elapsed() >= least, "{:?}", started.elapsed());
        assert!(conn.is_closed());
        drop((accepted, server));
    }

    #[tokio::test]
    async fn a_request_past_the_peer_s_stream_limit_holds_its_permit_until_its_stream_opens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let server = tokio::spawn(
            h2::server::Builder::new()
                .max_concurrent_streams(1)
                .handshake::<_, Bytes>(accepted.expect("accept").0),
        );
        let (conn, driven) = Connection::handshake(client.expect("connect"), 64 << 10)
            .await
            .expect("handshake");
        tokio::spawn(driven);
        let mut accepted = serve(server.await.expect("task").expect("server handshake"));
        let first = tokio::spawn(conn.clone().send(
            request(Method::GET),
            super::super::empty(),
            NO_WAIT,
        ));
        let (_req, mut respond) = accepted.recv().await.expect("request");
        // The response head comes after the peer's SETTINGS: its limit of 1 is known.
        let mut out = respond
            .send_response(Response::new(()), false)
            .expect("respond");
        let first = first.await.expect("task").expect("response");
        assert!(conn.is_full());
        let permits = Arc::new(());
        let held = Box::new(permits.clone()) as Permit;
        let waiting = tokio::spawn(conn.clone().send(
            request(Method::GET),
            super::super::empty(),
            Some(held),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(Arc::strong_count(&permits), 2, "waiting with a permit");
        out.send_data(Bytes::new(), true).expect("end");
        drop(first);
        let (_req, mut respond) = accepted.recv().await.expect("the waiting request");
        assert_eq!(
            Arc::strong_count(&permits),
            1,
            "the permit goes once the stream opens"
        );
        respond
            .send_response(Response::new(()), true)
            .expect("respond");
        waiting.await.expect("task").expect("response");
    }

    #[test]
    fn a_failed_body_resets_with_its_stream_reset_s_reason_else_cancel() {
        #[derive(Debug, thiserror::Error)]
        #[error("body failed")]
        struct Wrapped(#[source] h2::Error);
        let reset: BoxError = Box::new(Wrapped(h2::Error::from(Reason::REFUSED_STREAM)));
        assert_eq!(reset_reason(&*reset), Reason::REFUSED_STREAM);
        let other: BoxError = Box::new(std::io::Error::other("client gone"));
        assert_eq!(reset_reason(&*other), Reason::CANCEL);
    }

    #[test]
    fn content_length_is_read_only_when_the_fields_agree() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&headers), Some(12));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&headers), Some(12));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("13"));
        assert_eq!(content_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert_eq!(content_length(&headers), None);
    }

    #[test]
    fn a_known_length_is_sent_unless_zero_for_a_get() {
        let head = |method: Method| Request::builder().method(method).body(()).unwrap();
        let length = |method: Method, body: Body| {
            let (mut parts, ()) = head(method).into_parts();
            set_content_length(&mut parts, &body);
            parts.headers.get(header::CONTENT_LENGTH).cloned()
        };
        assert_eq!(length(Method::GET, super::super::empty()), None);
        assert_eq!(
            length(Method::POST, super::super::empty()),
            Some(HeaderValue::from_static("0"))
        );
        assert_eq!(
            length(Method::PUT, super::super::full("abc")),
            Some(HeaderValue::from_static("3"))
        );
    }
}

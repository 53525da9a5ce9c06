//! Plaintext HTTP/1.1 to an upstream, driven by the task of the request it carries.
//!
//! hyper's client gives every connection a task of its own and reaches it through channels: the
//! request crosses to that task, and the response head and each body chunk cross back, every
//! crossing a wakeup of the other task. In the sidecar's one hop that task was 39% of the
//! instructions per request (callgrind), and each pooled connection held hyper's read and write
//! buffers and request queue, about 33 KiB, idle or not. Here the request's own future writes the
//! request and reads the response head, and the response body reads the rest from the socket as
//! it is polled: an exchange is one state machine in the caller's task, and an idle connection
//! is its socket.
//!
//! What goes through hyper's client still: upgrades (`Connection: upgrade`, `CONNECT`), which
//! hand the connection over when the upstream switches protocols, and HTTP/1 over mTLS (see
//! [`super::Upstreams::send_h1_with`]).
//!
//! Framing follows RFC 9112 §6: a response to `HEAD`, a 204 and a 304 have no body; otherwise
//! `Transfer-Encoding` (chunked last, or else the body runs to the close), then
//! `Content-Length`, then the close. Interim responses (1xx but 101) are skipped. A response
//! with both `Transfer-Encoding` and `Content-Length`, or with differing or malformed lengths,
//! is refused, as RFC 9112 §6.3 allows, since a proxy that guessed could splice one response
//! into the next. A request's body is sent as its `Content-Length` says, else chunked; an
//! upstream that answers before the request's body is all sent gets the rest while its answer
//! is read, and the connection is then closed.
//!
//! This module must never put a connection back in use unless its last exchange ended exactly
//! at a message boundary (request and response complete, nothing unread, keep-alive), never
//! buffer a body whole, and never resend a request unless none of it was written, or it is an
//! idempotent request without a body that a reused connection closed on without a byte of
//! answer (RFC 9110 §9.2.2; the case of an upstream closing an idle connection just as a
//! request goes out on it).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::{Body, BoxError, Permit};

/// The largest response head read; a larger one is refused (twice what a client may send, as
/// hyper's own limit on the serving side is).
pub const MAX_RESPONSE_HEAD: usize = 2 * crate::serve::MAX_HEAD_BYTES;
/// The most header fields a response head may carry (hyper's default).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// The most trailer fields, and bytes of trailers, after a chunked body.
const MAX_TRAILERS: usize = 64;
const MAX_TRAILER_BYTES: usize = 16 << 10;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// What the first read of a response asks for: a whole head, and a small body with it.
const HEAD_READ: usize = 4 << 10;
/// What each read of a response body asks for when the buffer is full.
const BODY_READ: usize = 16 << 10;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 << 10;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before the response head was complete")]
    ClosedBeforeHead,
    #[error("the upstream closed the connection before the response body was complete")]
    ClosedInBody,
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed response head: status code {0}")]
    Status(u16),
    #[error("response to a request that asked for no upgrade switches protocols")]
    UnaskedUpgrade,
    #[error("response framing: {0}")]
    Framing(&'static str),
    #[error("chunked response body: {0}")]
    Chunked(&'static str),
    #[error("request body: {0}")]
    RequestBody(BoxError),
    #[error("request body {0} than its content-length")]
    RequestLength(&'static str),
    #[error("the request's framing is malformed or ambiguous")]
    RequestFraming,
}

/// An exchange that failed, with the request's body when the request may be sent again
/// elsewhere (its head is the caller's, lent to [`Connection::send`]).
#[derive(Debug)]
pub struct SendError {
    /// The body, when nothing of the request was written, or when the request is idempotent,
    /// has no body, and a reused connection closed without a byte of answer.
    pub body: Option<Body>,
    /// Whether any of the request was written.
    pub written: bool,
    pub error: Error,
}

/// A plaintext HTTP/1.1 connection to an upstream, between exchanges.
pub struct Connection {
    stream: TcpStream,
    /// The circuit breaker's permit for this connection, held as long as it is open.
    _permit: Option<Permit>,
    /// Whether it has carried an exchange.
    reused: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("stream", &self.stream)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn new(stream: TcpStream, permit: Option<Permit>) -> Connection {
        Connection {
            stream,
            _permit: permit,
            reused: false,
        }
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it nor
    /// sent anything unasked. No system call unless the socket reported readiness since the
    /// last read that emptied it (tokio clears readiness on a short read).
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness from the last response's read, or a close or stray bytes since: a read
            // tells which. Whatever it takes is lost, but then the connection is unusable anyway.
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Sends a request with the head `parts` (origin-form URI, `Host` set, no hop-by-hop
    /// headers) and `body`, and resolves to the response, whose body reads the rest of the
    /// exchange from the connection. The head is encoded at once and only lent: a caller that
    /// may send the request again keeps it, and gets the body back when that is allowed.
    pub fn send(self, parts: &Parts, body: Body) -> Exchange {
        let resendable = body.is_end_stream() && crate::resilience::is_idempotent(&parts.method);
        let head_request = parts.method == Method::HEAD;
        let writer = match Writer::new(parts, body) {
            Ok(writer) => writer,
            Err(error) => {
                return Exchange {
                    state: ExchangeState::Refused(error),
                };
            }
        };
        Exchange {
            state: ExchangeState::Sending(Box::new(Sending {
                conn: self,
                writer,
                write_error: None,
                answered: false,
                buf: BytesMut::new(),
                head_request,
                resendable,
            })),
        }
    }
}

/// How a request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body.
    Empty,
    /// `Content-Length`: the bytes still to send.
    Length(u64),
    Chunked,
    /// Chunked, and its last chunk written.
    Terminated,
}

/// The request's side of an exchange: what is encoded and not yet written, and the body still
/// to read from the client.
struct Writer {
    out: BytesMut,
    body: Option<Body>,
    framing: RequestFraming,
    written: bool,
}

impl Writer {
    /// Encodes the head and decides the body's framing.
    fn new(parts: &Parts, body: Body) -> Result<Writer, Error> {
        let declared = content_length(parts.headers.get_all(header::CONTENT_LENGTH))
            .map_err(|()| Error::RequestFraming)?;
        let chunked_header = parts.headers.contains_key(header::TRANSFER_ENCODING);
        // Both would let the upstream pick either framing (RFC 9112 §6.3); callers strip
        // `Transfer-Encoding` as hop-by-hop, so this is never sent.
        if chunked_header && declared.is_some() {
            return Err(Error::RequestFraming);
        }
        let (framing, add) = if chunked_header {
            (RequestFraming::Chunked, None)
        } else if let Some(n) = declared {
            (RequestFraming::Length(n), None)
        } else if body.is_end_stream() {
            // A server expects a body from these methods: say there is none.
            let payload = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            (RequestFraming::Empty, payload.then_some(Added::Length(0)))
        } else if let Some(n) = body.size_hint().exact() {
            (RequestFraming::Length(n), Some(Added::Length(n)))
        } else if matches!(parts.method, Method::GET | Method::HEAD) {
            // A body of unknown length that is most likely empty (an HTTP/2 client's GET that
            // ends its stream with an empty DATA frame): sent without one, as hyper's client
            // does, rather than chunked, which some servers refuse for these methods. A byte of
            // body fails the request.
            (RequestFraming::Empty, None)
        } else {
            (RequestFraming::Chunked, Some(Added::Chunked))
        };
        let mut out = BytesMut::new();
        encode_head(parts, add, &mut out);
        let framing = match framing {
            RequestFraming::Length(0) => RequestFraming::Empty,
            f => f,
        };
        // Nothing of an empty body is read: hyper's server answers a client's `Expect:
        // 100-continue` only when the body is polled.
        let body = (framing != RequestFraming::Empty || !body.is_end_stream()).then_some(body);
        Ok(Writer {
            out,
            body,
            framing,
            written: false,
        })
    }

    /// Writes what it can: `Ready(Ok)` once the whole request is written, `Pending` while the
    /// socket is full or the client's body has nothing yet.
    fn poll_write(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            while !self.out.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, &self.out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.out.advance(n);
                        self.written = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            // Frames that are ready are gathered into one write.
            let mut ended = false;
            while self.out.len() < WRITE_BATCH {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        encode_frame(&mut self.out, &mut self.framing, frame)?;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending if self.out.is_empty() => return Poll::Pending,
                    Poll::Pending => break,
                }
            }
            if ended {
                self.finish()?;
                self.body = None;
            }
        }
    }

    fn finish(&mut self) -> Result<(), Error> {
        match self.framing {
            RequestFraming::Length(0) | RequestFraming::Empty | RequestFraming::Terminated => {
                Ok(())
            }
            RequestFraming::Length(_) => Err(Error::RequestLength("shorter")),
            RequestFraming::Chunked => {
                self.out.extend_from_slice(b"0\r\n\r\n");
                self.framing = RequestFraming::Terminated;
                Ok(())
            }
        }
    }
}

/// Encodes one frame of a request's body.
fn encode_frame(
    out: &mut BytesMut,
    framing: &mut RequestFraming,
    frame: Frame<Bytes>,
) -> Result<(), Error> {
    match frame.into_data() {
        Ok(data) => match framing {
            RequestFraming::Length(left) => {
                let len = data.len() as u64;
                *left = left
                    .checked_sub(len)
                    .ok_or(Error::RequestLength("longer"))?;
                out.extend_from_slice(&data);
            }
            RequestFraming::Chunked if !data.is_empty() => {
                put_hex(out, data.len() as u64);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            RequestFraming::Chunked => {}
            RequestFraming::Empty | RequestFraming::Terminated if data.is_empty() => {}
            RequestFraming::Empty | RequestFraming::Terminated => {
                return Err(Error::RequestLength("longer"));
            }
        },
        Err(frame) => {
            // Trailers go out only with a chunked body; HTTP/1 has no place for them else.
            if let (Ok(trailers), RequestFraming::Chunked) = (frame.into_trailers(), *framing) {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    put_field(out, name, value);
                }
                out.extend_from_slice(b"\r\n");
                *framing = RequestFraming::Terminated;
            }
        }
    }
    Ok(())
}

/// A framing field an encoder adds to a message head.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Added {
    Length(u64),
    /// As a field line of its own: after other `Transfer-Encoding` lines, its value joins their
    /// list as the last coding (RFC 9110 §5.3).
    Chunked,
}

impl Added {
    pub(crate) fn put(self, out: &mut BytesMut) {
        match self {
            Added::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                put_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Added::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
}

fn encode_head(parts: &Parts, add: Option<Added>, out: &mut BytesMut) {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let method = parts.method.as_str();
    let fields: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    out.reserve(method.len() + path.len() + 12 + fields + 32 + 2);
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        put_field(out, name, value);
    }
    if let Some(add) = add {
        add.put(out);
    }
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(crate) fn put_hex(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the last coding a `Transfer-Encoding` value lists is chunked.
pub(crate) fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The value of a message's `Content-Length` fields: `None` without one; an error unless every
/// value (a field may list several, comma-separated) is the same decimal number.
pub(crate) fn content_length(values: header::GetAll<'_, HeaderValue>) -> Result<Option<u64>, ()> {
    values.into_iter().try_fold(None, |length, value| {
        with_content_length(length, value.as_bytes())
    })
}

/// The length found so far (`None` before the first field) with one more `Content-Length`
/// field's value: an error unless every value it lists is that same decimal number.
pub(crate) fn with_content_length(
    mut length: Option<u64>,
    value: &[u8],
) -> Result<Option<u64>, ()> {
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(());
        }
        length = Some(n);
    }
    Ok(length)
}

/// The request side of an exchange, until its response head is in.
pub struct Exchange {
    state: ExchangeState,
}

enum ExchangeState {
    /// Boxed: the future that awaits it is moved by value, and this is most of it.
    Sending(Box<Sending>),
    /// Refused before a byte was written (it cannot be sent as it is).
    Refused(Error),
    Done,
}

struct Sending {
    conn: Connection,
    writer: Writer,
    /// A write that failed: the upstream may still have answered, so the response is read
    /// before the error is reported.
    write_error: Option<Error>,
    /// Whether a byte of the response has arrived: then the request is not sent again.
    answered: bool,
    buf: BytesMut,
    head_request: bool,
    resendable: bool,
}

impl Future for Exchange {
    type Output = Result<Response<ResponseBody>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Taken out and put back while pending: the state is a box, so that is a pointer's move.
        match std::mem::replace(&mut self.state, ExchangeState::Done) {
            ExchangeState::Sending(mut sending) => match sending.poll_head(cx) {
                Poll::Pending => {
                    self.state = ExchangeState::Sending(sending);
                    Poll::Pending
                }
                Poll::Ready(Ok(head)) => Poll::Ready(Ok((*sending).into_response(head))),
                Poll::Ready(Err(error)) => Poll::Ready(Err((*sending).into_error(error))),
            },
            ExchangeState::Refused(error) => Poll::Ready(Err(SendError {
                body: None,
                written: false,
                error,
            })),
            ExchangeState::Done => Poll::Ready(Err(SendError {
                body: None,
                written: true,
                error: Error::Io(io::Error::other("exchange polled after it ended")),
            })),
        }
    }
}

/// A response head, parsed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: BodyFraming,
    keep_alive: bool,
}

impl Sending {
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        if self.write_error.is_none() && !self.writer_done() {
            match self.writer.poll_write(&mut self.conn.stream, cx) {
                Poll::Ready(Ok(())) => self.writer.body = None,
                // The socket failed after part of the request went out: the upstream may have
                // answered (and closed) before reading it all.
                Poll::Ready(Err(Error::Io(e))) if self.writer.written => {
                    self.write_error = Some(Error::Io(e));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        loop {
            if !self.buf.is_empty() {
                self.answered = true;
                match parse_head(&mut self.buf, self.head_request)? {
                    Parsed::Final(head) => return Poll::Ready(Ok(head)),
                    Parsed::Interim => continue,
                    Parsed::Partial if self.buf.len() >= MAX_RESPONSE_HEAD => {
                        return Poll::Ready(Err(Error::HeadTooLarge));
                    }
                    Parsed::Partial => {}
                }
            }
            let spare = self.buf.capacity() - self.buf.len();
            if spare == 0 {
                self.buf
                    .reserve(self.buf.len().clamp(HEAD_READ, MAX_RESPONSE_HEAD));
            }
            match poll_read_buf(Pin::new(&mut self.conn.stream), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self
                        .write_error
                        .take()
                        .unwrap_or(Error::ClosedBeforeHead)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.write_error.take().unwrap_or(Error::Io(e))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn writer_done(&self) -> bool {
        self.writer.body.is_none() && self.writer.out.is_empty()
    }

    fn into_response(self, head: Head) -> Response<ResponseBody> {
        let Sending {
            conn,
            writer,
            write_error,
            buf,
            ..
        } = self;
        let done = writer.body.is_none() && writer.out.is_empty();
        let writer = (!done && write_error.is_none()).then_some(writer);
        // A request not all written is finished while the response is read, but the connection
        // is not reused after.
        let keep_alive = head.keep_alive && write_error.is_none() && done;
        let mut body = ResponseBody {
            conn: Some(conn),
            buf,
            framing: head.framing,
            writer,
            keep_alive,
            reusable: false,
        };
        if body.framing == BodyFraming::Done {
            body.complete();
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        response
    }

    fn into_error(self, error: Error) -> SendError {
        let Sending {
            conn,
            writer,
            answered,
            resendable,
            ..
        } = self;
        let written = writer.written;
        let closed = matches!(&error, Error::ClosedBeforeHead)
            || matches!(&error, Error::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
            ));
        let again = !answered && (!written || (resendable && conn.reused && closed));
        SendError {
            body: again.then(|| writer.body.unwrap_or_else(super::empty)),
            written,
            error,
        }
    }
}

/// What a parse of the buffered bytes found.
enum Parsed {
    Final(Head),
    /// A 1xx response, skipped (removed from the buffer).
    Interim,
    Partial,
}

/// Parses a response head at the start of `buf`, removing it when complete.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, Error> {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        // A read may complete a head past the limit that the one before left unfinished.
        Ok(httparse::Status::Complete(len)) if len > MAX_RESPONSE_HEAD => {
            return Err(Error::HeadTooLarge);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(Error::Head(e)),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Status(code))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::UnaskedUpgrade);
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each field is in the head: the head becomes one `Bytes` that every value shares.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        // Within a head of at most MAX_RESPONSE_HEAD bytes.
        *span = (
            name as u32,
            field.name.len() as u32,
            value as u32,
            field.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    // Whether there is a Transfer-Encoding, and whether its last coding is chunked (the last
    // coding decides: chunked, or the body runs to the close).
    let mut coding: Option<bool> = None;
    // The Content-Length fields' value: none without one, an error when they are malformed or
    // disagree.
    let mut length = Ok(None);
    let mut close = false;
    let mut keep_alive_token = false;
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len as usize])
            .map_err(|_| Error::Head(httparse::Error::HeaderName))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
                .map_err(|_| Error::Head(httparse::Error::HeaderValue))?;
        if name == header::TRANSFER_ENCODING {
            coding = Some(last_coding_is_chunked(value.as_bytes()));
        } else if name == header::CONTENT_LENGTH {
            length = length.and_then(|l| with_content_length(l, value.as_bytes()));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = match (no_body, coding, length) {
        (true, _, _) => BodyFraming::Done,
        (false, Some(_), Ok(Some(_)) | Err(())) => {
            return Err(Error::Framing("both transfer-encoding and content-length"));
        }
        (false, Some(true), Ok(None)) => BodyFraming::Chunked(Chunk::Size),
        (false, Some(false), Ok(None)) | (false, None, Ok(None)) => BodyFraming::UntilClose,
        (false, None, Ok(Some(0))) => BodyFraming::Done,
        (false, None, Ok(Some(n))) => BodyFraming::Length(n),
        (false, None, Err(())) => return Err(Error::Framing("malformed content-length")),
    };
    // An HTTP/1.0 message has no Transfer-Encoding: its framing is faulty, and the connection is
    // closed after it (RFC 9112 §6.1).
    let keep_alive = !close
        && framing != BodyFraming::UntilClose
        && (version == Version::HTTP_11 || (keep_alive_token && coding.is_none()));
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Where a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    UntilClose,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data: the bytes still to come.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// A response body, read from the connection as it is polled. Once it is complete,
/// [`ResponseBody::take_reusable`] gives the connection back if it can carry another exchange.
pub struct ResponseBody {
    conn: Option<Connection>,
    buf: BytesMut,
    framing: BodyFraming,
    /// The rest of a request the upstream answered before it was all sent.
    writer: Option<Writer>,
    keep_alive: bool,
    reusable: bool,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("framing", &self.framing)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// The connection, once the body is complete and the connection can carry another
    /// exchange.
    pub fn take_reusable(&mut self) -> Option<Connection> {
        if !self.reusable {
            return None;
        }
        self.reusable = false;
        let mut conn = self.conn.take()?;
        conn.reused = true;
        Some(conn)
    }

    /// The body is complete: the connection stays for reuse only at a clean message boundary.
    fn complete(&mut self) {
        self.framing = BodyFraming::Done;
        self.reusable = self.keep_alive && self.writer.is_none() && self.buf.is_empty();
        // The buffer's memory goes with the frames already handed out; an idle connection holds
        // none.
        self.buf = BytesMut::new();
        if !self.reusable {
            self.conn = None;
        }
    }

    /// Reads more into the buffer: `Ready(Ok(false))` at the upstream's close.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<bool, Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(want.clamp(1, BODY_READ));
        }
        let n = ready!(poll_read_buf(Pin::new(&mut conn.stream), cx, &mut self.buf))?;
        Poll::Ready(Ok(n > 0))
    }

    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        chunk: Chunk,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut chunk = chunk;
        loop {
            match chunk {
                Chunk::Size => match chunk_size(&self.buf) {
                    Ok(Some((line, size))) => {
                        self.buf.advance(line);
                        chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                        self.framing = BodyFraming::Chunked(chunk);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(Error::Chunked(e)))),
                },
                Chunk::Data(left) => {
                    if !self.buf.is_empty() {
                        let n = left.min(self.buf.len() as u64);
                        let data = self.buf.split_to(n as usize).freeze();
                        let left = left - n;
                        self.framing = BodyFraming::Chunked(if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        });
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Chunk::DataEnd => {
                    if self.buf.len() >= 2 {
                        if &self.buf[..2] != b"\r\n" {
                            return Poll::Ready(Some(Err(Error::Chunked(
                                "chunk data not followed by CRLF",
                            ))));
                        }
                        self.buf.advance(2);
                        chunk = Chunk::Size;
                        self.framing = BodyFraming::Chunked(chunk);
                        continue;
                    }
                }
                Chunk::Trailers => {
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.advance(2);
                        self.complete();
                        return Poll::Ready(None);
                    }
                    if !self.buf.is_empty() {
                        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                        match httparse::parse_headers(&self.buf, &mut fields) {
                            Ok(httparse::Status::Complete((len, fields))) => {
                                let mut trailers = HeaderMap::with_capacity(fields.len());
                                for field in fields {
                                    let (Ok(name), Ok(value)) = (
                                        HeaderName::from_bytes(field.name.as_bytes()),
                                        HeaderValue::from_bytes(field.value),
                                    ) else {
                                        return Poll::Ready(Some(Err(Error::Chunked(
                                            "malformed trailer field",
                                        ))));
                                    };
                                    trailers.append(name, value);
                                }
                                self.buf.advance(len);
                                self.complete();
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                            Ok(httparse::Status::Partial) => {}
                            Err(_) => {
                                return Poll::Ready(Some(Err(Error::Chunked(
                                    "malformed trailer section",
                                ))));
                            }
                        }
                    }
                    if self.buf.len() > MAX_TRAILER_BYTES {
                        return Poll::Ready(Some(Err(Error::Chunked("trailers too large"))));
                    }
                }
            }
            let want = match chunk {
                Chunk::Data(left) => usize::try_from(left).unwrap_or(BODY_READ),
                _ => HEAD_READ,
            };
            match self.poll_fill(cx, want) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => return Poll::Ready(Some(Err(Error::ClosedInBody))),
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Parses a chunk-size line at the start of `buf`: its length (CRLF included) and the size.
/// `Ok(None)` when it is not all there yet.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_CHUNK_LINE {
            Err("chunk-size line too long")
        } else {
            Ok(None)
        };
    };
    if end > MAX_CHUNK_LINE {
        return Err("chunk-size line too long");
    }
    let line = buf[..end]
        .strip_suffix(b"\r")
        .ok_or("chunk-size line not ended by CRLF")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("chunk size missing");
    }
    if digits > 16 {
        return Err("chunk size too large");
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        (n << 4) | u64::from(v)
    });
    // Extensions (`;name=value`, after optional whitespace) are ignored, but must be text.
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty()
        && (rest[0] != b';' || rest.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)))
    {
        return Err("malformed chunk extension");
    }
    Ok(Some((end + 1, size)))
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        // The rest of a request the upstream answered early; failing to send it only keeps the
        // connection from being reused.
        if let (Some(writer), Some(conn)) = (this.writer.as_mut(), this.conn.as_mut()) {
            match writer.poll_write(&mut conn.stream, cx) {
                Poll::Ready(_) => this.writer = None,
                Poll::Pending => {}
            }
            this.keep_alive = false;
        }
        loop {
            match this.framing {
                BodyFraming::Done => return Poll::Ready(None),
                BodyFraming::Length(left) => {
                    if this.buf.is_empty() {
                        let want = usize::try_from(left).unwrap_or(BODY_READ);
                        match ready!(this.poll_fill(cx, want)) {
                            Ok(true) => continue,
                            Ok(false) => {
                                this.conn = None;
                                this.framing = BodyFraming::Done;
                                return Poll::Ready(Some(Err(Error::ClosedInBody)));
                            }
                            Err(e) => {
                                this.conn = None;
                                this.framing = BodyFraming::Done;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                    let n = left.min(this.buf.len() as u64);
                    let data = this.buf.split_to(n as usize).freeze();
                    this.framing = BodyFraming::Length(left - n);
                    if left == n {
                        this.complete();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyFraming::Chunked(chunk) => {
                    let polled = this.poll_chunked(cx, chunk);
                    if let Poll::Ready(Some(Err(_))) = &polled {
                        this.conn = None;
                        this.framing = BodyFraming::Done;
                    }
                    return polled;
                }
                BodyFraming::UntilClose => {
                    if !this.buf.is_empty() {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx, BODY_READ)) {
                        Ok(true) => continue,
                        Ok(false) => {
                            this.complete();
                            return Poll::Ready(None);
                        }
                        Err(e) => {
                            this.conn = None;
                            this.framing = BodyFraming::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == BodyFraming::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            BodyFraming::Done => SizeHint::with_exact(0),
            BodyFraming::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Request;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connection to a scripted upstream: the proxy's side, and the upstream's socket.
    async fn connected() -> (Connection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            Connection::new(client.expect("connect"), None),
            accepted.expect("accept").0,
        )
    }

    /// What the upstream received up to the end of a request head.
    async fn read_head(upstream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = upstream.read(&mut byte).await.expect("read");
            assert_eq!(n, 1, "closed inside a request head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8(head).expect("utf-8")
    }

    fn request(method: Method, path: &str, body: Body) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "svc")
            .body(body)
            .expect("request")
    }

    fn get(path: &str) -> Request<Body> {
        request(Method::GET, path, super::super::empty())
    }

    /// [`Connection::send`] with a whole request, whose head the exchange's caller holds.
    async fn send(
        conn: Connection,
        req: Request<Body>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let (parts, body) = req.into_parts();
        conn.send(&parts, body).await
    }

    /// A request body of known length.
    fn full(data: &'static [u8]) -> Body {
        Full::new(Bytes::from_static(data))
            .map_err(|e| match e {})
            .boxed_unsync()
    }

    /// A request body of unknown length: one data frame.
    fn streamed(data: &'static [u8]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(data)))];
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    /// Sends `req` on `conn` while the upstream reads its head and answers `answer`.
    async fn exchange(
        conn: Connection,
        upstream: &mut TcpStream,
        req: Request<Body>,
        answer: &[u8],
    ) -> (String, Result<Response<ResponseBody>, SendError>) {
        let served = async {
            let head = read_head(upstream).await;
            upstream.write_all(answer).await.expect("answer");
            head
        };
        let (head, response) = tokio::join!(served, send(conn, req));
        (head, response)
    }

    /// Reads a body to its end as hyper's server does: it stops at `is_end_stream`.
    async fn read_body(body: &mut ResponseBody) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while !body.is_end_stream() {
            match std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
                Some(frame) => match frame?.into_data() {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                None => break,
            }
        }
        Ok((data, trailers))
    }

    #[tokio::test]
    async fn a_response_with_a_length_is_read_and_its_connection_reused() {
        let (conn, mut upstream) = connected().await;
        let (head, response) = exchange(
            conn,
            &mut upstream,
            get("/articles/1?full=yes"),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Served-By: a\r\n\r\nhello",
        )
        .await;
        assert_eq!(
            head,
            "GET /articles/1?full=yes HTTP/1.1\r\nhost: svc\r\n\r\n"
        );
        let mut response = response.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_11);
        assert_eq!(response.headers()["x-served-by"], "a");
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let (data, _) = read_body(response.body_mut()).await.expect("body");
        assert_eq!(data, b"hello");
        let conn = response.body_mut().take_reusable().expect("reusable");
        assert!(conn.is_usable());
        // The same connection carries the next exchange.
        let (_, response) = exchange(
            conn,
            &mut upstream,
            get("/2"),
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let mut response = response.expect("second response");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.body().is_end_stream());
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_its_trailers() {
        let (conn, mut upstream) = connected().await;
        let (_, response) = exchange(
            conn,
            &mut upstream,
            get("/"),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              5;name=value\r\nhello\r\nA \r\n, world!!!\r\n0\r\nx-checksum: 7\r\n\r\n",
        )
        .await;
        let mut response = response.expect("response");
        let (data, trailers) = read_body(response.body_mut()).await.expect("body");
        assert_eq!(data, b"hello, world!!!");
        assert_eq!(trailers.expect("trailers")["x-checksum"], "7");
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_body_arriving_in_pieces_is_decoded() {
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
            for piece in [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3"[..],
                b"\r\nab",
                b"c\r",
                b"\n0\r",
                b"\n\r",
                b"\n",
            ] {
                upstream.write_all(piece).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let read = async {
            let mut response = send(conn, get("/")).await.expect("response");
            let body = read_body(response.body_mut()).await;
            (body, response.body_mut().take_reusable().is_some())
        };
        let ((), (body, reusable)) = tokio::join!(served, read);
        assert_eq!(body.expect("body").0, b"abc");
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_body_without_a_length_runs_to_the_close_and_ends_the_connection() {
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil ")
                .await
                .expect("write");
            upstream.write_all(b"the close").await.expect("write");
            drop(upstream);
        };
        let read = async {
            let mut response = send(conn, get("/")).await.expect("response");
            let body = read_body(response.body_mut()).await;
            (body, response.body_mut().take_reusable().is_some())
        };
        let ((), (body, reusable)) = tokio::join!(served, read);
        assert_eq!(body.expect("body").0, b"until the close");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn responses_that_have_no_body_end_at_their_head() {
        for (method, answer) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..],
            ),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            // What a GET would have had: no body to frame, so no ambiguity.
            (
                Method::HEAD,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 10\r\n\r\n",
            ),
        ] {
            let (conn, mut upstream) = connected().await;
            let req = request(method.clone(), "/", super::super::empty());
            let (_, response) = exchange(conn, &mut upstream, req, answer).await;
            let mut response = response.expect("response");
            assert!(response.body().is_end_stream(), "{method} {answer:?}");
            assert!(
                response.body_mut().take_reusable().is_some(),
                "{method} {answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (conn, mut upstream) = connected().await;
        let (_, response) = exchange(
            conn,
            &mut upstream,
            get("/"),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        let mut response = response.expect("response");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.headers().get("link").is_none());
        assert_eq!(read_body(response.body_mut()).await.expect("body").0, b"ok");
        // An interim response is an answer: a close after it does not give the request back.
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .expect("write");
            drop(upstream);
        };
        let ((), response) = tokio::join!(served, send(conn, get("/")));
        let error = response.expect_err("closed");
        assert!(matches!(error.error, Error::ClosedBeforeHead));
        assert!(error.body.is_none());
    }

    /// The last transfer coding decides, over all the fields: chunked, or the body runs to the
    /// close.
    #[tokio::test]
    async fn the_last_transfer_coding_decides_the_framing() {
        for (codings, chunked) in [
            (
                &b"transfer-encoding: gzip\r\ntransfer-encoding: chunked"[..],
                true,
            ),
            (
                b"transfer-encoding: chunked\r\ntransfer-encoding: gzip",
                false,
            ),
            (b"transfer-encoding: chunked, gzip", false),
        ] {
            let (conn, mut upstream) = connected().await;
            let body: &[u8] = if chunked {
                b"2\r\nok\r\n0\r\n\r\n"
            } else {
                b"ok"
            };
            let served = async {
                read_head(&mut upstream).await;
                let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
                answer.extend_from_slice(codings);
                answer.extend_from_slice(b"\r\n\r\n");
                answer.extend_from_slice(body);
                upstream.write_all(&answer).await.expect("write");
                // Kept open when chunked: the body ends without the close.
                if chunked {
                    Some(upstream)
                } else {
                    drop(upstream);
                    None
                }
            };
            let read = async {
                let mut response = send(conn, get("/")).await.expect("response");
                let body = read_body(response.body_mut()).await;
                (body, response.body_mut().take_reusable().is_some())
            };
            let (_upstream, (body, reusable)) = tokio::join!(served, read);
            assert_eq!(body.expect("body").0, b"ok", "{codings:?}");
            assert_eq!(reusable, chunked, "{codings:?}");
        }
    }

    #[tokio::test]
    async fn ambiguous_or_malformed_framing_is_refused() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ] {
            let (conn, mut upstream) = connected().await;
            let (_, response) = exchange(conn, &mut upstream, get("/"), answer).await;
            let error = response.expect_err("refused").error;
            assert!(matches!(error, Error::Framing(_)), "{answer:?}: {error}");
        }
        // The same length said twice is one length.
        let (conn, mut upstream) = connected().await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok";
        let (_, response) = exchange(conn, &mut upstream, get("/"), answer).await;
        let mut response = response.expect("response");
        assert_eq!(read_body(response.body_mut()).await.expect("body").0, b"ok");
    }

    #[tokio::test]
    async fn malformed_heads_are_refused_and_say_why() {
        for (answer, says) in [
            (&b"HTTP/1.1 2x0 OK\r\n\r\n"[..], "malformed response head"),
            (b"SMTP ready\r\n\r\n", "malformed response head"),
            (
                b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "malformed response head",
            ),
            (b"HTTP/1.1 099 Low\r\n\r\n", "status code 99"),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "switches protocols",
            ),
        ] {
            let (conn, mut upstream) = connected().await;
            let (_, response) = exchange(conn, &mut upstream, get("/"), answer).await;
            let error = response.expect_err("refused");
            assert!(error.written);
            assert!(error.body.is_none());
            assert!(
                error.error.to_string().contains(says),
                "{answer:?}: {}",
                error.error
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (conn, mut upstream) = connected().await;
        let mut answer = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        answer.resize(answer.len() + MAX_RESPONSE_HEAD + 10, b'a');
        let served = async {
            read_head(&mut upstream).await;
            // The proxy stops reading, so the write may not finish.
            let _ = tokio::time::timeout(Duration::from_secs(2), upstream.write_all(&answer)).await;
        };
        let ((), response) = tokio::join!(served, send(conn, get("/")));
        assert!(matches!(
            response.expect_err("refused").error,
            Error::HeadTooLarge
        ));
    }

    /// However the bytes arrive: one read may complete a head that the one before left
    /// unfinished under the limit.
    #[test]
    fn a_complete_head_over_the_limit_is_refused() {
        let mut head = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        head.resize(MAX_RESPONSE_HEAD + 10, b'a');
        head.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        let mut buf = BytesMut::from(&head[..]);
        assert!(matches!(
            parse_head(&mut buf, false),
            Err(Error::HeadTooLarge)
        ));
        // At the limit, it is taken.
        let mut head = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        let tail = b"\r\ncontent-length: 0\r\n\r\n";
        head.resize(MAX_RESPONSE_HEAD - tail.len(), b'a');
        head.extend_from_slice(tail);
        let mut buf = BytesMut::from(&head[..]);
        assert!(matches!(parse_head(&mut buf, false), Ok(Parsed::Final(_))));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn too_many_header_fields_are_refused() {
        let (conn, mut upstream) = connected().await;
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RESPONSE_HEADERS {
            answer.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        answer.extend_from_slice(b"\r\n");
        let (_, response) = exchange(conn, &mut upstream, get("/"), &answer).await;
        assert!(matches!(
            response.expect_err("refused").error,
            Error::Head(httparse::Error::TooManyHeaders)
        ));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_ends_the_connection() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n",
        ] {
            let (conn, mut upstream) = connected().await;
            let served = async {
                read_head(&mut upstream).await;
                upstream.write_all(answer).await.expect("write");
                drop(upstream);
            };
            let read = async {
                let mut response = send(conn, get("/")).await.expect("response");
                let body = read_body(response.body_mut()).await;
                (body, response.body_mut().take_reusable().is_some())
            };
            let ((), (body, reusable)) = tokio::join!(served, read);
            assert!(
                matches!(body, Err(Error::ClosedInBody)),
                "{answer:?}: {body:?}"
            );
            assert!(!reusable);
        }
    }

    #[tokio::test]
    async fn malformed_chunks_are_refused() {
        for (answer, says) in [
            (&b"zz\r\n"[..], "chunk size missing"),
            (b"5\r\nhelloXX", "not followed by CRLF"),
            (b"5\nhello\r\n0\r\n\r\n", "not ended by CRLF"),
            (b"5 x\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"11111111111111111\r\n", "chunk size too large"),
            (b"0\r\nbad trailer\r\n\r\n", "malformed trailer section"),
        ] {
            let (conn, mut upstream) = connected().await;
            let mut whole = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            whole.extend_from_slice(answer);
            let (_, response) = exchange(conn, &mut upstream, get("/"), &whole).await;
            let mut response = response.expect("response");
            let body = read_body(response.body_mut()).await;
            match body {
                Err(Error::Chunked(e)) => assert!(e.contains(says), "{answer:?}: {e}"),
                other => panic!("{answer:?}: {other:?}"),
            }
            assert!(response.body_mut().take_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn connections_the_upstream_means_to_close_are_not_reused() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            // HTTP/1.0 has no transfer codings: the framing is faulty (RFC 9112 §6.1).
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
            // Bytes past the response: the upstream is out of step with the requests.
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ] {
            let (conn, mut upstream) = connected().await;
            let (_, response) = exchange(conn, &mut upstream, get("/"), answer).await;
            let mut response = response.expect("response");
            assert_eq!(read_body(response.body_mut()).await.expect("body").0, b"ok");
            assert!(response.body_mut().take_reusable().is_none(), "{answer:?}");
        }
        // HTTP/1.0 that asks to be kept alive is.
        let (conn, mut upstream) = connected().await;
        let answer = b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok";
        let (_, response) = exchange(conn, &mut upstream, get("/"), answer).await;
        let mut response = response.expect("response");
        assert_eq!(response.version(), Version::HTTP_10);
        read_body(response.body_mut()).await.expect("body");
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn a_request_body_is_sent_with_its_length_or_chunked() {
        // A body of known size: content-length.
        let (conn, mut upstream) = connected().await;
        let body = full(b"{\"a\":1}");
        let served = async {
            let head = read_head(&mut upstream).await;
            let mut body = [0u8; 7];
            upstream.read_exact(&mut body).await.expect("body");
            upstream
                .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("answer");
            (head, body)
        };
        let ((head, body), response) =
            tokio::join!(served, send(conn, request(Method::POST, "/items", body)));
        assert_eq!(
            head,
            "POST /items HTTP/1.1\r\nhost: svc\r\ncontent-length: 7\r\n\r\n"
        );
        assert_eq!(&body, b"{\"a\":1}");
        let mut response = response.expect("response");
        assert!(response.body_mut().take_reusable().is_some());

        // A body of unknown size, with trailers: chunked.
        let (conn, mut upstream) = connected().await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("3"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"c"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let expected = "PUT /items/1 HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n\
                        2\r\nab\r\n1\r\nc\r\n0\r\nx-sum: 3\r\n\r\n";
        let served = async {
            let mut sent = vec![0u8; expected.len()];
            upstream.read_exact(&mut sent).await.expect("request");
            upstream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("answer");
            String::from_utf8(sent).expect("utf-8")
        };
        let (sent, response) =
            tokio::join!(served, send(conn, request(Method::PUT, "/items/1", body)));
        assert_eq!(sent, expected);
        let mut response = response.expect("response");
        assert!(response.body_mut().take_reusable().is_some());
    }

    /// A request without body bytes says so as servers expect: an empty POST with
    /// `content-length: 0`; a GET or HEAD whose body's length is unknown (an HTTP/2 client's GET
    /// that ends its stream with an empty DATA frame) with no framing at all, as hyper's client
    /// sends it, not chunked. A byte of body fails such a GET.
    #[tokio::test]
    async fn requests_without_a_body_say_so_as_servers_expect() {
        for (req, expected) in [
            (
                request(Method::POST, "/ping", super::super::empty()),
                "POST /ping HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                request(Method::GET, "/", streamed(b"")),
                "GET / HTTP/1.1\r\nhost: svc\r\n\r\n",
            ),
            (
                request(Method::HEAD, "/", streamed(b"")),
                "HEAD / HTTP/1.1\r\nhost: svc\r\n\r\n",
            ),
        ] {
            let (conn, mut upstream) = connected().await;
            let (head, response) = exchange(
                conn,
                &mut upstream,
                req,
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            )
            .await;
            assert_eq!(head, expected);
            let mut response = response.expect("response");
            assert!(response.body_mut().take_reusable().is_some(), "{expected}");
        }
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
        };
        let req = request(Method::GET, "/", streamed(b"x"));
        let ((), response) = tokio::join!(served, send(conn, req));
        assert!(matches!(
            response.expect_err("refused").error,
            Error::RequestLength("longer")
        ));
    }

    #[tokio::test]
    async fn a_request_body_unlike_its_length_is_an_error() {
        for (data, length, says) in [(&b"abc"[..], "2", "longer"), (b"ab", "5", "shorter")] {
            let (conn, mut upstream) = connected().await;
            let mut req = request(Method::POST, "/", full(data));
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static(length));
            let served = async {
                read_head(&mut upstream).await;
            };
            // Bounded: the upstream never answers, so a request sent as if whole would wait.
            let sent = tokio::time::timeout(Duration::from_secs(10), send(conn, req));
            let ((), response) = tokio::join!(served, sent);
            let error = response
                .expect("refused in time")
                .expect_err("refused")
                .error;
            assert!(
                matches!(error, Error::RequestLength(s) if s == says),
                "{data:?}: {error}"
            );
        }
    }

    /// An exchange dropped while it waits for its answer (the client went away, or a timeout
    /// fired) closes its connection: nothing else can read the answer meant for it.
    #[tokio::test]
    async fn a_dropped_exchange_closes_its_connection() {
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
        };
        let (_, waited) = tokio::join!(
            served,
            tokio::time::timeout(Duration::from_millis(100), send(conn, get("/")))
        );
        assert!(waited.is_err(), "no answer came");
        let mut rest = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), upstream.read(&mut rest)).await;
        assert_eq!(read.expect("closed in time").expect("read"), 0);
    }

    #[tokio::test]
    async fn an_early_answer_is_read_while_the_request_body_is_still_coming() {
        let (conn, mut upstream) = connected().await;
        // A client that sends part of its body and then nothing more.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("send");
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync();
        let mut req = request(Method::POST, "/upload", body);
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        let served = async {
            read_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
                .await
                .expect("answer");
        };
        let ((), response) = tokio::join!(served, send(conn, req));
        let mut response = response.expect("the early answer");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            read_body(response.body_mut()).await.expect("body").0,
            b"big"
        );
        assert!(
            response.body_mut().take_reusable().is_none(),
            "a connection with a request half sent is not reused"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_usable() {
        let (conn, upstream) = connected().await;
        assert!(conn.is_usable());
        drop(upstream);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while conn.is_usable() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!conn.is_usable());
        // Unasked bytes make a connection unusable too.
        let (conn, mut upstream) = connected().await;
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .expect("write");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while conn.is_usable() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!conn.is_usable());
    }

    /// A connection that has carried one exchange, and its upstream's side.
    async fn reused() -> (Connection, TcpStream) {
        let (conn, mut upstream) = connected().await;
        let (_, response) = exchange(
            conn,
            &mut upstream,
            get("/"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let conn = response
            .expect("first")
            .body_mut()
            .take_reusable()
            .expect("reusable");
        (conn, upstream)
    }

    /// The upstream closes a reused connection as the request goes out on it: an idempotent
    /// request without a body comes back to be sent again; anything else does not (a PUT's
    /// body is gone).
    #[tokio::test]
    async fn a_reused_connection_closed_without_an_answer_gives_back_only_safe_requests() {
        for (req, resend) in [
            (get("/"), true),
            (request(Method::POST, "/", super::super::empty()), false),
            (request(Method::PUT, "/", full(b"{}")), false),
        ] {
            let (conn, mut upstream) = reused().await;
            let method = req.method().clone();
            let served = async {
                read_head(&mut upstream).await;
                drop(upstream);
            };
            let ((), response) = tokio::join!(served, send(conn, req));
            let error = response.expect_err("closed");
            assert!(error.written);
            assert_eq!(error.body.is_some(), resend);
            // The PUT's body may meet the close as a reset instead.
            if method != Method::PUT {
                assert!(matches!(error.error, Error::ClosedBeforeHead), "{error:?}");
            }
        }
        // On a new connection, nothing comes back: the upstream saw the request.
        let (conn, mut upstream) = connected().await;
        let served = async {
            read_head(&mut upstream).await;
            drop(upstream);
        };
        let ((), response) = tokio::join!(served, send(conn, get("/")));
        assert!(response.expect_err("closed").body.is_none());
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1a\r\n"), Ok(Some((4, 26))));
        assert_eq!(chunk_size(b"FF ; a=b\r\nrest"), Ok(Some((10, 255))));
        assert_eq!(chunk_size(b"0\r\n\r\n"), Ok(Some((3, 0))));
        assert_eq!(
            chunk_size(b"ffffffffffffffff\r\n"),
            Ok(Some((18, u64::MAX)))
        );
        assert_eq!(chunk_size(b"1a"), Ok(None));
        assert_eq!(chunk_size(b"1a\r"), Ok(None));
        assert!(chunk_size(b";a\r\n").is_err());
        assert!(chunk_size(b"1a;\x01\r\n").is_err());
        assert!(chunk_size(&[b'1'; MAX_CHUNK_LINE + 1]).is_err());
    }

    #[test]
    fn content_lengths() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            content_length(headers.get_all(header::CONTENT_LENGTH)),
            Ok(None)
        );
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(
            content_length(headers.get_all(header::CONTENT_LENGTH)),
            Ok(Some(42))
        );
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static(" 42 ,42"));
        assert_eq!(
            content_length(headers.get_all(header::CONTENT_LENGTH)),
            Ok(Some(42))
        );
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("43"));
        assert!(content_length(headers.get_all(header::CONTENT_LENGTH)).is_err());
    }

    #[test]
    fn numbers_are_written_in_decimal_and_hex() {
        let mut out = BytesMut::new();
        put_decimal(&mut out, 0);
        out.extend_from_slice(b" ");
        put_decimal(&mut out, 1_234_567_890_123);
        out.extend_from_slice(b" ");
        put_hex(&mut out, 0);
        out.extend_from_slice(b" ");
        put_hex(&mut out, 0xbeef);
        out.extend_from_slice(b" ");
        put_hex(&mut out, u64::MAX);
        assert_eq!(&out[..], b"0 1234567890123 0 beef ffffffffffffffff");
    }
}

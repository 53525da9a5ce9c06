//! HTTP/1 from clients: requests without a body or with a small one served in the connection's
//! own future, the rest by hyper's server.
//!
//! hyper's server runs every request through a dispatcher built for every case (streamed request
//! bodies, `Expect`, upgrades, half-closes) and encodes each response with checks of its own: in
//! the sidecar's one hop, that was a third of the instructions per request (callgrind). Most
//! requests in a mesh are a head and nothing more, or a head and a small body. A request that is
//! HTTP/1.1, with no `Expect` and no upgrade (`CONNECT`, `Upgrade`, `Connection: upgrade`), and
//! with no body or one of at most [`SMALL_BODY`] bytes by `Content-Length` (no
//! `Transfer-Encoding`), is parsed with httparse once its head and body are whole in what was
//! read, answered, and its response encoded and written here, head and body in one write when the
//! body is ready. A small body is read whole before the request goes on, as nginx reads a request
//! body into its buffer before it sends it upstream (`client_body_buffer_size`, 16 KiB, and
//! `proxy_request_buffering`, on): the upstream gets it in one write, and a retry has it at hand.
//! The head's timeout covers that body too.
//!
//! The first request that is anything else, and any head that httparse refuses or that outgrows
//! the limits, hands the connection, with what was read of it, to hyper's server for the rest of
//! its life ([`super::serve_hyper_http1`]): chunked bodies and longer ones (streamed, with no
//! timeout of their own), `Expect: 100-continue`, upgrades, HTTP/1.0, and the bare 400 and 431
//! answers are hyper's. So is a `Content-Length` that lists values (`5, 5`), which hyper's
//! server refuses, as it does repeated fields that disagree.
//!
//! The rules kept here are hyper's server's: a response to `HEAD`, a 1xx, a 204 and a 304 carry
//! no body; otherwise its `Content-Length`, else the body's exact length, else chunked (trailers
//! only to a client that sent `TE: trailers`); a `Date` when the response has none; and
//! `Connection: close` on the last response of a connection, which is one the client asked to
//! close, one the response itself closes, or one answered while draining. A response body that
//! fails, or ends short of or runs past its length, closes the connection. Timeouts are as
//! [`super::serve_http`] says.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{Drain, HYPER_MAX_HEAD_BYTES, MAX_HEADERS, answer_raw};
use crate::pool::http1::{
    Added, has_token, last_coding_is_chunked, put_field, put_hex, with_content_length,
};
use crate::pool::{self, Body};

/// The least room a read is given in the connection's buffer.
const READ_ROOM: usize = 4 << 10;
/// The longest request body read whole with its head and served here; a longer one goes to
/// hyper's server, which streams it.
pub(super) const SMALL_BODY: usize = 16 << 10;
/// Response bytes gathered before a write; a data frame at least this large is written from
/// where it is rather than copied behind the head.
const WRITE_BATCH: usize = 16 << 10;

/// What a request's response needs to know of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Meta {
    /// The client asked to close after this request (`Connection: close`).
    close: bool,
    /// A `HEAD` request: its response has no body.
    head: bool,
    /// The client takes trailers (`TE: trailers`).
    trailers: bool,
}

#[allow(
    clippy::large_enum_variant,
    reason = "returned once per request and taken apart at once; a box would be an allocation"
)]
enum Head {
    Parsed(Request<Body>, Meta),
    /// Not all of it is here yet.
    Partial,
    /// The head is whole, its small body not yet: parse again once `buf` holds this many bytes.
    Body(usize),
    /// Not for this module: hyper's server takes the connection.
    Hyper,
    /// Passed by httparse, refused by `http`'s types.
    Bad,
}

/// Serves an HTTP/1 connection; see the module's documentation.
///
/// Not an `async fn`: one would hold `stream` twice, as its argument and as the local it is
/// served from (1208 bytes each over mTLS, `-Zprint-type-sizes`).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` would hold its stream argument twice"
)]
pub(super) fn serve<S, F, Fut>(
    mut stream: S,
    head_timeout: Duration,
    drain: Drain,
    handler: F,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    async move {
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        // One timer for the connection, moved only when it fires before the head's deadline: a
        // request costs a clock read, not a timer of its own.
        let mut deadline = Instant::now() + head_timeout;
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        let mut watch = drain.clone();
        let signaled = watch.signaled();
        tokio::pin!(signaled);
        let mut drained = false;
        // How much of `buf` is known to hold no complete head: a head arriving in pieces is parsed
        // again only once a piece brings a blank line, so a client that sends it a byte at a time
        // costs time in its length, not in its square.
        let mut searched = 0;
        // What `buf` must hold before the request at its start is parsed again: its head and
        // its small body.
        let mut need = 0;
        loop {
            let (request, meta) = loop {
                if !buf.is_empty() {
                    // Decided in a block of its own, so that the head (248 bytes) is not laid
                    // out across the awaits below.
                    let hand_over = if buf.len() < need {
                        None
                    } else {
                        let head = if searched == 0 || head_ends_after(&buf, searched) {
                            parse(&mut buf)
                        } else {
                            Head::Partial
                        };
                        match head {
                            Head::Parsed(request, meta) => {
                                searched = 0;
                                need = 0;
                                break (request, meta);
                            }
                            Head::Body(whole) => {
                                searched = 0;
                                need = whole;
                                None
                            }
                            Head::Partial if buf.len() < HYPER_MAX_HEAD_BYTES => {
                                searched = buf.len();
                                None
                            }
                            Head::Bad => Some(false),
                            Head::Partial | Head::Hyper => Some(true),
                        }
                    };
                    match hand_over {
                        None => {}
                        Some(false) => {
                            // Boxed, as the 408 below.
                            Box::pin(answer_raw(
                                stream,
                                StatusCode::BAD_REQUEST,
                                "bad-request",
                                None,
                            ))
                            .await;
                            return;
                        }
                        Some(true) => {
                            let io = Rewind {
                                read: buf.freeze(),
                                io: stream,
                            };
                            Box::pin(super::serve_hyper_http1(io, head_timeout, drain, handler))
                                .await;
                            return;
                        }
                    }
                } else if drained {
                    let _ = stream.shutdown().await;
                    return;
                }
                let room = READ_ROOM.max(need.saturating_sub(buf.len()));
                if buf.capacity() - buf.len() < room {
                    buf.reserve(room);
                }
                tokio::select! {
                    biased;
                    read = stream.read_buf(&mut buf) => match read {
                        Ok(0) => {
                            // The client is done: so is the connection, as hyper closes it.
                            let _ = stream.shutdown().await;
                            return;
                        }
                        Err(_) => return,
                        Ok(_) => {}
                    },
                    () = &mut sleep => {
                        if Instant::now() < deadline {
                            sleep.as_mut().reset(deadline);
                            continue;
                        }
                        if !buf.is_empty() {
                            // Boxed: rare, and inline its future (2.7 KB over mTLS) would be
                            // laid out in every connection's.
                            Box::pin(answer_raw(
                                stream,
                                StatusCode::REQUEST_TIMEOUT,
                                "request-timeout",
                                None,
                            ))
                            .await;
                        }
                        return;
                    },
                    () = &mut signaled, if !drained => drained = true,
                }
            };
            // Boxed as in hyper's service (see `super::hyper_service`): the future is several KB.
            let answer = Box::into_pin(Box::write(Box::new_uninit(), handler(request)));
            let (parts, body) = answer.await.into_parts();
            let close = meta.close || drain.is_draining();
            match respond(&mut stream, &mut out, parts, body, meta, close).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = stream.shutdown().await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/1 connection ended with an error");
                    return;
                }
            }
            // The next head has as long again, from now.
            deadline = Instant::now() + head_timeout;
        }
    }
}

/// Parses a request head at the start of `buf`, removing it when it is one for this module.
fn parse(buf: &mut BytesMut) -> Head {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= HYPER_MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        // Malformed, too many fields or too long: hyper's answers.
        _ => return Head::Hyper,
    };
    if req.version != Some(1) {
        return Head::Hyper;
    }
    let Some(method) = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    else {
        return Head::Hyper;
    };
    if method == Method::CONNECT {
        return Head::Hyper;
    }
    let mut meta = Meta {
        head: method == Method::HEAD,
        ..Meta::default()
    };
    // Where each part is in the head: the head becomes one `Bytes` that the target and every
    // value share. Offsets fit in u32: a head is at most HYPER_MAX_HEAD_BYTES.
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or("/");
    // `http` takes a target of at most 65534 bytes; hyper answers a longer one with 414.
    if path.len() >= usize::from(u16::MAX) {
        return Head::Hyper;
    }
    let path_at = path.as_ptr() as usize - base;
    let path_len = path.len();
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = req.headers.len();
    let mut length = None;
    for (span, field) in spans.iter_mut().zip(req.headers.iter()) {
        let name = field.name.as_bytes();
        let value = field.value;
        // Only the fields that decide where the request goes are looked at, by length first.
        let hyper = match name.len() {
            2 if name.eq_ignore_ascii_case(b"te") => {
                meta.trailers |= has_token(value, b"trailers");
                false
            }
            6 => name.eq_ignore_ascii_case(b"expect"),
            7 => name.eq_ignore_ascii_case(b"upgrade"),
            10 if name.eq_ignore_ascii_case(b"connection") => {
                meta.close |= has_token(value, b"close");
                has_token(value, b"upgrade")
            }
            // A list, lengths that disagree and lengths that are not numbers get hyper's 400.
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                match with_content_length(length, value) {
                    Ok(found) if !value.contains(&b',') => {
                        length = found;
                        false
                    }
                    _ => true,
                }
            }
            17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
            _ => false,
        };
        if hyper {
            return Head::Hyper;
        }
        *span = (
            (name.as_ptr() as usize - base) as u32,
            name.len() as u32,
            (value.as_ptr() as usize - base) as u32,
            value.len() as u32,
        );
    }
    let body_len = match length {
        None => 0,
        Some(n) if n <= SMALL_BODY as u64 => n as usize,
        Some(_) => return Head::Hyper,
    };
    if buf.len() - len < body_len {
        return Head::Body(len + body_len);
    }
    let head = buf.split_to(len).freeze();
    let body = if body_len == 0 {
        pool::empty()
    } else {
        pool::full(buf.split_to(body_len).freeze())
    };
    // httparse has checked the target's and the fields' bytes; these cannot fail on what it
    // passes, and a request they refused would be one hyper refuses too.
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at..path_at + path_len)) else {
        return Head::Bad;
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    headers.reserve(count);
    let mut length_seen = false;
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let Ok(name) = HeaderName::from_bytes(&head[name_at..name_at + name_len as usize]) else {
            return Head::Bad;
        };
        let Ok(value) =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
        else {
            return Head::Bad;
        };
        // Repeated `Content-Length` fields (all of one value, as checked above) are one, as
        // hyper keeps them: some servers refuse a repeated Content-Length.
        if name == header::CONTENT_LENGTH {
            if length_seen {
                continue;
            }
            length_seen = true;
        }
        headers.append(name, value);
    }
    Head::Parsed(request, meta)
}

/// Whether `buf` past `from` (with the bytes just before it) has the blank line that ends a
/// head, as httparse takes it: a line feed followed by an empty line, with or without its
/// carriage return.
fn head_ends_after(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2)..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, 1xx, 204, 304).
    None,
    /// `Content-Length`: the bytes still to write.
    Length(u64),
    Chunked,
}

/// Writes a response, given as its parts and body (an async fn taking the `Response` would
/// hold it twice). Returns whether the connection takes another request: not when `close`,
/// when the response says `Connection: close`, or when its body failed or did not match its
/// length (what was written of it stands; the client sees the message cut short).
async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    parts: http::response::Parts,
    mut body: Body,
    meta: Meta,
    close: bool,
) -> io::Result<bool> {
    let status = parts.status;
    if status.is_informational() {
        // Not a final answer: the client would take the next response for this request's.
        // hyper's server answers 500 and closes.
        tracing::debug!(%status, "an interim status as a final response; answering 500");
        out.extend_from_slice(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        write_out(stream, out).await?;
        stream.flush().await?;
        return Ok(false);
    }
    let headers = &parts.headers;
    // RFC 9110 §8.6 and RFC 9112 §6.1: a 204 carries neither framing field, a 304 no
    // Transfer-Encoding; a response to HEAD keeps both, as they describe what a GET would get.
    let no_content = status == StatusCode::NO_CONTENT;
    let bodiless = meta.head || no_content || status == StatusCode::NOT_MODIFIED;
    // One pass over the fields for what decides the framing and the closing.
    let (mut has_date, mut said_close) = (false, false);
    // The Content-Length fields' value: none, or an error when they are malformed or disagree.
    let mut declared = Ok(None);
    // Whether there is a Transfer-Encoding, and whether its last coding is chunked.
    let mut coding: Option<bool> = None;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            declared = declared.and_then(|length| with_content_length(length, value.as_bytes()));
        } else if *name == header::DATE {
            has_date = true;
        } else if *name == header::CONNECTION {
            said_close |= has_token(value.as_bytes(), b"close");
        } else if *name == header::TRANSFER_ENCODING {
            coding = Some(last_coding_is_chunked(value.as_bytes()));
        }
    }
    let close = close || said_close;
    // The framing, whether the response's Content-Length fields are written, and what is added.
    // A Transfer-Encoding wins over a Content-Length (RFC 9112 §6.3) and keeps its codings,
    // chunked added last; a malformed Content-Length is not passed on.
    let (framing, keep_length, add) = match (bodiless, coding, declared) {
        (true, _, _) => (Framing::None, !no_content, None),
        (false, Some(chunked_last), _) => (
            Framing::Chunked,
            false,
            (!chunked_last).then_some(Added::Chunked),
        ),
        (false, None, Ok(Some(n))) => (Framing::Length(n), true, None),
        // No Content-Length, or a malformed one, dropped.
        (false, None, _) => match body
            .size_hint()
            .exact()
            .or_else(|| body.is_end_stream().then_some(0))
        {
            Some(n) => (Framing::Length(n), false, Some(Added::Length(n))),
            None => (Framing::Chunked, false, Some(Added::Chunked)),
        },
    };
    let keep_coding = !(no_content || status == StatusCode::NOT_MODIFIED);

    out.reserve(64 + headers.len() * 32);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        let skip = (*name == header::CONTENT_LENGTH && !keep_length)
            || (*name == header::TRANSFER_ENCODING && !keep_coding);
        if !skip {
            put_field(out, name, value);
        }
    }
    if let Some(add) = add {
        add.put(out);
    }
    if !has_date {
        put_date(out);
    }
    if close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // Trailers go only to a client that takes them, and only the fields the response named in
    // `Trailer`, as hyper's server does.
    let trailers = match (framing, meta.trailers) {
        (Framing::Chunked, true) => allowed_trailers(headers),
        _ => Vec::new(),
    };
    drop(parts);

    let complete = match framing {
        Framing::None | Framing::Length(0) if body.is_end_stream() => {
            // Polled once all the same: a pooled upstream connection goes back to the pool
            // when its response body is seen to end.
            let _ = futures::FutureExt::now_or_never(body.frame());
            true
        }
        // A body that a response to HEAD, a 204 or a 304 should not have is not read.
        Framing::None => true,
        _ => write_body(stream, out, &mut body, framing, &trailers).await?,
    };
    write_out(stream, out).await?;
    stream.flush().await?;
    Ok(complete && !close)
}

/// The trailer fields a response declares in `Trailer`, but those that may not be trailers
/// (RFC 9110 §6.5.1; hyper's list).
fn allowed_trailers(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .filter(|name| {
            !matches!(
                *name,
                header::AUTHORIZATION
                    | header::CACHE_CONTROL
                    | header::CONTENT_ENCODING
                    | header::CONTENT_LENGTH
                    | header::CONTENT_RANGE
                    | header::CONTENT_TYPE
                    | header::HOST
                    | header::MAX_FORWARDS
                    | header::SET_COOKIE
                    | header::TRAILER
                    | header::TRANSFER_ENCODING
                    | header::TE
            )
        })
        .collect()
}

/// Encodes and writes a response's body behind its head (in `out`), with those of its trailers
/// that are in `trailers` when it is chunked. Returns whether the body was whole: it ended
/// without an error, at its length when it has one. A body is not polled past its length or its
/// trailers.
async fn write_body<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    body: &mut Body,
    framing: Framing,
    trailers: &[HeaderName],
) -> io::Result<bool> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut terminated = false;
    loop {
        let frame = match futures::FutureExt::now_or_never(body.frame()) {
            Some(frame) => frame,
            None => {
                // Nothing yet: what is encoded goes out first.
                write_out(stream, out).await?;
                stream.flush().await?;
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return Ok(false);
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                if data.is_empty() {
                    continue;
                }
                let len = data.len() as u64;
                match framing {
                    Framing::Length(_) if len > left => {
                        tracing::debug!("response body longer than its content-length; closing");
                        return Ok(false);
                    }
                    Framing::Length(_) => left -= len,
                    _ => {
                        put_hex(out, len);
                        out.extend_from_slice(b"\r\n");
                    }
                }
                if data.len() >= WRITE_BATCH {
                    write_both(stream, out, &mut data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if matches!(framing, Framing::Length(_)) && left == 0 {
                    // All of it: the end of the body is not waited for.
                    break;
                }
                if out.len() >= WRITE_BATCH {
                    write_out(stream, out).await?;
                }
            }
            Err(frame) => {
                if let (Ok(fields), Framing::Chunked) = (frame.into_trailers(), framing) {
                    out.extend_from_slice(b"0\r\n");
                    for (name, value) in &fields {
                        if trailers.contains(name) {
                            put_field(out, name, value);
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                    terminated = true;
                    break;
                }
            }
        }
    }
    match framing {
        Framing::Chunked if !terminated => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) if left > 0 => {
            tracing::debug!(
                missing = left,
                "response body shorter than its content-length; closing"
            );
            return Ok(false);
        }
        _ => {}
    }
    Ok(true)
}

async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Writes `out` and then `data`, in as few writes as the stream takes.
async fn write_both<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    data: &mut Bytes,
) -> io::Result<()> {
    while !out.is_empty() || !data.is_empty() {
        let slices = [IoSlice::new(out), IoSlice::new(data)];
        let n = stream.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len());
        out.advance(from_out);
        data.advance(n - from_out);
    }
    out.clear();
    Ok(())
}

/// Adds a `Date` field, as hyper's server does to a response without one. The text is made once
/// a second.
fn put_date(out: &mut BytesMut) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A stream whose first bytes are ones already read from it: how a connection goes to hyper's
/// server with the request that sent it there.
struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;
    use crate::serve::DrainTrigger;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// What the handler saw of each request: method, target, version, fields, body.
    type Seen = Arc<std::sync::Mutex<Vec<String>>>;

    /// Serves `input` on a fresh connection with `answer` and returns everything the client
    /// read, without `date` fields (their value changes), once the server closed. The client
    /// half-closes after `input`, so a keep-alive connection ends once it is answered.
    async fn exchange<A>(input: &[u8], answer: A) -> (String, Seen)
    where
        A: Fn(&Request<Body>) -> Response<Body> + Send + Sync + Unpin + 'static,
    {
        let seen = Seen::default();
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (_trigger, drain) = DrainTrigger::new();
        let answer = Arc::new(answer);
        let log = seen.clone();
        let served = tokio::spawn(serve(server, TIMEOUT, drain, move |req: Request<Body>| {
            let answer = answer.clone();
            let log = log.clone();
            async move {
                let response = answer(&req);
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut fields: Vec<String> = parts
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                    .collect();
                fields.sort();
                log.lock().unwrap().push(format!(
                    "{} {} {:?} [{}] {:?}",
                    parts.method,
                    parts.uri,
                    parts.version,
                    fields.join(" "),
                    String::from_utf8_lossy(&body)
                ));
                response
            }
        }));
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut read = Vec::new();
        tokio::time::timeout(TIMEOUT, client.read_to_end(&mut read))
            .await
            .expect("the server closes")
            .unwrap();
        served.await.unwrap();
        let text = String::from_utf8(read).unwrap();
        let text = text
            .split_inclusive("\r\n")
            .filter(|line| !line.starts_with("date: "))
            .collect();
        (text, seen)
    }

    fn ok(body: &'static str) -> Response<Body> {
        Response::new(pool::full(body))
    }

    #[tokio::test]
    async fn requests_without_a_body_are_answered_in_order_on_one_connection() {
        let (read, seen) = exchange(
            b"GET /a?x=1 HTTP/1.1\r\nHost: svc\r\nX-Many: 1\r\nx-many: 2\r\n\r\n\
              DELETE /b HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n",
            |req| {
                ok(if req.uri().path() == "/a" {
                    "first"
                } else {
                    "second"
                })
            },
        )
        .await;
        assert_eq!(
            read,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst\
             HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [
                r#"GET /a?x=1 HTTP/1.1 [host=svc x-many=1 x-many=2] """#,
                r#"DELETE /b HTTP/1.1 [content-length=0 host=svc] """#,
            ]
        );
    }

    #[tokio::test]
    async fn a_response_without_a_date_gets_one() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_trigger, drain) = DrainTrigger::new();
        tokio::spawn(serve(server, TIMEOUT, drain, |_req: Request<Body>| async {
            ok("")
        }));
        let (mut read, mut write) = tokio::io::split(client);
        write.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0; 1024];
        let n = read.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        let date = head
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date field");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date:?}");
    }

    /// A body of `chunks` whose length is not known in advance, then `trailers` if any.
    fn streamed(chunks: &[&'static str], trailers: &[(&'static str, &'static str)]) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, pool::BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if !trailers.is_empty() {
            let mut fields = http::HeaderMap::new();
            for (name, value) in trailers {
                fields.append(*name, HeaderValue::from_static(value));
            }
            frames.push(Ok(Frame::trailers(fields)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    /// A response of `status` with `fields` and `body`.
    fn with(status: u16, fields: &[(&'static str, &'static str)], body: Body) -> Response<Body> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in fields {
            r.headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        r
    }

    #[tokio::test]
    async fn responses_are_framed_as_hyper_frames_them() {
        type Case = (
            &'static str,
            &'static str,
            fn() -> Response<Body>,
            &'static str,
        );
        const GET: &str = "GET / HTTP/1.1\r\n\r\n";
        let cases: [Case; 12] = [
            (
                "a body of unknown length is chunked",
                GET,
                || with(200, &[], streamed(&["ab", "", "cde"], &[])),
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n",
            ),
            (
                "trailers named in `Trailer` go to a client that takes them, but those that may \
                 not be trailers, and nothing after them",
                "GET / HTTP/1.1\r\nte: trailers\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                || {
                    let mut frames: Vec<Result<Frame<Bytes>, pool::BoxError>> = vec![];
                    frames.push(Ok(Frame::data(Bytes::from_static(b"ab"))));
                    let mut fields = http::HeaderMap::new();
                    fields.append("grpc-status", HeaderValue::from_static("0"));
                    fields.append("content-length", HeaderValue::from_static("1"));
                    fields.append("x-undeclared", HeaderValue::from_static("1"));
                    frames.push(Ok(Frame::trailers(fields)));
                    frames.push(Ok(Frame::data(Bytes::from_static(b"late"))));
                    let body = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
                    with(200, &[("trailer", "grpc-status, content-length")], body)
                },
                "HTTP/1.1 200 OK\r\ntrailer: grpc-status, content-length\r\ntransfer-encoding: chunked\r\n\r\n\
                 2\r\nab\r\n0\r\ngrpc-status: 0\r\n\r\n\
                 HTTP/1.1 200 OK\r\ntrailer: grpc-status, content-length\r\ntransfer-encoding: chunked\r\n\r\n\
                 2\r\nab\r\n0\r\n\r\n",
            ),
            (
                "a HEAD response keeps its framing fields and has no body",
                "HEAD / HTTP/1.1\r\n\r\n",
                || with(200, &[("content-length", "42")], pool::empty()),
                "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n",
            ),
            (
                "a 204 has no body and no framing fields",
                GET,
                || {
                    let fields = [("content-length", "0"), ("transfer-encoding", "chunked")];
                    with(204, &fields, pool::empty())
                },
                "HTTP/1.1 204 No Content\r\n\r\n",
            ),
            (
                "a 304 keeps its length, not a transfer-encoding",
                GET,
                || {
                    let fields = [("content-length", "7"), ("transfer-encoding", "chunked")];
                    with(304, &fields, pool::empty())
                },
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
            ),
            (
                "a declared length is the framing",
                GET,
                || with(200, &[("content-length", "3")], streamed(&["abc"], &[])),
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "a malformed length is replaced by the body's",
                GET,
                || with(299, &[("content-length", "x")], pool::full("abc")),
                "HTTP/1.1 299 \r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "a transfer-encoding keeps its codings, and chunked is added last",
                GET,
                || {
                    let fields = [("transfer-encoding", "gzip"), ("content-length", "3")];
                    with(200, &fields, pool::full("abc"))
                },
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n\
                 3\r\nabc\r\n0\r\n\r\n",
            ),
            (
                "a transfer-encoding that ends chunked is kept as it is",
                GET,
                || {
                    with(
                        200,
                        &[("transfer-encoding", "gzip, chunked")],
                        pool::full("abc"),
                    )
                },
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ),
            (
                "an interim status is no answer: 500, and the connection closes",
                "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                || with(103, &[], pool::empty()),
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            ),
            (
                "a response that closes is the last",
                "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                || with(200, &[("connection", "close")], pool::full("a")),
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na",
            ),
            (
                "a body is not waited for past its length",
                "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                || {
                    use futures::StreamExt;
                    let data = futures::stream::iter([Ok::<_, pool::BoxError>(Frame::data(
                        Bytes::from_static(b"ab"),
                    ))]);
                    let body = StreamBody::new(data.chain(futures::stream::pending()));
                    with(200, &[("content-length", "2")], body.boxed_unsync())
                },
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab\
                 HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab",
            ),
        ];
        for (what, request, response, expected) in cases {
            let (read, _) = exchange(request.as_bytes(), move |_| response()).await;
            assert_eq!(read, expected, "{what}");
        }
    }

    /// An empty body that records whether it was polled, as a pooled upstream connection's
    /// body needs to be to go back to the pool.
    struct Watched(Arc<AtomicUsize>);

    impl HttpBody for Watched {
        type Data = Bytes;
        type Error = pool::BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, pool::BoxError>>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::task::Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_body_that_is_not_sent_is_still_seen_to_end() {
        for (request, status) in [
            ("HEAD / HTTP/1.1\r\n\r\n", StatusCode::OK),
            ("GET / HTTP/1.1\r\n\r\n", StatusCode::NOT_MODIFIED),
            ("GET / HTTP/1.1\r\n\r\n", StatusCode::OK),
        ] {
            let polls = Arc::new(AtomicUsize::new(0));
            let counted = polls.clone();
            let (read, _) = exchange(request.as_bytes(), move |_| {
                let mut r = Response::new(Watched(counted.clone()).boxed_unsync());
                *r.status_mut() = status;
                r
            })
            .await;
            assert!(read.starts_with("HTTP/1.1 "), "{read}");
            assert_eq!(polls.load(Ordering::SeqCst), 1, "{request:?} {status}");
        }
    }

    #[tokio::test]
    async fn a_large_body_is_written_whole() {
        let big = "x".repeat(3 * WRITE_BATCH + 7);
        let body: &'static str = Box::leak(big.clone().into_boxed_str());
        let (read, _) = exchange(b"GET / HTTP/1.1\r\n\r\n", move |_| {
            Response::new(streamed(&["head-", body, "-tail"], &[]))
        })
        .await;
        let expected = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhead-\r\n{:x}\r\n{big}\r\n5\r\n-tail\r\n0\r\n\r\n",
            big.len()
        );
        assert!(read == expected, "{} bytes read", read.len());
    }

    #[tokio::test]
    async fn a_body_short_of_its_length_closes_the_connection() {
        // The second request is not answered: the first response could not be completed.
        let (read, _) = exchange(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", |_| {
            with(200, &[("content-length", "10")], streamed(&["abc"], &[]))
        })
        .await;
        assert_eq!(read, "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc");
    }

    #[test]
    fn a_head_is_parsed_again_only_once_it_can_be_complete() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        // Every way the head can arrive in two pieces: the end is seen exactly when the second
        // piece completes it, whichever bytes of the blank line it brings.
        for cut in 1..head.len() {
            assert!(head_ends_after(head, cut), "cut at {cut}");
            assert!(!head_ends_after(
                &head[..head.len() - 1],
                cut.min(head.len() - 2)
            ));
        }
        assert!(head_ends_after(b"GET / HTTP/1.1\n\n", 15));
        assert!(!head_ends_after(b"GET / HTTP/1.1\r\nhost: a\r\n", 5));
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_served() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_trigger, drain) = DrainTrigger::new();
        tokio::spawn(serve(
            server,
            TIMEOUT,
            drain,
            |req: Request<Body>| async move {
                ok(if req.headers().contains_key("x-last") {
                    "whole"
                } else {
                    "cut"
                })
            },
        ));
        let (mut read, mut write) = tokio::io::split(client);
        for byte in b"GET / HTTP/1.1\r\nhost: a\r\nx-last: 1\r\n\r\n" {
            write.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut buf = vec![0; 1024];
        let n = read.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nwhole"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_asks_to_close_is_answered_then_closed() {
        let (read, seen) = exchange(
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
            |_| ok("a"),
        )
        .await;
        assert_eq!(
            read,
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\na"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    /// Whether the handler is called before the last byte of a `len`-byte body is sent: hyper's
    /// server calls it at the head, this module once the body is whole.
    async fn called_before_the_body_is_whole(len: usize) -> bool {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_trigger, drain) = DrainTrigger::new();
        let called = Arc::new(AtomicUsize::new(0));
        let calls = called.clone();
        tokio::spawn(serve(server, TIMEOUT, drain, move |req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                ok(if body.len() == len { "whole" } else { "short" })
            }
        }));
        let (mut read, mut write) = tokio::io::split(client);
        let head = format!("POST / HTTP/1.1\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
        write.write_all(head.as_bytes()).await.unwrap();
        write.write_all(&vec![b'x'; len - 1]).await.unwrap();
        // Long enough for hyper's dispatcher, which needs a few polls; this module is never
        // called early however long it is given.
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        let early = called.load(Ordering::SeqCst) == 1;
        write.write_all(b"x").await.unwrap();
        let mut answer = String::new();
        read.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("whole"), "{len}: {answer}");
        early
    }

    #[tokio::test]
    async fn bodies_up_to_the_small_limit_are_read_whole_and_longer_ones_streamed_by_hyper() {
        assert!(!called_before_the_body_is_whole(1).await);
        assert!(!called_before_the_body_is_whole(SMALL_BODY).await);
        assert!(called_before_the_body_is_whole(SMALL_BODY + 1).await);
    }

    #[tokio::test]
    async fn requests_with_a_large_body_an_upgrade_or_an_old_version_go_to_hyper() {
        let large = "x".repeat(SMALL_BODY + 1);
        let large_request = format!(
            "POST /p HTTP/1.1\r\ncontent-length: {}\r\n\r\n{large}",
            large.len()
        );
        let large_seen = format!(
            r#"POST /p HTTP/1.1 [content-length={}] "{large}""#,
            large.len()
        );
        let cases: [(&str, &str, &str); 5] = [
            (
                "a body by length past the small ones",
                &large_request,
                &large_seen,
            ),
            (
                "a chunked body",
                "PUT /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                r#"PUT /p HTTP/1.1 [transfer-encoding=chunked] "abc""#,
            ),
            (
                "an expectation",
                "POST /p HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nhi",
                r#"POST /p HTTP/1.1 [content-length=2 expect=100-continue] "hi""#,
            ),
            (
                "an upgrade",
                "GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                r#"GET /ws HTTP/1.1 [connection=upgrade upgrade=websocket] """#,
            ),
            (
                "HTTP/1.0",
                "GET /old HTTP/1.0\r\n\r\n",
                r#"GET /old HTTP/1.0 [] """#,
            ),
        ];
        for (what, request, expected) in cases {
            // A request for this module first: the hand-over keeps what follows it.
            let input = format!("GET /first HTTP/1.1\r\n\r\n{request}");
            let (read, seen) = exchange(input.as_bytes(), |_| ok("ok")).await;
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 2, "{what}: {seen:?}");
            assert_eq!(seen[1], expected, "{what}");
            assert_eq!(read.matches(" 200 OK\r\n").count(), 2, "{what}: {read}");
        }
    }

    #[tokio::test]
    async fn repeated_lengths_reach_the_handler_as_one_and_lengths_that_disagree_get_400() {
        let (_, seen) = exchange(
            b"GET / HTTP/1.1\r\ncontent-length: 0\r\nContent-Length: 0\r\n\r\n\
              POST / HTTP/1.1\r\ncontent-length: 2\r\nContent-Length: 2\r\n\r\nhi",
            |_| ok(""),
        )
        .await;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                r#"GET / HTTP/1.1 [content-length=0] """#,
                r#"POST / HTTP/1.1 [content-length=2] "hi""#
            ]
        );
        for request in [
            "POST / HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nhi!",
            "POST / HTTP/1.1\r\ncontent-length: 2, 3\r\n\r\nhi!",
            "POST / HTTP/1.1\r\ncontent-length: 2, 2\r\n\r\nhi",
            "POST / HTTP/1.1\r\ncontent-length: +2\r\n\r\nhi",
        ] {
            let (read, seen) = exchange(request.as_bytes(), |_| ok("")).await;
            assert!(seen.lock().unwrap().is_empty(), "{request:?}");
            assert!(
                read.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{request:?}: {read}"
            );
        }
    }

    /// A small body is read whole before the handler sees the request (hyper's server would call
    /// it at the head), and the connection goes on with the next request.
    #[tokio::test]
    async fn a_small_body_is_read_whole_with_its_head_and_served_here() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_trigger, drain) = DrainTrigger::new();
        let called = Seen::default();
        let log = called.clone();
        tokio::spawn(serve(server, TIMEOUT, drain, move |req: Request<Body>| {
            let log = log.clone();
            let exact = req.body().size_hint().exact();
            log.lock()
                .unwrap()
                .push(format!("{} {exact:?}", req.method()));
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                log.lock().unwrap().push(format!("{body:?}"));
                ok("done")
            }
        }));
        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(b"POST /p HTTP/1.1\r\ncontent-length: 11\r\n\r\nhello")
            .await
            .unwrap();
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(called.lock().unwrap().is_empty(), "{called:?}");
        write
            .write_all(b" world\r\nGET /next HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answers = String::new();
        read.read_to_string(&mut answers).await.unwrap();
        assert_eq!(
            answers.matches("HTTP/1.1 200 OK\r\n").count(),
            2,
            "{answers}"
        );
        assert_eq!(
            *called.lock().unwrap(),
            [
                "POST Some(11)",
                r#"b"hello world""#,
                "GET Some(0)",
                r#"b"""#
            ]
        );
    }

    #[tokio::test]
    async fn a_request_handed_to_hyper_while_draining_is_answered() {
        // Several times: the hand-over used to race hyper's first read against the drain.
        for _ in 0..20 {
            let (trigger, drain) = DrainTrigger::new();
            let (client, server) = tokio::io::duplex(1 << 16);
            let served = tokio::spawn(serve(server, TIMEOUT, drain, |req: Request<Body>| async {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                ok(if &body[..] == b"hi" {
                    "got it"
                } else {
                    "no body"
                })
            }));
            let (mut read, mut write) = tokio::io::split(client);
            write
                .write_all(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n")
                .await
                .unwrap();
            tokio::task::yield_now().await;
            let drained = tokio::spawn(trigger.drain(TIMEOUT));
            tokio::task::yield_now().await;
            write.write_all(b"\r\nhi").await.unwrap();
            let mut answer = Vec::new();
            read.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8(answer).unwrap();
            // Answered, and then closed (hyper may have answered before it saw the drain, so
            // without `connection: close`).
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.ends_with("got it"), "{answer}");
            assert!(drained.await.unwrap());
            served.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_target_too_long_for_http_gets_hyper_414() {
        let request = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000));
        let (read, seen) = exchange(request.as_bytes(), |_| ok("")).await;
        assert!(seen.lock().unwrap().is_empty());
        assert!(read.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{read}");
    }

    #[tokio::test]
    async fn a_malformed_head_is_answered_by_hyper() {
        let (read, seen) = exchange(b"GET / HTTP/1.1\r\n\r\nGET /\x01 HTTP/1.1\r\n\r\n", |_| {
            ok("a")
        })
        .await;
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(
            read.ends_with(
                "aHTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            ),
            "{read}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_cut_short_gets_408_and_an_idle_connection_is_closed_in_silence() {
        for (sent, expected) in [
            ("GET / HTTP/1.1\r\nhost: x", "HTTP/1.1 408 Request Timeout"),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhel",
                "HTTP/1.1 408 Request Timeout",
            ),
            ("", ""),
        ] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let (_trigger, drain) = DrainTrigger::new();
            let served = tokio::spawn(serve(
                server,
                Duration::from_secs(5),
                drain,
                |_req: Request<Body>| async { ok("") },
            ));
            client.write_all(sent.as_bytes()).await.unwrap();
            let started = Instant::now();
            let mut read = Vec::new();
            client.read_to_end(&mut read).await.unwrap();
            assert!(started.elapsed() >= Duration::from_secs(5));
            let read = String::from_utf8(read).unwrap();
            assert!(read.starts_with(expected), "{read}");
            if !expected.is_empty() {
                assert!(read.contains("keel-error: request-timeout\r\n"), "{read}");
            }
            served.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_has_the_whole_timeout_for_each_head() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_trigger, drain) = DrainTrigger::new();
        tokio::spawn(serve(
            server,
            Duration::from_secs(5),
            drain,
            |_req: Request<Body>| async { ok("a") },
        ));
        let (mut read, mut write) = tokio::io::split(client);
        let mut buf = vec![0; 1024];
        // Requests 4 s apart: each within its own 5 s, all past the first's.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            write.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let n = read.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
        }
    }

    #[tokio::test]
    async fn draining_closes_after_the_response_in_flight_and_closes_idle_connections() {
        let (trigger, drain) = DrainTrigger::new();
        let (release, released) = tokio::sync::watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let handler = move |_req: Request<Body>| {
            let mut released = released.clone();
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = released.wait_for(|r| *r).await;
                ok("done")
            }
        };
        let (mut busy, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve(server, TIMEOUT, drain.clone(), handler.clone()));
        let (mut idle, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve(server, TIMEOUT, drain, handler));
        busy.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let drained = tokio::spawn(trigger.drain(TIMEOUT));
        let mut read = Vec::new();
        idle.read_to_end(&mut read).await.unwrap();
        assert!(read.is_empty());
        release.send(true).unwrap();
        busy.read_to_end(&mut read).await.unwrap();
        let read = String::from_utf8(read).unwrap();
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\ndone"), "{read}");
        assert!(drained.await.unwrap());
    }

    #[test]
    fn rewind_reads_what_was_read_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(64);
            let mut rewind = Rewind {
                read: Bytes::from_static(b"first "),
                io: server,
            };
            client.write_all(b"then").await.unwrap();
            drop(client);
            let mut all = String::new();
            rewind.read_to_string(&mut all).await.unwrap();
            assert_eq!(all, "first then");
        });
    }
}

//! Protocol detection on a connection's first bytes: TLS, the HTTP/2 preface, an HTTP/1 request
//! line, or else opaque TCP.
//!
//! Detection peeks (the bytes stay in the socket for whoever serves the connection) and is
//! bounded in both size and time: a client that sends nothing (server-speaks-first protocols
//! such as SMTP or MySQL) is treated as opaque when the timeout passes. Like Linkerd, detection
//! favours availability: anything not recognised is proxied as opaque TCP, never refused here.
//! It reads at most [`MAX_REQUEST_LINE`] bytes, and that many only for a request line whose
//! method is not one of the common ones.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// What the first bytes of a connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The common methods, recognised from their first bytes alone (a request line may be long).
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Enough bytes to decide every case above.
const PEEK: usize = 24;
/// The longest method token detection waits for (the longest registered, `BASELINE-CONTROL`,
/// has 16 characters).
const MAX_METHOD: usize = 32;
/// How much of a request line with another method detection reads: it must show the whole line
/// (`METHOD SP request-target SP HTTP/1.x CR`) within this many bytes to count as HTTP/1.
pub const MAX_REQUEST_LINE: usize = 8 << 10;

/// Classifies `prefix`, or `None` when more bytes could change the answer.
///
/// HTTP/1.1 allows any token as a method (WebDAV's PROPFIND and MKCOL, PURGE, ...). The common
/// methods are known from their first bytes; any other token counts only with a whole request
/// line ending in ` HTTP/1.x`, so that other protocols whose first line is `WORD SP ...` (an
/// SSH banner, RTSP, SIP) stay opaque.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    if prefix[0] == 0x16 {
        return Some(Protocol::Tls);
    }
    if H2_PREFACE.starts_with(prefix) {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    if prefix.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    let mut undecided = false;
    for method in METHODS {
        if prefix.starts_with(method) {
            return Some(Protocol::Http1);
        }
        if method.starts_with(prefix) {
            undecided = true;
        }
    }
    match request_line(prefix) {
        Some(protocol) if !undecided || protocol == Protocol::Http1 => Some(protocol),
        _ => None,
    }
}

/// Whether `prefix` starts with an HTTP/1 request line: `Some(Http1)` when it does, `None` when
/// it still may, `Some(Opaque)` when it cannot.
fn request_line(prefix: &[u8]) -> Option<Protocol> {
    let opaque = Some(Protocol::Opaque);
    let undecided = if prefix.len() >= MAX_REQUEST_LINE {
        opaque
    } else {
        None
    };
    // method = token (RFC 9110 section 9.1), then one space.
    let Some(method) = prefix.iter().position(|b| !is_tchar(*b)) else {
        return if prefix.len() > MAX_METHOD {
            opaque
        } else {
            None
        };
    };
    if method == 0 || method > MAX_METHOD || prefix[method] != b' ' {
        return opaque;
    }
    // request-target: visible characters, then one space.
    let rest = &prefix[method + 1..];
    let Some(target) = rest.iter().position(|b| !b.is_ascii_graphic()) else {
        return undecided;
    };
    if target == 0 || rest[target] != b' ' {
        return opaque;
    }
    // HTTP-version: `HTTP/1.` and a digit, then the line's CR.
    let version = &rest[target + 1..];
    const VERSION: &[u8] = b"HTTP/1.?\r";
    for (at, expected) in VERSION.iter().enumerate() {
        let Some(byte) = version.get(at) else {
            return undecided;
        };
        let fits = match expected {
            b'?' => byte.is_ascii_digit(),
            expected => byte == expected,
        };
        if !fits {
            return opaque;
        }
    }
    Some(Protocol::Http1)
}

/// `tchar` of RFC 9110 section 5.6.2: the characters of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Peeks at `stream` until its protocol is known or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let deadline = Instant::now() + timeout;
    let mut small = [0u8; PEEK];
    // Only a request line with an uncommon method needs more than `PEEK` bytes.
    let mut large = Vec::new();
    let mut seen = 0;
    loop {
        let buf: &mut [u8] = if large.is_empty() {
            &mut small
        } else {
            &mut large
        };
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(buf)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Protocol::Opaque),
        };
        if peeked == 0 {
            // The client closed without sending anything.
            return Ok(Protocol::Opaque);
        }
        if let Some(protocol) = classify(&buf[..peeked]) {
            return Ok(protocol);
        }
        if peeked == buf.len() {
            if large.is_empty() {
                large = vec![0u8; MAX_REQUEST_LINE];
                continue;
            }
            // `classify` decides at MAX_REQUEST_LINE bytes; this is only a bound.
            return Ok(Protocol::Opaque);
        }
        // A short first segment that is still ambiguous: peek returns the same bytes until more
        // arrive, so wait a little before looking again. This is rare (request lines arrive in
        // one segment) and bounded by the deadline.
        if peeked == seen {
            if Instant::now() >= deadline {
                return Ok(Protocol::Opaque);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = peeked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Tls));
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.1\r\n"),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"\x00\x01garbage"), Some(Protocol::Opaque));
        // Ambiguous until more bytes come.
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn any_token_is_a_method_with_a_whole_request_line() {
        for line in [
            &b"PROPFIND /files/ HTTP/1.1\r\n"[..],
            b"MKCOL /new HTTP/1.1\r\nHost: dav\r\n\r\n",
            b"PURGE http://cache/x HTTP/1.0\r\n",
            b"GETX / HTTP/1.1\r\n",
            b"PRIX * HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(line), Some(Protocol::Http1), "{line:?}");
        }
        // Every prefix of such a line is still undecided.
        let line = b"PROPFIND /files/ HTTP/1.1\r";
        for end in 1..line.len() {
            assert_eq!(classify(&line[..end]), None, "{:?}", &line[..end]);
        }
        for other in [
            &b"DESCRIBE rtsp://cam/1 RTSP/1.0\r\n"[..],
            b"INVITE sip:bob@x SIP/2.0\r\n",
            b"PROPFIND /files/ HTTP/2.0\r\n",
            b"PROPFIND  /double-space HTTP/1.1\r\n",
            b"PROPFIND /x HTTP/1.1 trailing\r\n",
            b"(PROPFIND) / HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(other), Some(Protocol::Opaque), "{other:?}");
        }
        let long_method = [b'A'; MAX_METHOD + 1];
        assert_eq!(classify(&long_method), Some(Protocol::Opaque));
        let mut long_target = b"PROPFIND /".to_vec();
        long_target.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(classify(&long_target), Some(Protocol::Opaque));
        long_target.truncate(MAX_REQUEST_LINE - 1);
        assert_eq!(classify(&long_target), None);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_the_timeout() {
        let (_client, server) = pair().await;
        let p = detect(&server, Duration::from_millis(50))
            .await
            .expect("detect");
        assert_eq!(p, Protocol::Opaque);
    }

    #[tokio::test]
    async fn a_long_request_line_with_another_method_is_read_whole() {
        let (mut client, server) = pair().await;
        let line = format!(
            "PROPFIND /{} HTTP/1.1\r\nHost: dav\r\n\r\n",
            "d".repeat(2000)
        );
        client.write_all(line.as_bytes()).await.expect("write");
        let p = detect(&server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(p, Protocol::Http1);
    }

    #[tokio::test]
    async fn split_request_line_is_still_http() {
        let (mut client, server) = pair().await;
        client.write_all(b"GE").await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client
                .write_all(b"T / HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            client
        });
        let p = detect(&server, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(p, Protocol::Http1);
        let _client = writer.await.expect("join");
        // The bytes are still there for the server.
        let mut buf = [0u8; 4];
        let n = server.peek(&mut buf).await.expect("peek");
        assert_eq!(&buf[..n], b"GET ");
    }
}

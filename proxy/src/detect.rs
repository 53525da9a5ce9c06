//! Protocol detection on a connection's first bytes: TLS, the HTTP/2 preface, an HTTP/1 request
//! line, or else opaque TCP.
//!
//! Detection peeks (the bytes stay in the socket for whoever serves the connection) and is
//! bounded in both size and time: a client that sends nothing (server-speaks-first protocols
//! such as SMTP or MySQL) is treated as opaque when the timeout passes. Like Linkerd, detection
//! favours availability: anything not recognised is proxied as opaque TCP, never refused here.

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

/// Classifies `prefix`, or `None` when more bytes could change the answer.
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
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peeks at `stream` until its protocol is known or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PEEK];
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
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
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x01garbage"), Some(Protocol::Opaque));
        // Ambiguous until more bytes come.
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(classify(b""), None);
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

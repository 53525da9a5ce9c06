//! The HTTP server every role runs: accepts HTTP/1.1 and HTTP/2 (cleartext) connections, reads
//! each request body up to a limit, hands the request to the role, and stamps every response
//! with `x-served-by: <workload>` so that callers can see which instance answered.
//!
//! It must never let one request's body exhaust memory (bodies above [`MAX_BODY`] get 413), and
//! never stop serving because one connection failed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;

/// The largest request body a role reads.
pub const MAX_BODY: usize = 64 * 1024;

/// The header naming the instance that produced a response.
pub const SERVED_BY: &str = "x-served-by";

pub type Reply = Response<Full<Bytes>>;

/// A role: answers one request whose body has been read.
pub trait Role: Send + Sync + 'static {
    fn handle(&self, request: Request<Bytes>) -> impl Future<Output = Reply> + Send;
}

/// A JSON response.
pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut response = Response::new(Full::new(Bytes::from(bytes)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the response: {e}"),
        ),
    }
}

/// A JSON error: `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Reply {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn not_found() -> Reply {
    error(StatusCode::NOT_FOUND, "no such resource")
}

/// Why a request gets an error answer: its status and the message of `{"error": ...}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    pub fn reply(self) -> Reply {
        error(self.status, &self.message)
    }
}

/// Decodes a JSON request body, or says why not (400).
pub fn decode<T: serde::de::DeserializeOwned>(request: &Request<Bytes>) -> Result<T, Refusal> {
    serde_json::from_slice(request.body())
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Serves `role` on `listen` until SIGINT or SIGTERM.
pub async fn serve<R: Role>(listen: SocketAddr, workload: &str, role: R) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let served_by = HeaderValue::from_str(workload)
        .with_context(|| format!("{workload:?} cannot be sent in a header"))?;
    let role = Arc::new(role);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // The bound address, so that `--listen 127.0.0.1:0` tells where it ended up.
    let bound = listener
        .local_addr()
        .with_context(|| format!("reading the address bound for {listen}"))?;
    tracing::info!(listen = %bound, workload, "serving");
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let role = role.clone();
        let served_by = served_by.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let role = role.clone();
                let served_by = served_by.clone();
                async move {
                    let mut response = answer(&*role, request).await;
                    response.headers_mut().insert(SERVED_BY, served_by);
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn answer<R: Role>(role: &R, request: Request<Incoming>) -> Reply {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request bodies are limited to {MAX_BODY} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    tracing::debug!(method = %parts.method, uri = %parts.uri, "request");
    role.handle(Request::from_parts(parts, body)).await
}

//! The proxy's admin server (port 15020): `/live`, `/ready` (once the first complete
//! configuration arrived and, with an identity, while it holds a certificate that has not
//! expired; 503 again once draining has started), `/config` (the applied configuration, the
//! discovery client's state and the certificate's, JSON) and `/metrics` (Prometheus).
//!
//! It keeps serving while the data path drains, so that a kubelet's readiness probe sees 503
//! and takes the pod out of its Services' endpoints rather than failing to connect; its
//! connections are not the drain's to wait for. It runs beside the data path and never blocks
//! it: every answer reads a snapshot.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::discovery::DiscoveryHandle;
use crate::metrics::Metrics;
use crate::serve::Drain;
use crate::tls::certify::CertStatus;
use crate::tls::{Certified, MeshTls};

pub struct Admin {
    pub discovery: Arc<DiscoveryHandle>,
    pub metrics: Arc<Metrics>,
    /// The proxy's identity and its certificate task's state, when it has one.
    pub identity: Option<(Arc<MeshTls>, Arc<std::sync::Mutex<CertStatus>>)>,
    /// The data path's drain, for `/ready`.
    pub drain: Drain,
}

impl Admin {
    /// Serves `listener` until the task is aborted, draining or not.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                let certified = self.identity.as_ref().map_or(Certified::Valid, |(tls, _)| {
                    tls.certified_at(SystemTime::now())
                });
                if self.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n")
                } else if !self.discovery.is_ready() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first configuration from the control plane\n",
                    )
                } else {
                    match certified {
                        Certified::Valid => text(StatusCode::OK, "ready\n"),
                        Certified::Not => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "waiting for the workload certificate\n",
                        ),
                        // Peers refuse an expired certificate, so the pod cannot serve mesh
                        // traffic: it should get none until it renews. (Istio and Linkerd
                        // proxies stay ready with an expired certificate; keel deliberately
                        // does not.) Liveness is unaffected: nothing is gained by a restart.
                        Certified::Expired(at) => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "the workload certificate expired at {}; renewing\n",
                                humantime::format_rfc3339_seconds(at)
                            ),
                        ),
                    }
                }
            }
            "/config" => {
                let certificate = self
                    .identity
                    .as_ref()
                    .map(|(_, status)| status.lock().unwrap_or_else(|e| e.into_inner()).clone());
                let body = serde_json::json!({
                    "discovery": self.discovery.stats(),
                    "certificate": certificate,
                    "config": &*self.discovery.config(),
                });
                match serde_json::to_vec_pretty(&body) {
                    Ok(json) => respond(StatusCode::OK, "application/json", json.into()),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
                }
            }
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode().into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_owned().into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

//! The control plane's admin API, used by `keelctl`: status, apply, liveness and readiness.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /live` | 200 while the process serves |
//! | `GET /ready` | 200 once a valid mesh configuration has been loaded, else 503 |
//! | `GET /status` | JSON: snapshot version, source state (with the rejected state's errors), connected proxies |
//! | `POST /apply?name=FILE` | body: mesh YAML. 200 with what changed, 422 with validation errors |
//!
//! The admin API never takes part in the data path; it reads the store and the proxy registry.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::discovery::{ProxyRegistry, ProxyStatus, resources};
use crate::source::apply::{self, ApplyError};
use crate::source::file::DirectoryLoader;
use crate::store::{SourceStatus, Store};

/// The largest YAML document `POST /apply` takes.
const MAX_APPLY_BYTES: usize = 4 << 20;

/// The `GET /status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: u64,
    #[serde(with = "rfc3339")]
    pub published: std::time::SystemTime,
    pub resources: BTreeMap<&'static str, usize>,
    pub source: SourceStatus,
    pub proxies: Vec<ProxyStatus>,
}

#[derive(Clone)]
pub struct Admin {
    store: Arc<Store>,
    registry: Arc<ProxyRegistry>,
    /// The watched directory, when the source is the file source (`apply` needs it).
    directory: Option<Arc<DirectoryLoader>>,
    apply_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Admin {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<ProxyRegistry>,
        directory: Option<Arc<DirectoryLoader>>,
    ) -> Admin {
        Admin {
            store,
            registry,
            directory,
            apply_lock: Arc::default(),
        }
    }

    pub fn status(&self) -> Status {
        let snapshot = self.store.current();
        Status {
            version: snapshot.version,
            published: snapshot.created,
            resources: snapshot
                .counts()
                .into_iter()
                .map(|(t, n)| (resources::short_name(t), n))
                .collect(),
            source: self.store.source_status(),
            proxies: self.registry.list(),
        }
    }

    /// Serves the admin API on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
                });
                let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.store.source_status().last_good.is_some() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no valid mesh configuration loaded yet\n",
                    )
                }
            }
            (&Method::GET, "/status") => json(StatusCode::OK, &self.status()),
            (&Method::POST, "/apply") => self.apply(req, peer).await,
            (_, "/live" | "/ready" | "/status" | "/apply") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn apply(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let Some(directory) = self.directory.clone() else {
            return text(
                StatusCode::CONFLICT,
                "this control plane does not read a directory; apply through its source\n",
            );
        };
        let name = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("name=")))
            .map(|n| {
                percent_encoding::percent_decode_str(n)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .unwrap_or_else(|| "applied.yaml".to_owned());
        let body = match Limited::new(req.into_body(), MAX_APPLY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("reading the body failed (at most {MAX_APPLY_BYTES} bytes): {e}\n"),
                );
            }
        };
        let Ok(yaml) = String::from_utf8(body.to_vec()) else {
            return text(StatusCode::BAD_REQUEST, "the body is not UTF-8 text\n");
        };
        let _serial = self.apply_lock.lock().await;
        let dir = directory.dir().to_path_buf();
        let result = tokio::task::spawn_blocking(move || apply::apply(&dir, &name, &yaml)).await;
        match result {
            Ok(Ok(outcome)) => {
                // Publish now rather than wait for the watcher, so the answer names the version
                // that serves the change.
                directory.reload(&self.store).await;
                tracing::info!(%peer, resources = outcome.resources.len(), "applied");
                #[derive(Serialize)]
                struct Answer {
                    version: u64,
                    #[serde(flatten)]
                    outcome: apply::ApplyOutcome,
                }
                json(
                    StatusCode::OK,
                    &Answer {
                        version: self.store.current().version,
                        outcome,
                    },
                )
            }
            Ok(Err(ApplyError::Invalid(errors))) => json(StatusCode::UNPROCESSABLE_ENTITY, &errors),
            Ok(Err(e @ ApplyError::Empty)) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("apply failed: {e}\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_owned().into())
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(body) {
        Ok(bytes) => respond(status, "application/json", bytes.into()),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding failed: {e}\n"),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Times in status documents, as RFC 3339 strings.
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }
    }
}

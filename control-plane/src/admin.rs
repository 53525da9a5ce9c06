//! The control plane's admin API, used by `keelctl`: status, apply, liveness and readiness.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /live` | 200 while the process serves |
//! | `GET /ready` | 200 once a valid mesh configuration has been loaded, else 503 |
//! | `GET /status` | JSON: snapshot version, source state (with the rejected state's errors), connected proxies, the last few disconnected ones |
//! | `POST /apply?name=FILE` | body: mesh YAML, or JSON `{"files": [{"name", "yaml"}]}` for several files applied as one change. 200 with what changed, 422 with validation errors |
//! | `GET /ca` | JSON: the CA's roots, which signs, each proxy's newest unexpired certificate (and whether it is connected), and for each root why it may not sign or be removed yet |
//! | `GET /ca/bundle.pem` | the trust bundle, PEM (what `keel-proxy --ca-root-file` takes) |
//! | `POST /ca/roots` | adds a root that does not sign yet: generated, or the JSON body's `cert_pem` and `key_pem` |
//! | `POST /ca/roots/ID/sign[?force=true]` | root ID signs from now on; 409 until every proxy holding a certificate is connected and trusts it, unless forced |
//! | `DELETE /ca/roots/ID[?force=true]` | removes root ID; 409 while it signs, or while an unexpired certificate chains to it unless forced |
//! | `POST /tokens` | JSON `{"namespace", "workload"}`: the workload's bootstrap token |
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

use crate::discovery::{DisconnectedProxy, ProxyRegistry, ProxyStatus, resources};
use crate::identity::{BootstrapTokens, CaError, CertificateAuthority, rotation};
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
    /// The last few proxies whose stream ended, newest first, with their last error.
    pub recently_disconnected: Vec<DisconnectedProxy>,
}

#[derive(Clone)]
pub struct Admin {
    store: Arc<Store>,
    registry: Arc<ProxyRegistry>,
    /// The watched directory, when the source is the file source (`apply` needs it).
    directory: Option<Arc<DirectoryLoader>>,
    apply_lock: Arc<tokio::sync::Mutex<()>>,
    ca: Option<Arc<CertificateAuthority>>,
    tokens: Option<Arc<BootstrapTokens>>,
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
            ca: None,
            tokens: None,
        }
    }

    /// Serves the CA's endpoints and, with bootstrap tokens, `POST /tokens`.
    pub fn with_identity(
        mut self,
        ca: Option<Arc<CertificateAuthority>>,
        tokens: Option<Arc<BootstrapTokens>>,
    ) -> Admin {
        self.ca = ca;
        self.tokens = tokens;
        self
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
            recently_disconnected: self.registry.recently_disconnected(),
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
            (_, path) if path == "/ca" || path.starts_with("/ca/") => self.ca(req, peer).await,
            (&Method::POST, "/tokens") => self.token(req).await,
            (_, "/live" | "/ready" | "/status" | "/apply" | "/tokens") => {
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
        let json_body = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
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
        let files = if json_body {
            #[derive(serde::Deserialize)]
            struct Files {
                files: Vec<apply::ApplyFile>,
            }
            match serde_json::from_slice::<Files>(&body) {
                Ok(f) => f.files,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "invalid JSON body (expected {{\"files\": [{{\"name\", \"yaml\"}}]}}): {e}\n"
                        ),
                    );
                }
            }
        } else {
            let Ok(yaml) = String::from_utf8(body.to_vec()) else {
                return text(StatusCode::BAD_REQUEST, "the body is not UTF-8 text\n");
            };
            vec![apply::ApplyFile { name, yaml }]
        };
        let _serial = self.apply_lock.lock().await;
        let started = std::time::Instant::now();
        let loader = directory.clone();
        let result = tokio::task::spawn_blocking(move || loader.apply(&files)).await;
        match result {
            Ok(Ok((outcome, loaded))) => {
                // Publish now rather than wait for the watcher, so the answer names the version
                // that serves the change.
                directory.publish(&self.store, Ok(loaded), started);
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

/// The body of `POST /ca/roots` when it imports a root.
#[derive(serde::Deserialize)]
struct ImportRoot {
    cert_pem: String,
    key_pem: String,
}

#[derive(serde::Deserialize)]
struct TokenRequest {
    namespace: String,
    workload: String,
}

/// A small JSON body (at most 1 MiB), parsed.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<Option<T>, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("reading the body failed (at most 1 MiB): {e}\n"),
            ));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON body: {e}\n"),
        )
    })
}

fn ca_error(e: CaError) -> Response<Full<Bytes>> {
    let status = match e {
        CaError::NoSuchRoot(_) => StatusCode::NOT_FOUND,
        CaError::RemovingSigningRoot(_) => StatusCode::CONFLICT,
        CaError::BadRoot { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, &format!("{e}\n"))
}

impl Admin {
    /// `GET /ca`: the CA's status, with what only the admin API knows (who is connected, and
    /// why each root may not sign or be removed yet).
    fn ca_status(&self, ca: &CertificateAuthority) -> Response<Full<Bytes>> {
        let status = ca.status();
        let connected: std::collections::HashSet<String> =
            self.registry.list().into_iter().map(|p| p.id).collect();
        let mut view = match serde_json::to_value(&status) {
            Ok(view) => view,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        };
        if let Some(roots) = view["roots"].as_array_mut() {
            for (view, root) in roots.iter_mut().zip(&status.roots) {
                let (sign, remove) = if root.signing {
                    (None, Some("it signs new certificates".to_owned()))
                } else {
                    (
                        rotation::may_sign(&self.store, &self.registry, ca, &root.id)
                            .err()
                            .map(|e| e.to_string()),
                        rotation::may_remove(ca, &self.registry, &root.id)
                            .err()
                            .map(|e| e.to_string()),
                    )
                };
                view["cannot_sign_because"] = sign.into();
                view["cannot_remove_because"] = remove.into();
            }
        }
        if let Some(issued) = view["issued"].as_array_mut() {
            for (view, issued) in issued.iter_mut().zip(&status.issued) {
                view["connected"] = connected.contains(&issued.node).into();
            }
        }
        json(StatusCode::OK, &view)
    }

    async fn ca(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let Some(ca) = self.ca.clone() else {
            return text(
                StatusCode::NOT_FOUND,
                "this control plane runs no certificate authority\n",
            );
        };
        let force = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "force=true" || kv == "force"));
        let path = req.uri().path().to_owned();
        let root = path
            .strip_prefix("/ca/roots/")
            .map(|rest| rest.trim_end_matches("/sign").to_owned());
        match (req.method().clone(), path.as_str(), root) {
            (Method::GET, "/ca", _) => self.ca_status(&ca),
            (Method::GET, "/ca/bundle.pem", _) => respond(
                StatusCode::OK,
                "application/x-pem-file",
                crate::identity::ca::bundle_pem(&ca.bundle()).into(),
            ),
            (Method::POST, "/ca/roots", _) => {
                let import = match json_body::<ImportRoot>(req).await {
                    Ok(import) => import,
                    Err(answer) => return answer,
                };
                let pem = import
                    .as_ref()
                    .map(|i| (i.cert_pem.as_str(), i.key_pem.as_str()));
                match ca.add_root(pem) {
                    Ok(id) => {
                        tracing::info!(%peer, root = %id, "root added through the admin API");
                        json(StatusCode::OK, &serde_json::json!({ "id": id }))
                    }
                    Err(e) => ca_error(e),
                }
            }
            (Method::POST, p, Some(id)) if p.ends_with("/sign") => {
                let overridden = match rotation::may_sign(&self.store, &self.registry, &ca, &id) {
                    Ok(()) => None,
                    Err(e @ rotation::NotYet::NotPublished(_)) => {
                        return text(StatusCode::CONFLICT, &format!("{e}\n"));
                    }
                    Err(e) if force => Some(e.to_string()),
                    Err(e) => {
                        return text(
                            StatusCode::CONFLICT,
                            &format!("{e} (force=true goes ahead anyway)\n"),
                        );
                    }
                };
                match ca.use_root(&id) {
                    Ok(()) => {
                        if let Some(reason) = &overridden {
                            tracing::warn!(%peer, root = %id, %reason, "root made to sign by force");
                        }
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "signing": id, "forced_past": overridden }),
                        )
                    }
                    Err(e) => ca_error(e),
                }
            }
            (Method::DELETE, _, Some(id)) => {
                let overridden = match rotation::may_remove(&ca, &self.registry, &id) {
                    Ok(()) => None,
                    Err(e) if force => Some(e.to_string()),
                    Err(e) => {
                        return text(
                            StatusCode::CONFLICT,
                            &format!("{e} (force=true removes it anyway)\n"),
                        );
                    }
                };
                match ca.remove_root(&id) {
                    Ok(()) => {
                        if let Some(reason) = &overridden {
                            tracing::warn!(%peer, root = %id, %reason, "root removed by force");
                        }
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "removed": id, "forced_past": overridden }),
                        )
                    }
                    Err(e) => ca_error(e),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(tokens) = self.tokens.clone() else {
            return text(
                StatusCode::CONFLICT,
                "this control plane does not use bootstrap tokens\n",
            );
        };
        let asked = match json_body::<TokenRequest>(req).await {
            Ok(Some(asked)) => asked,
            Ok(None) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the body must name the namespace and the workload\n",
                );
            }
            Err(answer) => return answer,
        };
        let key = crate::model::ObjectKey::new(&asked.namespace, &asked.workload);
        if !self.store.current().model.workloads.contains_key(&key) {
            return text(
                StatusCode::NOT_FOUND,
                &format!("workload {key} is not in the mesh\n"),
            );
        }
        json(
            StatusCode::OK,
            &serde_json::json!({ "token": tokens.mint(&asked.namespace, &asked.workload) }),
        )
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

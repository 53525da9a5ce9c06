//! Workload identity: the certificate authority, proof of identity, the `Identity` gRPC service,
//! and the control plane's own TLS port that serves it.
//!
//! A proxy calls `Identity.Certify` with the SPIFFE ID it wants, a proof (see [`auth`]) and a
//! CSR for a key it made and keeps, asking for that SPIFFE ID. The service checks that the proof
//! establishes exactly that identity in the mesh's trust domain and that the CSR asks for it and
//! nothing else, and the CA ([`ca`]) signs an X.509-SVID over the CSR's key. Anything else is
//! refused with a status naming the reason (`permission_denied` for an identity other than the
//! proven one, in the request or in the CSR).
//!
//! Tokens are bearer secrets, so `Identity` is served only on the secure port, TLS with a
//! certificate for the control plane signed by the mesh CA ([`SecurePort`]); proxies trust it
//! through the root they were given (`--ca-root-file`), then through the bundle discovery sends.
//! The serving certificate is re-signed when the signing root changes and before it expires.

pub mod auth;
pub mod ca;
pub mod rotation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use keel_proto::spiffe::SpiffeId;
use keel_proto::v1::identity_server::{Identity, IdentityServer};
use keel_proto::v1::{CertifyRequest, CertifyResponse};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub use auth::{AuthError, Authenticator, BootstrapTokens, Proven, TokenReview};
pub use ca::{CaError, CaStatus, CaStorage, CertificateAuthority, TrustBundle};

use crate::store::Store;

/// The names the control plane's serving certificate carries, besides any configured ones; the
/// proxy checks the first by default (`--control-plane-name`).
pub const CONTROL_PLANE_NAMES: [&str; 4] = [
    "keel-control-plane.keel-system.svc",
    "keel-control-plane.keel-system.svc.cluster.local",
    "keel-control-plane.keel-system",
    "keel-control-plane",
];
/// How long a client may take to finish its TLS handshake on the secure port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Identity` gRPC service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    store: Arc<Store>,
}

impl IdentityService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        store: Arc<Store>,
    ) -> IdentityService {
        IdentityService {
            ca,
            authenticator,
            store,
        }
    }

    pub fn into_server(self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self)
    }

    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, Status> {
        let trust_domain = self.store.current().model.mesh.trust_domain.clone();
        let asked: SpiffeId =
            request
                .identity
                .parse()
                .map_err(|e: keel_proto::spiffe::SpiffeIdError| {
                    Status::invalid_argument(e.to_string())
                })?;
        if asked.trust_domain() != trust_domain {
            return Err(Status::permission_denied(format!(
                "{asked} is outside the mesh's trust domain {trust_domain}"
            )));
        }
        let proven = self
            .authenticator
            .authenticate(&request.token, &trust_domain)
            .await
            .map_err(|e| match e {
                AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            })?;
        if proven.identity != asked {
            return Err(Status::permission_denied(format!(
                "the token proves {}, not {asked}",
                proven.identity
            )));
        }
        let signed = self
            .ca
            .sign_workload(&request.csr, &asked, &request.node_id)
            .map_err(|e| match e {
                CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
                CaError::IdentityMismatch { .. } => Status::permission_denied(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        tracing::info!(
            identity = %asked,
            node = %request.node_id,
            workload = proven.workload.as_deref().unwrap_or(""),
            root = %signed.signed_by,
            valid_for = ?self.ca.workload_ttl(),
            "certificate issued"
        );
        Ok(CertifyResponse {
            certificate_chain: signed.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: signed
                .bundle
                .anchors
                .iter()
                .map(|a| a.der.to_vec())
                .collect(),
            valid_until: Some(prost_types::Timestamp::from(signed.not_after)),
            signed_by: signed.signed_by,
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        match IdentityService::certify(self, request.into_inner()).await {
            Ok(answer) => Ok(Response::new(answer)),
            Err(status) => {
                tracing::warn!(?peer, code = ?status.code(), reason = status.message(), "certificate refused");
                Err(status)
            }
        }
    }
}

/// Serves the control plane's certificate, re-signed as the CA changes.
#[derive(Debug)]
struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn serving_cert(
    ca: &CertificateAuthority,
    names: &[String],
) -> Result<(CertifiedKey, SystemTime), CaError> {
    let (chain, key, not_after) = ca.sign_server(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CaError::BadRoot {
            what: "the serving key".into(),
            reason: e.to_string(),
        })?;
    Ok((CertifiedKey::new(chain, signing_key), not_after))
}

/// The control plane's TLS listener: accepted, handshaken connections for tonic.
pub struct SecurePort {
    pub incoming: mpsc::Receiver<Result<TlsConn, std::io::Error>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SecurePort {
    /// Accepts TLS on `listener` with a certificate from `ca` for the control plane's names plus
    /// `extra_names` (DNS names or IP addresses).
    pub fn start(
        listener: TcpListener,
        ca: Arc<CertificateAuthority>,
        extra_names: Vec<String>,
    ) -> Result<SecurePort, CaError> {
        let mut names: Vec<String> = CONTROL_PLANE_NAMES.iter().map(|s| s.to_string()).collect();
        names.extend(extra_names);
        let (first, mut not_after) = serving_cert(&ca, &names)?;
        let resolver = Arc::new(ServingCert {
            current: ArcSwap::from_pointee(first),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::BadRoot {
            what: "the TLS configuration".into(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        // Re-sign when the signing root changes, and at 70% of the certificate's lifetime.
        let renew = {
            let ca = ca.clone();
            let mut bundles = ca.subscribe();
            tokio::spawn(async move {
                let mut signing = bundles.borrow().signing().map(|a| a.id.clone());
                loop {
                    let lifetime = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let renew_in = lifetime.mul_f64(0.7).max(Duration::from_secs(1));
                    tokio::select! {
                        changed = bundles.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let now_signing = bundles.borrow_and_update().signing().map(|a| a.id.clone());
                            if now_signing == signing {
                                continue;
                            }
                            signing = now_signing;
                        }
                        _ = tokio::time::sleep(renew_in) => {}
                    }
                    match serving_cert(&ca, &names) {
                        Ok((cert, until)) => {
                            resolver.current.store(Arc::new(cert));
                            not_after = until;
                            tracing::info!("control plane serving certificate renewed");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "renewing the control plane's serving certificate failed; retrying");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
            })
        };

        let (tx, incoming) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "secure port accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let info = tonic::transport::server::TcpConnectInfo {
                        local_addr: stream.local_addr().ok(),
                        remote_addr: Some(peer),
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(TlsConn { tls, info })).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake on the secure port failed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake on the secure port timed out")
                        }
                    }
                });
            }
        });
        Ok(SecurePort {
            incoming,
            tasks: vec![renew, accept],
        })
    }
}

/// A TLS connection accepted on the secure port.
pub struct TlsConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    info: tonic::transport::server::TcpConnectInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Where the control plane listens for TLS, and with which extra names.
#[derive(Debug, Clone)]
pub struct SecureConfig {
    pub addr: SocketAddr,
    /// DNS names or IP addresses the serving certificate carries besides
    /// [`CONTROL_PLANE_NAMES`], e.g. the address proxies dial.
    pub extra_names: Vec<String>,
}

//! Starting the control plane: the store, its source, the discovery server and the admin API,
//! each on its own listener, and with an identity configuration the CA and the secure port
//! (TLS: discovery and `Identity`). Binaries, tests and benchmarks all start the control plane
//! here, so they exercise the same wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::Admin;
use crate::discovery::{DiscoveryService, ProxyRegistry};
use crate::identity::{
    Authenticator, BootstrapTokens, CaError, CaStorage, CertificateAuthority, IdentityService,
    SecurePort, TokenReview,
};
use crate::source::file::{FileSource, FileSourceError};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// The directory of mesh YAML to serve.
    pub config_dir: PathBuf,
    /// Plaintext discovery (no `Identity`), as Istio's 15010.
    pub discovery_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The CA and the secure port; `None` runs no CA, so proxies get no certificates.
    pub identity: Option<IdentityConfig>,
}

/// How workloads prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofKind {
    /// The local mesh's bootstrap tokens (`keelctl token`).
    BootstrapToken,
    /// Kubernetes ServiceAccount tokens, checked by TokenReview with the in-cluster (or
    /// kubeconfig) credentials.
    KubernetesToken,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub storage: CaStorage,
    pub workload_ttl: Duration,
    /// TLS: discovery and `Identity`, as Istio's 15012.
    pub secure_addr: SocketAddr,
    /// DNS names or IP addresses for the serving certificate besides the built-in names.
    pub extra_names: Vec<String>,
    pub proof: ProofKind,
}

impl IdentityConfig {
    /// An in-memory CA with bootstrap tokens, on `secure_addr`: tests and throwaway meshes.
    pub fn ephemeral(secure_addr: SocketAddr) -> IdentityConfig {
        IdentityConfig {
            storage: CaStorage::Memory,
            workload_ttl: crate::identity::ca::DEFAULT_WORKLOAD_TTL,
            secure_addr,
            extra_names: Vec::new(),
            proof: ProofKind::BootstrapToken,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] FileSourceError),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("bootstrap token key {path}: {source}")]
    TokenKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes client for TokenReview: {0}")]
    Kube(String),
}

/// A running control plane. Dropping it stops every part of it.
pub struct ControlPlane {
    pub discovery_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The secure port, when the control plane runs a CA.
    pub secure_addr: Option<SocketAddr>,
    pub ca: Option<Arc<CertificateAuthority>>,
    /// Mints bootstrap tokens, when they are the proof of identity.
    pub tokens: Option<Arc<BootstrapTokens>>,
    pub store: Arc<Store>,
    pub registry: Arc<ProxyRegistry>,
    shutdown: watch::Sender<bool>,
    streams: DiscoveryService,
    /// The gRPC servers: they end on the shutdown signal.
    servers: Vec<JoinHandle<()>>,
    /// Everything else (admin API, accept loops, renewal): aborted on shutdown.
    background: Vec<JoinHandle<()>>,
    _source: FileSource,
}

async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { what, addr, source })
}

impl ControlPlane {
    pub async fn start(config: ControlPlaneConfig) -> Result<ControlPlane, StartError> {
        let discovery_listener = listen("discovery", config.discovery_addr).await?;
        let admin_listener = listen("admin", config.admin_addr).await?;
        let discovery_addr = local_addr(&discovery_listener, config.discovery_addr);
        let admin_addr = local_addr(&admin_listener, config.admin_addr);

        // Nothing is served until the source has published a valid model: a control plane
        // started on a broken directory must not tell proxies that the mesh is empty.
        let store = Store::awaiting_source();
        let identity = match &config.identity {
            Some(identity) => Some(Identity::start(identity, &store).await?),
            None => None,
        };
        let source = FileSource::start(config.config_dir.clone(), store.clone()).await?;
        let discovery = DiscoveryService::new(store.clone());
        let registry = discovery.registry();
        let streams = discovery.clone();
        let (shutdown, mut stopped) = watch::channel(false);
        let mut servers = Vec::new();
        let mut background = Vec::new();
        let mut secure_addr = None;
        let (mut ca, mut tokens) = (None, None);
        if let Some(identity) = identity {
            secure_addr = Some(identity.addr);
            ca = Some(identity.ca.clone());
            tokens = identity.tokens.clone();
            let mut port = identity.port;
            background.append(&mut port.tasks);
            background.push(identity.bundle_task);
            let service = IdentityService::new(identity.ca, identity.authenticator, store.clone());
            let discovery = discovery.clone();
            let mut stopped = stopped.clone();
            servers.push(tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                    .add_service(discovery.into_server())
                    .add_service(service.into_server())
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::ReceiverStream::new(port.incoming),
                        async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        },
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "secure discovery server failed");
                }
            }));
        }

        let grpc = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .tcp_nodelay(true)
                .add_service(discovery.into_server())
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(discovery_listener),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "discovery server failed");
            }
        });
        let admin = Admin::new(store.clone(), registry.clone(), Some(source.loader.clone()))
            .with_identity(ca.clone(), tokens.clone());
        servers.push(grpc);
        background.push(tokio::spawn(admin.serve(admin_listener)));
        tracing::info!(%discovery_addr, %admin_addr, secure = ?secure_addr, "control plane started");
        Ok(ControlPlane {
            discovery_addr,
            admin_addr,
            secure_addr,
            ca,
            tokens,
            store,
            registry,
            shutdown,
            streams,
            servers,
            background,
            _source: source,
        })
    }

    /// Stops accepting, closes every stream and waits for the servers to end.
    pub async fn shutdown(mut self) {
        self.streams.stop();
        let _ = self.shutdown.send(true);
        for task in self.background.drain(..) {
            task.abort();
        }
        // Proxies usually close their connections at once; a deadline covers those that do not
        // answer the GOAWAY.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for task in self.servers.drain(..) {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.streams.stop();
        for task in self.servers.iter().chain(&self.background) {
            task.abort();
        }
    }
}

/// The running parts of the identity configuration.
struct Identity {
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    tokens: Option<Arc<BootstrapTokens>>,
    port: SecurePort,
    bundle_task: JoinHandle<()>,
}

impl Identity {
    async fn start(config: &IdentityConfig, store: &Arc<Store>) -> Result<Identity, StartError> {
        let listener = listen("the secure port", config.secure_addr).await?;
        let addr = local_addr(&listener, config.secure_addr);
        let ca = Arc::new(CertificateAuthority::open(
            config.storage.clone(),
            config.workload_ttl,
        )?);
        let (authenticator, tokens): (Arc<dyn Authenticator>, _) = match config.proof {
            ProofKind::BootstrapToken => {
                let key = match &config.storage {
                    CaStorage::Directory { dir, .. } => {
                        let path = dir.join("token-key");
                        BootstrapTokens::key_from_file(&path)
                            .map_err(|source| StartError::TokenKey { path, source })?
                    }
                    CaStorage::Memory => rand::random::<[u8; 32]>().to_vec(),
                };
                let tokens = Arc::new(BootstrapTokens::new(&key, store.clone()));
                (tokens.clone(), Some(tokens))
            }
            ProofKind::KubernetesToken => {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| StartError::Kube(e.to_string()))?;
                (Arc::new(TokenReview::new(client)), None)
            }
        };
        // Every change of the CA's roots becomes a snapshot, so proxies learn the bundle.
        store.set_trust(ca.bundle());
        let bundle_task = {
            let mut bundles = ca.subscribe();
            let store = store.clone();
            tokio::spawn(async move {
                while bundles.changed().await.is_ok() {
                    let bundle = bundles.borrow_and_update().clone();
                    store.set_trust(bundle);
                }
            })
        };
        let port = SecurePort::start(listener, ca.clone(), config.extra_names.clone())?;
        Ok(Identity {
            addr,
            ca,
            authenticator,
            tokens,
            port,
            bundle_task,
        })
    }
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(asked)
}

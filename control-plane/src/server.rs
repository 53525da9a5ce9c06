//! Starting the control plane: the store, its source, the discovery server and the admin API,
//! each on its own listener. Binaries, tests and benchmarks all start the control plane here, so
//! they exercise the same wiring.

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
use crate::model::Model;
use crate::source::file::{FileSource, FileSourceError};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// The directory of mesh YAML to serve.
    pub config_dir: PathBuf,
    pub discovery_addr: SocketAddr,
    pub admin_addr: SocketAddr,
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
}

/// A running control plane. Dropping it stops every part of it.
pub struct ControlPlane {
    pub discovery_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<Store>,
    pub registry: Arc<ProxyRegistry>,
    shutdown: watch::Sender<bool>,
    streams: DiscoveryService,
    tasks: Vec<JoinHandle<()>>,
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

        let store = Store::new(Model::default());
        let source = FileSource::start(config.config_dir.clone(), store.clone()).await?;
        let discovery = DiscoveryService::new(store.clone());
        let registry = discovery.registry();
        let streams = discovery.clone();
        let (shutdown, mut stopped) = watch::channel(false);

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
        let admin = Admin::new(store.clone(), registry.clone(), Some(source.loader.clone()));
        let admin_task = tokio::spawn(admin.serve(admin_listener));
        tracing::info!(%discovery_addr, %admin_addr, "control plane started");
        Ok(ControlPlane {
            discovery_addr,
            admin_addr,
            store,
            registry,
            shutdown,
            streams,
            tasks: vec![grpc, admin_task],
            _source: source,
        })
    }

    /// Stops accepting, closes every stream and waits for the servers to end.
    pub async fn shutdown(mut self) {
        self.streams.stop();
        let _ = self.shutdown.send(true);
        if let Some(admin) = self.tasks.pop() {
            admin.abort();
        }
        for task in self.tasks.drain(..) {
            // Proxies usually close their connections at once; a deadline covers those that
            // do not answer the GOAWAY.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.streams.stop();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(asked)
}

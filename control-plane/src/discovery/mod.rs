//! The discovery server: streams each proxy its view of the mesh, incrementally, with xDS
//! semantics (per-type subscriptions, per-resource versions, nonces, ACK/NACK, resume on
//! reconnect). See `proto/keel/mesh/v1/discovery.proto` for the contract.
//!
//! Every stream runs in its own task and reads snapshots from the store's watch channel, so a
//! slow or stuck proxy never delays the others and never makes the store wait.

pub mod registry;
pub mod resources;
mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::store::Store;
pub use registry::{DisconnectedProxy, ProxyRegistry, ProxyStatus};
pub use stream::RESPONSE_BUDGET;

/// Responses queued for one proxy. At most one response per type is unacknowledged, so this
/// bounds memory per stream without ever dropping a response.
const RESPONSE_QUEUE: usize = 8;

/// A proxy that connects must name itself within this time.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The gRPC `keel.mesh.v1.Discovery` service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    store: Arc<Store>,
    registry: Arc<ProxyRegistry>,
    streams: Arc<AtomicU64>,
    /// Set when the control plane stops: every stream ends with UNAVAILABLE, so proxies
    /// reconnect elsewhere instead of holding a stream to a server that is gone.
    stopping: watch::Sender<bool>,
}

impl DiscoveryService {
    pub fn new(store: Arc<Store>) -> DiscoveryService {
        DiscoveryService {
            store,
            registry: Arc::new(ProxyRegistry::default()),
            streams: Arc::new(AtomicU64::new(0)),
            stopping: watch::Sender::new(false),
        }
    }

    /// Ends every open stream and refuses new ones.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn registry(&self) -> Arc<ProxyRegistry> {
        self.registry.clone()
    }

    /// The tonic service, ready to add to a server.
    pub fn into_server(self) -> DiscoveryServer<DiscoveryService> {
        DiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let id = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshots = self.store.subscribe();
        let registry = self.registry.clone();
        let stopping = self.stopping.subscribe();
        if *stopping.borrow() {
            return Err(Status::unavailable("the control plane is shutting down"));
        }
        tokio::spawn(async move {
            let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, requests.message()).await
            {
                Ok(Ok(Some(first))) => first,
                Ok(Ok(None)) => return,
                Ok(Err(status)) => {
                    tracing::warn!(stream = id, ?peer, error = %status.message(), "bad first discovery request");
                    // The stream must not end as if all were well (grpc-status 0): say why.
                    if let Some(answer) = stream::unreadable_request(1, &status) {
                        let _ = tx.send(Err(answer)).await;
                    }
                    return;
                }
                Err(_) => {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(
                            "no discovery request within 30s of connecting",
                        )))
                        .await;
                    return;
                }
            };
            stream::serve(id, peer, first, requests, snapshots, stopping, registry, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

//! Shared setup for keel's cross-process tests and benchmarks.
//!
//! [`DiscoveryClient`] speaks the discovery protocol the way a proxy does, but every step is the
//! caller's: when to ACK, when to NACK, when to stop reading. Tests use it to drive the control
//! plane into the cases a well-behaved proxy never produces; the benchmark uses it to simulate
//! many proxies cheaply.

pub mod capture;
pub mod endpoint;
pub mod fleet;
pub mod netns;
pub mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use keel_proto::v1::discovery_client::DiscoveryClient as GrpcClient;
use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Locality, Node, type_url};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Starts a control plane on loopback ports chosen by the system, serving `dir`.
pub async fn start_control_plane(dir: &Path) -> anyhow::Result<ControlPlane> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(ControlPlane::start(ControlPlaneConfig {
        config_dir: dir.to_path_buf(),
        discovery_addr: any,
        admin_addr: any,
        identity: None,
    })
    .await?)
}

/// A node as a proxy of `workload` in `namespace` would describe itself.
pub fn node(workload: &str, namespace: &str) -> Node {
    Node {
        id: format!("{workload}.{namespace}"),
        workload: workload.to_owned(),
        namespace: namespace.to_owned(),
        service_account: workload.to_owned(),
        locality: Some(Locality {
            region: "local".to_owned(),
            zone: "zone-a".to_owned(),
            subzone: String::new(),
        }),
        pod_ips: vec!["10.77.0.250".to_owned()],
        proxy_version: "test".to_owned(),
    }
}

/// What a simulated proxy holds: per type, name -> (version, encoded resource).
pub type Held = BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>>;

/// One discovery stream, driven by hand.
pub struct DiscoveryClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    /// What this client has applied (everything it ACKed).
    pub held: Held,
    /// Per type, the system version of the last response ACKed, echoed in ACKs and NACKs.
    applied: BTreeMap<String, String>,
}

impl DiscoveryClient {
    /// Opens a stream and sends the node; subscribes to nothing yet.
    pub async fn connect(addr: SocketAddr, node: Node) -> anyhow::Result<DiscoveryClient> {
        DiscoveryClient::connect_with_window(addr, node, None).await
    }

    /// Like [`DiscoveryClient::connect`], with the HTTP/2 flow-control window (stream and
    /// connection) this client offers; `None` keeps the default (megabytes). A client that
    /// never reads stops the server from sending more than `window` bytes on its connection.
    pub async fn connect_with_window(
        addr: SocketAddr,
        node: Node,
        window: Option<u32>,
    ) -> anyhow::Result<DiscoveryClient> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let mut grpc = GrpcClient::new(channel).max_decoding_message_size(256 << 20);
        let (requests, rx) = mpsc::channel(16);
        requests
            .send(DiscoveryRequest {
                node: Some(node),
                ..Default::default()
            })
            .await?;
        let responses = grpc
            .stream(ReceiverStream::new(rx))
            .await
            .context("opening the discovery stream")?
            .into_inner();
        Ok(DiscoveryClient {
            requests,
            responses,
            held: Held::new(),
            applied: BTreeMap::new(),
        })
    }

    /// Subscribes to every resource of `type_url`, saying which versions it already holds.
    pub async fn subscribe(&self, type_url: &str) -> anyhow::Result<()> {
        let initial: BTreeMap<String, String> = self
            .held
            .get(type_url)
            .map(|m| m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        self.send(DiscoveryRequest {
            type_url: type_url.to_owned(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
    }

    /// Subscribes to every type the control plane serves.
    pub async fn subscribe_all(&self) -> anyhow::Result<()> {
        for t in type_url::ALL {
            self.subscribe(t).await?;
        }
        Ok(())
    }

    pub async fn send(&self, request: DiscoveryRequest) -> anyhow::Result<()> {
        self.requests
            .send(request)
            .await
            .map_err(|_| anyhow::anyhow!("the stream is closed"))
    }

    /// The next response, or an error if none comes within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> anyhow::Result<DiscoveryResponse> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => bail!("the control plane closed the stream"),
            Ok(Err(status)) => bail!("stream error: {status}"),
            Err(_) => bail!("no response within {wait:?}"),
        }
    }

    /// The next response, however long it takes (no timer: the benchmark's simulated proxies
    /// wait like this, so that each message costs no more than a real proxy's would).
    pub async fn next(&mut self) -> anyhow::Result<DiscoveryResponse> {
        match self.responses.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => bail!("the control plane closed the stream"),
            Err(status) => bail!("stream error: {status}"),
        }
    }

    /// Whether a response arrives within `wait` (consuming it if so).
    pub async fn quiet_for(&mut self, wait: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Err(_) => Ok(()),
            Ok(Ok(Some(r))) => bail!(
                "unexpected response for {} with {} resources and {} removals",
                r.type_url,
                r.resources.len(),
                r.removed_resources.len()
            ),
            Ok(Ok(None)) => bail!("the control plane closed the stream"),
            Ok(Err(status)) => bail!("stream error: {status}"),
        }
    }

    /// Applies a response to `held` and ACKs it.
    pub async fn ack(&mut self, response: &DiscoveryResponse) -> anyhow::Result<()> {
        let held = self.held.entry(response.type_url.clone()).or_default();
        for r in &response.resources {
            let body = r
                .resource
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default();
            held.insert(r.name.clone(), (r.version.clone(), body));
        }
        for name in &response.removed_resources {
            held.remove(name);
        }
        self.applied
            .insert(response.type_url.clone(), response.system_version.clone());
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            system_version: response.system_version.clone(),
            ..Default::default()
        })
        .await
    }

    /// Rejects a response, keeping what it held.
    pub async fn nack(&mut self, response: &DiscoveryResponse, why: &str) -> anyhow::Result<()> {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            system_version: self
                .applied
                .get(&response.type_url)
                .cloned()
                .unwrap_or_default(),
            error_detail: Some(ErrorDetail {
                code: 3,
                message: why.to_owned(),
            }),
            ..Default::default()
        })
        .await
    }

    /// Receives and ACKs responses until the complete state of every type in `types` arrived.
    pub async fn sync(&mut self, types: &[&str], wait: Duration) -> anyhow::Result<()> {
        let mut missing: Vec<&str> = types.to_vec();
        while !missing.is_empty() {
            let r = self.recv(wait).await?;
            self.ack(&r).await?;
            if !r.incomplete {
                missing.retain(|t| *t != r.type_url);
            }
        }
        Ok(())
    }

    /// Names held of `type_url`.
    pub fn names(&self, type_url: &str) -> Vec<String> {
        self.held
            .get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Closes the stream, keeping what it holds for a reconnect.
    pub fn into_held(self) -> Held {
        self.held
    }

    /// Reconnects holding `held`: the next subscriptions announce those versions.
    pub async fn reconnect(addr: SocketAddr, node: Node, held: Held) -> anyhow::Result<Self> {
        let mut client = DiscoveryClient::connect(addr, node).await?;
        client.held = held;
        Ok(client)
    }
}

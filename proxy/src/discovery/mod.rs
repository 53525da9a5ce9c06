//! The discovery client: keeps the proxy's [`Config`] in step with the control plane.
//!
//! [`spawn`] starts one tokio task that holds one bidirectional `keel.mesh.v1.Discovery` stream
//! at a time. On every (re)connect it sends the [`Node`] on the first request and subscribes to
//! every type in [`type_url::ALL`] with a wildcard, announcing in `initial_resource_versions`
//! the versions it already holds, so a control plane resends only what differs. Each response
//! goes through a [`ConfigBuilder`]: when it applies, the new configuration is published to the
//! [`ConfigStore`] and the response is ACKed (its nonce, no error); when it is rejected, the
//! previous configuration stays and the response is NACKed (its nonce and an `ErrorDetail` with
//! code 3, INVALID_ARGUMENT, and the reason).
//!
//! When the stream fails the client reconnects after a jittered exponential back-off
//! ([`BackoffConfig`]: 100 ms base, 15 s cap, full jitter, reset after a stream that stayed
//! healthy). Meanwhile the store is not touched: the data path keeps serving the last good
//! configuration for as long as the control plane is away.
//!
//! Readiness: the proxy is ready once it holds a complete configuration, that is once a response
//! of every subscribed type was applied (the control plane always sends a first response per
//! type, empty if need be). Until then nothing is published, so the data path never sees a
//! half-received first configuration. Once ready, the proxy stays ready across reconnects, since
//! it keeps serving what it has.
//!
//! The [`DiscoveryHandle`] returned by [`spawn`] exposes readiness, the current configuration
//! and counters ([`DiscoveryStats`]) for the admin server; dropping it stops the client.
//!
//! This module must never modify the published configuration except with a complete, validated
//! one, never block the data path, and never give up reconnecting while its handle lives.

pub(crate) mod backoff;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_proto::v1::discovery_client::DiscoveryClient as GrpcClient;
use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node, type_url};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{Config, ConfigBuilder, ConfigStore, ResourceKind};
use crate::tls::control_plane::{ControlPlane, ControlPlaneTls};
use backoff::Backoff;
pub use backoff::{BackoffConfig, Jitter};

/// The version the proxy reports in its [`Node`].
pub const PROXY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest discovery response the client accepts. tonic's default (4 MiB) is too small for
/// the first response of a large mesh (every Service or Endpoints resource in one message), and a
/// response over the limit fails the stream on every reconnect, leaving the proxy stuck. 64 MiB
/// leaves ample headroom while still bounding what one message can make the proxy allocate.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The gRPC status code a NACK carries: INVALID_ARGUMENT.
const NACK_CODE: i32 = 3;

/// Requests queued towards the control plane: the six subscriptions of a new stream, then one
/// ACK or NACK per response (at most one response per type is unanswered at a time).
const REQUEST_QUEUE: usize = 16;

/// How the discovery client reaches the control plane and who it says it is.
#[derive(Debug, Clone)]
pub struct DiscoveryClientConfig {
    /// The control plane's discovery address, e.g. `http://keel-control-plane.keel-system:15010`
    /// or `10.0.0.5:15010` (plain `host:port` means `http://`), or `https://...:15012`.
    pub control_plane: String,
    /// How to check the control plane over `https://`.
    pub tls: Option<Arc<ControlPlaneTls>>,
    /// Who the proxy is. `workload` and `namespace` are required; an empty `id` becomes
    /// `<workload>.<namespace>` and an empty `proxy_version` becomes [`PROXY_VERSION`].
    pub node: Node,
    pub connect_timeout: Duration,
    pub backoff: BackoffConfig,
    /// See [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
}

impl DiscoveryClientConfig {
    pub fn new(control_plane: impl Into<String>, node: Node) -> DiscoveryClientConfig {
        DiscoveryClientConfig {
            control_plane: control_plane.into(),
            tls: None,
            node,
            connect_timeout: Duration::from_secs(5),
            backoff: BackoffConfig::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// Why the discovery client cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    ControlPlane(#[from] crate::tls::control_plane::ControlPlaneError),
    #[error("invalid node: {field}: {reason}")]
    BadNode { field: &'static str, reason: String },
}

/// What the discovery client has done so far, for the admin server and for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryStats {
    /// Whether a stream is open now.
    pub connected: bool,
    /// Whether a complete configuration has been received.
    pub ready: bool,
    /// Streams opened, the first one included.
    pub streams: u64,
    /// Connection attempts after a failed or ended stream.
    pub reconnects: u64,
    pub responses: u64,
    /// Resources carried by all responses (a resync that resends nothing adds none).
    pub resources_received: u64,
    /// Resource names carried as removed by all responses.
    pub removals_received: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Why the last stream or connection attempt failed.
    pub last_error: Option<String>,
    /// Why the last rejected response was rejected.
    pub last_nack: Option<String>,
}

/// Counters shared between the client task and its handle.
#[derive(Debug, Default)]
struct Shared {
    connected: AtomicBool,
    streams: AtomicU64,
    reconnects: AtomicU64,
    responses: AtomicU64,
    resources: AtomicU64,
    removals: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_nack: Mutex<Option<String>>,
}

/// A poisoned lock only means a panic elsewhere; the `Option<String>` inside is still sound.
fn lock(m: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The running discovery client. Dropping it stops the client; the store keeps the last
/// configuration.
#[derive(Debug)]
pub struct DiscoveryHandle {
    store: Arc<ConfigStore>,
    ready: watch::Receiver<bool>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl DiscoveryHandle {
    /// Whether a complete configuration has been received (the admin `/ready`).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Readiness as a channel, to wait for it: `ready.wait_for(|r| *r).await`.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The current configuration (the one the data path reads).
    pub fn config(&self) -> Arc<Config> {
        self.store.current()
    }

    pub fn store(&self) -> &Arc<ConfigStore> {
        &self.store
    }

    pub fn stats(&self) -> DiscoveryStats {
        let s = &self.shared;
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiscoveryStats {
            connected: s.connected.load(Ordering::Relaxed),
            ready: self.is_ready(),
            streams: count(&s.streams),
            reconnects: count(&s.reconnects),
            responses: count(&s.responses),
            resources_received: count(&s.resources),
            removals_received: count(&s.removals),
            acks: count(&s.acks),
            nacks: count(&s.nacks),
            last_error: lock(&s.last_error).clone(),
            last_nack: lock(&s.last_nack).clone(),
        }
    }

    /// Stops the client and waits for its task to end (closing the stream).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts the discovery client on the current tokio runtime. It publishes every complete,
/// valid configuration to `store`.
pub fn spawn(
    config: DiscoveryClientConfig,
    store: Arc<ConfigStore>,
) -> Result<DiscoveryHandle, DiscoveryError> {
    let node = checked_node(config.node)?;
    let control_plane =
        ControlPlane::new(&config.control_plane, config.tls, config.connect_timeout)?;

    let (ready_tx, ready) = watch::channel(false);
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let client = Client {
        builder: ConfigBuilder::new(node.namespace.clone()),
        control_plane,
        node,
        max_message_size: config.max_message_size,
        store: store.clone(),
        ready: ready_tx,
        shared: shared.clone(),
        published: false,
        applied_versions: HashMap::new(),
    };
    let task = tokio::spawn(client.run(Backoff::new(config.backoff), stopped));
    Ok(DiscoveryHandle {
        store,
        ready,
        shared,
        stop,
        task: Some(task),
    })
}

/// Checks what the control plane requires of a node and fills the defaults.
fn checked_node(mut node: Node) -> Result<Node, DiscoveryError> {
    let empty = |field| DiscoveryError::BadNode {
        field,
        reason: "must not be empty".to_owned(),
    };
    if node.workload.is_empty() {
        return Err(empty("workload"));
    }
    if node.namespace.is_empty() {
        return Err(empty("namespace"));
    }
    if let Some(bad) = node.pod_ips.iter().find(|ip| ip.parse::<IpAddr>().is_err()) {
        return Err(DiscoveryError::BadNode {
            field: "pod_ips",
            reason: format!("{bad:?} is not an IP address"),
        });
    }
    if node.id.is_empty() {
        node.id = format!("{}.{}", node.workload, node.namespace);
    }
    if node.proxy_version.is_empty() {
        node.proxy_version = PROXY_VERSION.to_owned();
    }
    Ok(node)
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the control plane refused the stream: {}", status_text(.0))]
    Open(tonic::Status),
    #[error("the stream failed: {}", status_text(.0))]
    Receive(tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
    #[error("the request side of the stream closed")]
    RequestsClosed,
}

fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}: {}", status.code(), error_chain(status))
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// An error and its sources on one line (tonic's transport errors say little at the top).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// What one stream achieved, to decide whether it counts as healthy.
#[derive(Debug, Default)]
struct Session {
    opened: Option<Instant>,
    responses: u64,
}

impl Session {
    fn was_healthy(&self, healthy_after: Duration) -> bool {
        self.responses > 0 && self.opened.is_some_and(|t| t.elapsed() >= healthy_after)
    }
}

/// The client task's state; lives across streams.
struct Client {
    builder: ConfigBuilder,
    control_plane: ControlPlane,
    node: Node,
    max_message_size: usize,
    store: Arc<ConfigStore>,
    ready: watch::Sender<bool>,
    shared: Arc<Shared>,
    /// Whether a configuration was ever published (the first complete one must be, even when
    /// the response that completed it changed nothing).
    published: bool,
    /// Per type URL, the `system_version` of the last response applied on the current stream,
    /// echoed in every ACK and NACK. Cleared with each new stream: a version is the numbering of
    /// one control plane, meaningless to the next.
    applied_versions: HashMap<String, String>,
}

impl Client {
    async fn run(mut self, mut backoff: Backoff, mut stop: watch::Receiver<bool>) {
        loop {
            let mut session = Session::default();
            let ended = tokio::select! {
                ended = self.stream(&mut session) => ended,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Err(error) = ended;
            self.shared.connected.store(false, Ordering::Relaxed);
            if session.was_healthy(backoff.config().healthy_after) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                control_plane = %self.control_plane.address,
                %error,
                retry_in = ?delay,
                "discovery stream down; serving the last good configuration"
            );
            *lock(&self.shared.last_error) = Some(error.to_string());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            bump(&self.shared.reconnects, 1);
        }
    }

    /// Runs one stream until it fails.
    async fn stream(&mut self, session: &mut Session) -> Result<Infallible, StreamError> {
        let channel = self
            .control_plane
            .connect()
            .await
            .map_err(|e| StreamError::Connect(error_chain(&e)))?;
        let mut grpc = GrpcClient::new(channel).max_decoding_message_size(self.max_message_size);

        let (requests, outbox) = mpsc::channel(REQUEST_QUEUE);
        for (i, kind) in ResourceKind::ALL.into_iter().enumerate() {
            let subscribe = DiscoveryRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: kind.type_url().to_owned(),
                subscribe: vec!["*".to_owned()],
                initial_resource_versions: self.builder.versions(kind),
                ..DiscoveryRequest::default()
            };
            requests
                .send(subscribe)
                .await
                .map_err(|_| StreamError::RequestsClosed)?;
        }
        let mut responses = grpc
            .stream(ReceiverStream::new(outbox))
            .await
            .map_err(StreamError::Open)?
            .into_inner();

        session.opened = Some(Instant::now());
        self.applied_versions.clear();
        bump(&self.shared.streams, 1);
        self.shared.connected.store(true, Ordering::Relaxed);
        tracing::info!(control_plane = %self.control_plane.address, node = %self.node.id, "discovery stream open");

        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Err(StreamError::Closed),
                Err(status) => return Err(StreamError::Receive(status)),
            };
            session.responses += 1;
            let answer = self.handle(&response);
            requests
                .send(answer)
                .await
                .map_err(|_| StreamError::RequestsClosed)?;
        }
    }

    /// Applies one response and returns its ACK or NACK.
    fn handle(&mut self, response: &DiscoveryResponse) -> DiscoveryRequest {
        let shared = &self.shared;
        bump(&shared.responses, 1);
        bump(&shared.resources, response.resources.len() as u64);
        bump(&shared.removals, response.removed_resources.len() as u64);
        let kind = short_type(&response.type_url);
        match self.builder.apply(response) {
            Ok(applied) => {
                let complete = self.builder.is_complete();
                if complete && (applied.changed || !self.published) {
                    self.store.publish(applied.config.clone());
                    self.published = true;
                }
                tracing::debug!(
                    r#type = kind,
                    version = %response.system_version,
                    resources = response.resources.len(),
                    removed = response.removed_resources.len(),
                    changed = applied.changed,
                    generation = applied.config.generation(),
                    "applied discovery response"
                );
                if applied.changed && !applied.config.unresolved().is_empty() {
                    tracing::debug!(
                        unresolved = applied.config.unresolved().len(),
                        "configuration has unresolved references (see /config)"
                    );
                }
                if complete {
                    let became_ready = self
                        .ready
                        .send_if_modified(|ready| !std::mem::replace(ready, true));
                    if became_ready {
                        tracing::info!(
                            services = applied.config.services().count(),
                            "configuration complete; proxy ready"
                        );
                    }
                }
                bump(&shared.acks, 1);
                self.applied_versions
                    .insert(response.type_url.clone(), response.system_version.clone());
                DiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    system_version: response.system_version.clone(),
                    ..DiscoveryRequest::default()
                }
            }
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(
                    r#type = kind,
                    version = %response.system_version,
                    nonce = %response.nonce,
                    error = %message,
                    "rejected discovery response; keeping the previous configuration"
                );
                bump(&shared.nacks, 1);
                *lock(&shared.last_nack) = Some(message.clone());
                DiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    // The version kept, in the server's terms.
                    system_version: self
                        .applied_versions
                        .get(&response.type_url)
                        .cloned()
                        .unwrap_or_default(),
                    error_detail: Some(ErrorDetail {
                        code: NACK_CODE,
                        message,
                    }),
                    ..DiscoveryRequest::default()
                }
            }
        }
    }
}

/// `Service` for its type URL, for logs.
fn short_type(url: &str) -> &str {
    ResourceKind::from_type_url(url).map_or(url, |k| k.as_str())
}

// The subscriptions cover exactly the types the contract defines.
const _: () = assert!(type_url::ALL.len() == ResourceKind::ALL.len());

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::v1::{Locality, Resource};
    use prost::Message;
    use prost_types::Any;

    fn node() -> Node {
        Node {
            workload: "frontend".to_owned(),
            namespace: "demo".to_owned(),
            service_account: "frontend".to_owned(),
            locality: Some(Locality::default()),
            pod_ips: vec!["10.0.0.1".to_owned()],
            ..Node::default()
        }
    }

    fn client() -> Client {
        let (ready, _) = watch::channel(false);
        Client {
            builder: ConfigBuilder::new("demo"),
            control_plane: ControlPlane::new("http://127.0.0.1:1", None, Duration::from_secs(1))
                .expect("address"),
            node: node(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            store: Arc::new(ConfigStore::default()),
            ready,
            shared: Arc::new(Shared::default()),
            published: false,
            applied_versions: HashMap::new(),
        }
    }

    fn empty_response(kind: ResourceKind, nonce: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: kind.type_url().to_owned(),
            system_version: "1".to_owned(),
            nonce: nonce.to_owned(),
            ..DiscoveryResponse::default()
        }
    }

    #[test]
    fn node_defaults_are_filled_and_required_fields_checked() {
        let filled = checked_node(node()).expect("valid node");
        assert_eq!(filled.id, "frontend.demo");
        assert_eq!(filled.proxy_version, PROXY_VERSION);

        let mut bad = node();
        bad.namespace.clear();
        assert!(matches!(
            checked_node(bad),
            Err(DiscoveryError::BadNode {
                field: "namespace",
                ..
            })
        ));
        let mut bad = node();
        bad.pod_ips = vec!["10.0.0.300".to_owned()];
        assert!(matches!(
            checked_node(bad),
            Err(DiscoveryError::BadNode {
                field: "pod_ips",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_bad_address_is_refused_at_start() {
        let config = DiscoveryClientConfig::new("http://[::1", node());
        let result = spawn(config, Arc::new(ConfigStore::default()));
        assert!(matches!(result, Err(DiscoveryError::ControlPlane(_))));
        let config = DiscoveryClientConfig::new("ftp://127.0.0.1:1", node());
        let result = spawn(config, Arc::new(ConfigStore::default()));
        assert!(matches!(result, Err(DiscoveryError::ControlPlane(_))));
        // TLS without roots to check the control plane with is refused, never downgraded.
        let config = DiscoveryClientConfig::new("https://127.0.0.1:15012", node());
        let result = spawn(config, Arc::new(ConfigStore::default()));
        assert!(matches!(
            result,
            Err(DiscoveryError::ControlPlane(
                crate::tls::control_plane::ControlPlaneError::MissingRoots
            ))
        ));
    }

    #[test]
    fn nothing_is_published_and_not_ready_until_every_type_arrived() {
        let mut client = client();
        let ready = client.ready.subscribe();
        for (i, kind) in ResourceKind::ALL.into_iter().enumerate() {
            assert!(!*ready.borrow());
            assert_eq!(client.store.current().generation(), 0);
            let answer = client.handle(&empty_response(kind, &i.to_string()));
            assert_eq!(answer.response_nonce, i.to_string());
            assert!(answer.error_detail.is_none());
            // The ACK names the version applied.
            assert_eq!(answer.system_version, "1");
        }
        assert!(*ready.borrow());
        // The completing response changed nothing, yet the complete config is published.
        assert_eq!(client.store.current().local_namespace(), "demo");
        assert_eq!(client.shared.acks.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_rejected_response_is_nacked_with_code_3_and_the_config_kept() {
        let mut client = client();
        for kind in ResourceKind::ALL {
            client.handle(&empty_response(kind, "0"));
        }
        let before = client.store.current();
        let broken = DiscoveryResponse {
            type_url: type_url::SERVICE.to_owned(),
            system_version: "2".to_owned(),
            nonce: "7".to_owned(),
            resources: vec![Resource {
                name: "demo/articles".to_owned(),
                version: "1".to_owned(),
                resource: Some(Any {
                    type_url: type_url::SERVICE.to_owned(),
                    value: vec![0xff, 0xff, 0xff],
                }),
            }],
            ..DiscoveryResponse::default()
        };
        let answer = client.handle(&broken);
        assert_eq!(answer.response_nonce, "7");
        // The NACK names the version kept, not the one refused.
        assert_eq!(answer.system_version, "1");
        let detail = answer.error_detail.expect("a NACK");
        assert_eq!(detail.code, 3);
        assert!(
            detail.message.contains("demo/articles"),
            "{}",
            detail.message
        );
        assert!(Arc::ptr_eq(&before, &client.store.current()));
        assert_eq!(client.shared.nacks.load(Ordering::Relaxed), 1);
        assert!(lock(&client.shared.last_nack).is_some());
    }

    #[test]
    fn an_accepted_change_is_published() {
        let mut client = client();
        for kind in ResourceKind::ALL {
            client.handle(&empty_response(kind, "0"));
        }
        let service = keel_proto::v1::Service {
            name: "articles".to_owned(),
            namespace: "demo".to_owned(),
            ports: vec![keel_proto::v1::ServicePort {
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        };
        let answer = client.handle(&DiscoveryResponse {
            type_url: type_url::SERVICE.to_owned(),
            nonce: "8".to_owned(),
            resources: vec![Resource {
                name: "demo/articles".to_owned(),
                version: "1".to_owned(),
                resource: Some(Any {
                    type_url: type_url::SERVICE.to_owned(),
                    value: service.encode_to_vec(),
                }),
            }],
            ..DiscoveryResponse::default()
        });
        assert!(answer.error_detail.is_none());
        assert!(client.store.current().service("demo/articles").is_some());
    }
}

//! The proxy's discovery client against a real, in-process control plane serving a temporary
//! directory of mesh YAML: initial sync and readiness, updates, ACKs seen by the control plane,
//! and surviving a control plane restart without losing or re-downloading configuration.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use keel_proxy::config::{ConfigStore, ResourceKind};
use keel_proxy::discovery::{self, BackoffConfig, DiscoveryClientConfig, DiscoveryHandle};
use keel_tests::node;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Generous bound for "soon": tests fail only when something never happens, not when the
/// machine is slow.
const SOON: Duration = Duration::from_secs(5);

const MESH: &str = "apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: test.local
";

const SERVICES: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: frontend
  namespace: demo
spec:
  vips: [10.96.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  selector:
    app: frontend
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: articles
  namespace: demo
spec:
  vips: [10.96.0.11]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  selector:
    app: articles
  routes:
  - name: by-id
    match:
      path: {regex: '/articles/[0-9]+'}
    destinations:
    - service: articles
";

fn workload(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: demo
  labels:
    app: {app}
spec:
  serviceAccount: {app}
  addresses: [{ip}]
  locality:
    region: local
    zone: zone-a
"
    )
}

fn write_mesh(dir: &Path) {
    std::fs::write(dir.join("mesh.yaml"), MESH).expect("write mesh");
    std::fs::write(dir.join("services.yaml"), SERVICES).expect("write services");
    std::fs::write(
        dir.join("frontend.yaml"),
        workload("frontend-1", "frontend", "10.77.0.2"),
    )
    .expect("write frontend");
    std::fs::write(
        dir.join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.3"),
    )
    .expect("write articles");
}

async fn control_plane(dir: &Path, discovery_addr: SocketAddr) -> ControlPlane {
    ControlPlane::start(ControlPlaneConfig {
        config_dir: dir.to_path_buf(),
        discovery_addr,
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        identity: None,
    })
    .await
    .expect("control plane starts")
}

/// A loopback address with a port that was free a moment ago, so that a second control plane
/// can listen where the first one did.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

/// A TCP relay standing in for the network path to a control plane. Dropping it cuts every
/// connection through it at once, as the crash of the control plane's process would.
/// (`ControlPlane::shutdown` stops accepting but leaves open discovery streams running, so it
/// cannot stand in for a control plane that went away.)
struct Relay {
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(listen: SocketAddr, target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(listen).await.expect("relay binds");
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_client(addr: SocketAddr) -> DiscoveryHandle {
    let mut node = node("frontend-1", "demo");
    // Left empty, the client reports its own version.
    node.proxy_version.clear();
    let mut config = DiscoveryClientConfig::new(format!("http://{addr}"), node);
    // Short delays keep the restart test brief; correctness does not depend on them.
    config.backoff = BackoffConfig {
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
        healthy_after: Duration::from_secs(10),
        ..BackoffConfig::default()
    };
    discovery::spawn(config, Arc::new(ConfigStore::default())).expect("client starts")
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {SOON:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn ready(client: &DiscoveryHandle) {
    let mut ready = client.ready();
    tokio::time::timeout(SOON, ready.wait_for(|r| *r))
        .await
        .expect("ready within SOON")
        .expect("the client is running");
}

fn articles_endpoints(client: &DiscoveryHandle) -> Vec<String> {
    let config = client.config();
    let Some(target) = config.by_host("articles.demo.svc.cluster.local", 80) else {
        return Vec::new();
    };
    target
        .service
        .endpoint_addrs(target.port)
        .map(|(addr, _)| addr.to_string())
        .collect()
}

/// Every type acknowledged on the control plane's side, by the one connected proxy.
fn all_acked(cp: &ControlPlane) -> bool {
    let proxies = cp.registry.list();
    proxies.len() == 1
        && ResourceKind::ALL.into_iter().all(|k| {
            proxies[0]
                .types
                .get(k.as_str())
                .is_some_and(|t| t.acked_version.is_some() && t.pending_nonce.is_none())
        })
}

#[tokio::test]
async fn initial_sync_makes_the_proxy_ready_and_acks_every_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = control_plane(dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
    let client = start_client(cp.discovery_addr);
    ready(&client).await;

    let config = client.config();
    let names: Vec<&str> = config.services().map(|s| s.name()).collect();
    assert_eq!(names, ["demo/articles", "demo/frontend"]);
    assert_eq!(config.mesh().trust_domain, "test.local");
    assert_eq!(config.local_namespace(), "demo");
    let by_vip = config
        .by_addr("10.96.0.11:80".parse().expect("addr"))
        .expect("articles by VIP");
    assert_eq!(by_vip.service.name(), "demo/articles");
    let by_host = config
        .by_authority("articles:80", 0)
        .expect("articles by host");
    assert_eq!(by_host.service.name(), "demo/articles");
    assert_eq!(articles_endpoints(&client), ["10.77.0.3:8080"]);
    let route = &by_vip.service.routes.routes[0];
    assert_eq!(route.name, "by-id");

    let stats = client.stats();
    assert!(stats.ready && stats.connected);
    assert_eq!((stats.streams, stats.nacks), (1, 0));
    assert_eq!(stats.acks, stats.responses);

    wait_for("the control plane records an ACK of every type", || {
        all_acked(&cp)
    })
    .await;
    let status = &cp.registry.list()[0];
    assert_eq!(status.id, "frontend-1.demo");
    assert_eq!(status.proxy_version, discovery::PROXY_VERSION);
    assert_eq!(status.nacks_total, 0);
}

#[tokio::test]
async fn a_yaml_change_reaches_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = control_plane(dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
    let client = start_client(cp.discovery_addr);
    ready(&client).await;
    let mut changes = client.store().subscribe();
    changes.borrow_and_update();
    let before = client.config().generation();

    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.9"),
    )
    .expect("rewrite");
    wait_for("the new endpoint is in the config", || {
        articles_endpoints(&client) == ["10.77.0.9:8080"]
    })
    .await;
    assert!(client.config().generation() > before);
    assert!(
        changes.has_changed().expect("store alive"),
        "watchers are told"
    );

    // A service goes away: it leaves the config, with its endpoints and routes.
    std::fs::write(
        dir.path().join("services.yaml"),
        SERVICES.split("---").next().expect("the frontend document"),
    )
    .expect("rewrite");
    wait_for("articles is gone", || {
        client.config().service("demo/articles").is_none()
    })
    .await;
    wait_for("nothing dangles", || {
        client.config().unresolved().is_empty()
    })
    .await;
    assert_eq!(client.stats().nacks, 0);
    assert_eq!(cp.registry.list()[0].nacks_total, 0);
}

#[tokio::test]
async fn the_last_config_survives_a_control_plane_restart_and_resyncs_without_resending() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let addr = free_addr();
    let cp = control_plane(dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
    let relay = Relay::start(addr, cp.discovery_addr).await;
    let client = start_client(addr);
    ready(&client).await;
    wait_for("every type acknowledged", || all_acked(&cp)).await;
    let config = client.config();
    let synced = client.stats();

    // The control plane goes away: the proxy notices, keeps its configuration, stays ready.
    drop(relay);
    cp.shutdown().await;
    wait_for("the stream is down", || !client.stats().connected).await;
    assert!(
        Arc::ptr_eq(&config, &client.config()),
        "the config is untouched"
    );
    assert!(client.is_ready());
    assert!(client.stats().last_error.is_some());
    wait_for("a reconnection attempt fails", || {
        client.stats().reconnects >= 1
    })
    .await;
    assert!(Arc::ptr_eq(&config, &client.config()));

    // A new control plane on the same address serving the same files: the client reconnects,
    // announces what it holds, and the control plane sends nothing but the empty first response
    // of each type.
    let cp = control_plane(dir.path(), addr).await;
    wait_for("the client reconnected", || client.stats().streams == 2).await;
    wait_for("every type acknowledged again", || all_acked(&cp)).await;
    let resynced = client.stats();
    assert_eq!(
        resynced.responses - synced.responses,
        ResourceKind::ALL.len() as u64
    );
    assert_eq!(
        resynced.resources_received, synced.resources_received,
        "nothing resent"
    );
    assert_eq!(resynced.removals_received, synced.removals_received);
    assert_eq!(resynced.nacks, 0);
    assert!(
        Arc::ptr_eq(&config, &client.config()),
        "nothing changed, nothing published"
    );

    // And it follows the new control plane's updates.
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.4"),
    )
    .expect("rewrite");
    wait_for("the update arrives", || {
        articles_endpoints(&client) == ["10.77.0.4:8080"]
    })
    .await;
    client.shutdown().await;
    wait_for("the proxy's stream is closed", || {
        cp.registry.list().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_client_started_before_the_control_plane_waits_unready_then_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let addr = free_addr();
    let client = start_client(addr);
    wait_for("a connection attempt fails", || {
        client.stats().last_error.is_some()
    })
    .await;
    assert!(!client.is_ready());
    assert_eq!(client.config().services().count(), 0);

    let _cp = control_plane(dir.path(), addr).await;
    ready(&client).await;
    assert_eq!(client.config().services().count(), 2);
}

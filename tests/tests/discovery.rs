//! The discovery stream, end to end: a control plane serving a watched directory, and real tonic
//! clients behaving as proxies do (and as broken ones do).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_control_plane::discovery::RESPONSE_BUDGET;
use keel_control_plane::server::IdentityConfig;
use keel_control_plane::{ControlPlane, ControlPlaneConfig};

use keel_proto::v1::{DiscoveryRequest, Endpoints, type_url};
use keel_tests::{DiscoveryClient, node, start_control_plane};
use prost::Message;

/// Generous bound for "soon": a test never fails because the machine is slow, only because a
/// response never comes. The 100 ms figure is measured by the benchmark, not asserted here.
const SOON: Duration = Duration::from_secs(5);

const MESH: &str = "apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: test.local
";

fn service(name: &str) -> String {
    format!(
        "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: {name}
  namespace: demo
spec:
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: HTTP
  selector:
    app: {name}
"
    )
}

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

/// A mesh of `frontend` and `articles`, one workload each.
fn write_mesh(dir: &Path) {
    std::fs::write(dir.join("mesh.yaml"), MESH).expect("write mesh");
    std::fs::write(
        dir.join("services.yaml"),
        format!("{}---\n{}", service("frontend"), service("articles")),
    )
    .expect("write services");
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

fn endpoint_addresses(client: &DiscoveryClient, service: &str) -> Vec<String> {
    let held = client
        .held
        .get(type_url::ENDPOINTS)
        .and_then(|m| m.get(service))
        .expect("endpoints held");
    let endpoints = Endpoints::decode(held.1.as_slice()).expect("decodes");
    endpoints.endpoints.into_iter().map(|e| e.address).collect()
}

async fn synced_client(addr: std::net::SocketAddr, name: &str) -> DiscoveryClient {
    let mut client = DiscoveryClient::connect(addr, node(name, "demo"))
        .await
        .expect("connect");
    client.subscribe_all().await.expect("subscribe");
    client
        .sync(&type_url::ALL, SOON)
        .await
        .expect("initial view");
    client
}

#[tokio::test]
async fn initial_view_then_incremental_update_and_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    let mut client = synced_client(cp.discovery_addr, "frontend-1").await;

    assert_eq!(
        client.names(type_url::SERVICE),
        ["demo/articles", "demo/frontend"]
    );
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.3"]);
    assert_eq!(client.names(type_url::MESH_CONFIG), ["mesh"]);

    // One endpoint changes: exactly that Endpoints resource comes, nothing else.
    let started = Instant::now();
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.9"),
    )
    .expect("rewrite");
    let update = client.recv(SOON).await.expect("update");
    println!("file write to update: {:?}", started.elapsed());
    assert_eq!(update.type_url, type_url::ENDPOINTS);
    assert_eq!(update.resources.len(), 1);
    assert_eq!(update.resources[0].name, "demo/articles");
    client.ack(&update).await.expect("ack");
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.9"]);
    client
        .quiet_for(Duration::from_millis(300))
        .await
        .expect("nothing else is sent");

    // The ACK is visible in status.
    let status = cp.registry.list();
    assert_eq!(status.len(), 1);
    let endpoints = &status[0].types["Endpoints"];
    assert_eq!(endpoints.acked_version, Some(cp.store.current().version));

    // A service is removed: its name comes in removed_resources, for each type it had.
    std::fs::write(dir.path().join("services.yaml"), service("frontend")).expect("rewrite");
    std::fs::remove_file(dir.path().join("articles.yaml")).expect("remove");
    let mut removed = Vec::new();
    while removed.len() < 2 {
        let r = client.recv(SOON).await.expect("removal");
        for name in &r.removed_resources {
            removed.push((r.type_url.clone(), name.clone()));
        }
        client.ack(&r).await.expect("ack");
    }
    removed.sort();
    assert_eq!(
        removed,
        [
            (type_url::ENDPOINTS.to_owned(), "demo/articles".to_owned()),
            (type_url::SERVICE.to_owned(), "demo/articles".to_owned()),
        ]
    );
}

#[tokio::test]
async fn nack_is_recorded_and_the_rejected_config_is_not_resent() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    let mut client = synced_client(cp.discovery_addr, "frontend-1").await;

    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.7"),
    )
    .expect("rewrite");
    let update = client.recv(SOON).await.expect("update");
    client
        .nack(&update, "endpoint 10.77.0.7 refused by test")
        .await
        .expect("nack");
    // No resend loop: the server stays quiet until the configuration changes again.
    client
        .quiet_for(Duration::from_millis(500))
        .await
        .expect("no resend after NACK");
    let status = cp.registry.list();
    assert_eq!(status[0].nacks_total, 1);
    assert!(
        status[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("refused by test")
    );
    assert_eq!(status[0].recent_nacks[0].type_url, type_url::ENDPOINTS);
    // The NACK says which version the proxy kept: the one it last ACKed.
    let kept = status[0].types["Endpoints"]
        .acked_version
        .map(|v| v.to_string());
    assert!(kept.is_some());
    assert_eq!(status[0].recent_nacks[0].kept_version, kept);
    // The client kept its last good config.
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.3"]);

    // A new version of the resource is offered again.
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.8"),
    )
    .expect("rewrite");
    let update = client.recv(SOON).await.expect("new version");
    client.ack(&update).await.expect("ack");
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.8"]);
}

#[tokio::test]
async fn reconnect_with_versions_resends_only_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    let client = synced_client(cp.discovery_addr, "frontend-1").await;
    let held = client.into_held();

    // While the proxy is away, one endpoint changes.
    let before = cp.store.current().version;
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.5"),
    )
    .expect("rewrite");
    wait_for(|| cp.store.current().version > before).await;

    let mut client =
        DiscoveryClient::reconnect(cp.discovery_addr, node("frontend-1", "demo"), held)
            .await
            .expect("reconnect");
    client.subscribe_all().await.expect("subscribe");
    let mut resent = 0;
    for _ in type_url::ALL {
        let r = client.recv(SOON).await.expect("first response per type");
        if r.type_url == type_url::ENDPOINTS {
            assert_eq!(r.resources.len(), 1, "only the changed endpoints");
            assert_eq!(r.resources[0].name, "demo/articles");
        } else {
            assert!(
                r.resources.is_empty() && r.removed_resources.is_empty(),
                "{} resent unchanged resources",
                r.type_url
            );
        }
        resent += r.resources.len();
        client.ack(&r).await.expect("ack");
    }
    assert_eq!(resent, 1);
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.5"]);
}

/// `services` more services of `endpoints` workloads each, so that a proxy's initial view is
/// hundreds of kilobytes.
fn write_bulk(dir: &Path, services: usize, endpoints: usize) {
    let mut text = String::new();
    for s in 0..services {
        text.push_str(&service(&format!("bulk-{s}")));
        for e in 0..endpoints {
            text.push_str("---\n");
            text.push_str(&workload(
                &format!("bulk-{s}-{e}"),
                &format!("bulk-{s}"),
                &format!("10.{}.{}.{}", 78 + s / 256, s % 256, e + 1),
            ));
        }
        text.push_str("---\n");
    }
    std::fs::write(dir.join("bulk.yaml"), text).expect("write bulk");
}

/// The stuck proxy subscribes to everything and then never reads or answers. It offers the
/// smallest HTTP/2 window (64 KiB) and its initial view is several times that, so its transport
/// is blocked for the whole test: the server cannot hand it more than the window, and the
/// responses it has produced for it wait in its per-stream queue.
///
/// Timing is not asserted (the machine is shared and slow in debug builds; the 100 ms figure is
/// measured by `bench/src/bin/discovery.rs`). What is asserted is causal: every other proxy
/// receives every update *while* the stuck stream is blocked, which could not happen if the
/// server waited on the stuck stream anywhere on the fan-out path; the generous `SOON` bound only
/// keeps a hang from lasting forever. The per-round times are printed for the curious.
#[tokio::test]
async fn a_stuck_proxy_does_not_delay_the_others() {
    const WINDOW: u32 = 65_535;
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    write_bulk(dir.path(), 300, 4);
    let cp = start_control_plane(dir.path()).await.expect("start");

    let mut others = Vec::new();
    for i in 0..20 {
        others.push(synced_client(cp.discovery_addr, &format!("proxy-{i}")).await);
    }
    let stuck = DiscoveryClient::connect_with_window(
        cp.discovery_addr,
        node("stuck", "demo"),
        Some(WINDOW),
    )
    .await
    .expect("connect");
    stuck.subscribe_all().await.expect("subscribe");
    let stuck_status = || {
        cp.registry
            .list()
            .into_iter()
            .find(|p| p.id == "stuck.demo")
            .expect("the stuck proxy stays connected")
    };
    // The server has produced the first response of every type for it...
    wait_for(|| {
        let status = stuck_status();
        status.types.len() == type_url::ALL.len() && status.types.values().all(|t| t.sent == 1)
    })
    .await;
    // ...which together are far more than the window it never reopens by reading.
    let queued: u64 = stuck_status().types.values().map(|t| t.sent_bytes).sum();
    assert!(
        queued > 2 * u64::from(WINDOW),
        "the stuck proxy's initial view ({queued} bytes) must exceed its window"
    );

    for round in 0..5 {
        let started = Instant::now();
        std::fs::write(
            dir.path().join("articles.yaml"),
            workload("articles-1", "articles", &format!("10.77.1.{round}")),
        )
        .expect("rewrite");
        let mut slowest = Duration::ZERO;
        for client in &mut others {
            let r = client.recv(SOON).await.expect("others still get updates");
            assert_eq!(r.type_url, type_url::ENDPOINTS);
            client.ack(&r).await.expect("ack");
            slowest = slowest.max(started.elapsed());
        }
        println!("round {round}: file write to the last of 20 proxies: {slowest:?}");
    }
    for client in &others {
        assert_eq!(endpoint_addresses(client, "demo/articles"), ["10.77.1.4"]);
    }

    // For the stuck proxy the server still holds one unanswered response per type and nothing
    // more: five changes later, nothing else was queued, so its memory is bounded by one
    // response budget per type.
    let status = stuck_status();
    for (name, t) in &status.types {
        assert_eq!(t.sent, 1, "{name}: responses sent");
        assert!(t.pending_nonce.is_some(), "{name}: unanswered");
        assert_eq!(t.acked_version, None, "{name}");
    }
    let held: u64 = status.types.values().map(|t| t.sent_bytes).sum();
    assert_eq!(held, queued, "nothing queued after the first responses");
    let bound = type_url::ALL.len() * (RESPONSE_BUDGET + 4096);
    assert!(held <= bound as u64, "{held} bytes held, bound {bound}");

    // Once it reads again it catches up with the current state (the five changes coalesced).
    let mut stuck = stuck;
    stuck.sync(&type_url::ALL, SOON).await.expect("catches up");
    assert_eq!(endpoint_addresses(&stuck, "demo/articles"), ["10.77.1.4"]);
    assert_eq!(stuck.names(type_url::SERVICE).len(), 302);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");

    // A first request without a node is refused with a reason.
    let mut nameless = DiscoveryClient::connect(cp.discovery_addr, Default::default())
        .await
        .expect("connect");
    let err = nameless
        .recv(SOON)
        .await
        .expect_err("refused without a node");
    assert!(err.to_string().contains("workload"), "{err}");

    // An unknown type URL gets one response naming it (INVALID_ARGUMENT) and is recorded; the
    // stream keeps working for known types.
    const NONSENSE: &str = "type.googleapis.com/keel.mesh.v1.Nonsense";
    let mut client = DiscoveryClient::connect(cp.discovery_addr, node("frontend-1", "demo"))
        .await
        .expect("connect");
    client
        .send(DiscoveryRequest {
            type_url: NONSENSE.to_owned(),
            ..Default::default()
        })
        .await
        .expect("send");
    let refused = client.recv(SOON).await.expect("the refusal");
    assert_eq!(refused.type_url, NONSENSE);
    assert!(refused.resources.is_empty() && refused.removed_resources.is_empty());
    let detail = refused.error_detail.as_ref().expect("an error detail");
    assert_eq!(detail.code, tonic::Code::InvalidArgument as i32);
    assert!(
        detail.message.contains("Nonsense") && detail.message.contains(type_url::SERVICE),
        "{}",
        detail.message
    );
    // Answering the refusal (as a generic client ACKs every response) gets no second one.
    client.ack(&refused).await.expect("answer the refusal");
    client.subscribe_all().await.expect("subscribe");
    client
        .sync(&type_url::ALL, SOON)
        .await
        .expect("known types still served");
    client
        .quiet_for(Duration::from_millis(200))
        .await
        .expect("the unknown type is refused once");
    let status = cp.registry.list();
    let me = status
        .iter()
        .find(|p| p.id == "frontend-1.demo")
        .expect("listed");
    assert!(
        me.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("Nonsense")
    );

    // A client spraying unknown types gets one refusal each, up to a bound, then its stream
    // ends with the reason.
    let mut sprayer = DiscoveryClient::connect(cp.discovery_addr, node("sprayer", "demo"))
        .await
        .expect("connect");
    for i in 0..=16 {
        sprayer
            .send(DiscoveryRequest {
                type_url: format!("{NONSENSE}{i}"),
                ..Default::default()
            })
            .await
            .expect("send");
    }
    for _ in 0..16 {
        let r = sprayer.recv(SOON).await.expect("a refusal");
        assert!(r.error_detail.is_some(), "{}", r.type_url);
    }
    let err = sprayer.recv(SOON).await.expect_err("cut off");
    assert!(err.to_string().contains("unknown type URLs"), "{err}");

    // Raw garbage on the gRPC port: the connection fails, the server does not.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(cp.discovery_addr)
            .await
            .expect("connect raw");
        raw.write_all(b"\x16\x03\x01garbage that is not HTTP/2\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(SOON, raw.read(&mut buf)).await;
    }

    // A bad edit is rejected whole; the last good config keeps being served, and the
    // rejection names the file and line.
    let before = cp.store.current().version;
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.300"),
    )
    .expect("bad edit");
    wait_for(|| cp.store.source_status().rejected.is_some()).await;
    assert_eq!(cp.store.current().version, before);
    let rejected = cp.store.source_status().rejected.expect("rejected");
    assert!(rejected.0[0].file.ends_with("articles.yaml"));
    assert_eq!((rejected.0[0].line, rejected.0[0].column), (10, 15));
    client
        .quiet_for(Duration::from_millis(300))
        .await
        .expect("nothing pushed for a rejected edit");

    // Fixing it serves the fix, and the rejection clears.
    std::fs::write(
        dir.path().join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.30"),
    )
    .expect("fix");
    let r = client.recv(SOON).await.expect("fix arrives");
    client.ack(&r).await.expect("ack");
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.30"]);
    assert!(cp.store.source_status().rejected.is_none());

    // A new client still gets the full view.
    synced_client(cp.discovery_addr, "late").await;
}

/// A workload whose address is not an IP: the whole directory is invalid.
fn break_articles(dir: &Path) {
    std::fs::write(
        dir.join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.300"),
    )
    .expect("bad edit");
}

fn fix_articles(dir: &Path) {
    std::fs::write(
        dir.join("articles.yaml"),
        workload("articles-1", "articles", "10.77.0.3"),
    )
    .expect("fix");
}

#[tokio::test]
async fn a_control_plane_started_on_an_invalid_directory_sends_nothing_until_it_is_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    break_articles(dir.path());
    // With a CA, so that the trust bundle is published before any model: a snapshot that only
    // carries trust must not be served as if it were an (empty) mesh.
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let cp = ControlPlane::start(ControlPlaneConfig {
        config_dir: dir.path().to_path_buf(),
        discovery_addr: any,
        admin_addr: any,
        identity: Some(IdentityConfig::ephemeral(any)),
    })
    .await
    .expect("starts on an invalid directory");
    assert!(cp.store.source_status().rejected.is_some());
    assert!(!cp.store.current().trust.anchors.is_empty());

    let mut client = DiscoveryClient::connect(cp.discovery_addr, node("frontend-1", "demo"))
        .await
        .expect("connect");
    client.subscribe_all().await.expect("subscribe");
    client
        .quiet_for(Duration::from_millis(500))
        .await
        .expect("no response, not even an empty view, before a valid model");
    assert_eq!(cp.registry.list().len(), 1, "the stream is held open");

    fix_articles(dir.path());
    client
        .sync(&type_url::ALL, SOON)
        .await
        .expect("the full view once the directory is valid");
    assert_eq!(
        client.names(type_url::SERVICE),
        ["demo/articles", "demo/frontend"]
    );
    assert_eq!(endpoint_addresses(&client, "demo/articles"), ["10.77.0.3"]);
    assert_eq!(client.names(type_url::MESH_CONFIG), ["mesh"]);
}

#[tokio::test]
async fn a_proxy_loses_nothing_when_the_control_plane_restarts_on_an_invalid_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    let held = synced_client(cp.discovery_addr, "frontend-1")
        .await
        .into_held();
    let services = held[type_url::SERVICE].len();
    assert_eq!(services, 2);
    cp.shutdown().await;

    // The control plane comes back on a directory someone broke meanwhile.
    break_articles(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("restart");
    assert!(cp.store.source_status().rejected.is_some());
    let mut client =
        DiscoveryClient::reconnect(cp.discovery_addr, node("frontend-1", "demo"), held)
            .await
            .expect("reconnect");
    client.subscribe_all().await.expect("subscribe");
    client
        .quiet_for(Duration::from_millis(500))
        .await
        .expect("nothing sent, above all no removals, while no valid model is loaded");

    // Once fixed, the proxy is told what differs from what it holds: nothing.
    fix_articles(dir.path());
    for _ in type_url::ALL {
        let r = client.recv(SOON).await.expect("first response per type");
        assert!(
            r.resources.is_empty() && r.removed_resources.is_empty(),
            "{}: {} resources, {} removals",
            r.type_url,
            r.resources.len(),
            r.removed_resources.len()
        );
        client.ack(&r).await.expect("ack");
    }
    assert_eq!(client.names(type_url::SERVICE).len(), services);
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_ends_every_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    let mut client = synced_client(cp.discovery_addr, "frontend-1").await;
    tokio::time::timeout(SOON, cp.shutdown())
        .await
        .expect("shutdown does not hang on open streams");
    let err = client.recv(SOON).await.expect_err("stream ended");
    assert!(
        err.to_string().contains("shutting down") || err.to_string().contains("closed"),
        "{err}"
    );
}

/// A gRPC client whose request messages are raw bytes, to send what no well-behaved proxy would:
/// well-framed gRPC messages whose protobuf does not decode.
mod raw {
    use std::net::SocketAddr;

    use bytes::BufMut;
    use keel_proto::v1::DiscoveryResponse;
    use prost::Message;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::{Status, Streaming};

    pub struct RawCodec;
    pub struct RawEncoder;
    pub struct ResponseDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for ResponseDecoder {
        type Item = DiscoveryResponse;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
            DiscoveryResponse::decode(src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = DiscoveryResponse;
        type Encoder = RawEncoder;
        type Decoder = ResponseDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> ResponseDecoder {
            ResponseDecoder
        }
    }

    /// Opens a discovery stream; what is sent on the returned sender goes out as gRPC messages,
    /// byte for byte.
    pub async fn open(addr: SocketAddr) -> (mpsc::Sender<Vec<u8>>, Streaming<DiscoveryResponse>) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let (tx, rx) = mpsc::channel(4);
        let path = http::uri::PathAndQuery::from_static("/keel.mesh.v1.Discovery/Stream");
        let responses = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
            .await
            .expect("stream opens")
            .into_inner();
        (tx, responses)
    }
}

/// Field 1 with wire type 7, which protobuf does not have: no decoder accepts it.
const UNDECODABLE: [u8; 2] = [0x0f, 0x01];

/// Reads responses until the stream ends; returns its final status (OK if it ended cleanly).
async fn final_status(
    responses: &mut tonic::Streaming<keel_proto::v1::DiscoveryResponse>,
) -> tonic::Status {
    loop {
        match tokio::time::timeout(SOON, responses.message()).await {
            Err(_) => panic!("the stream did not end within {SOON:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return tonic::Status::ok(""),
            Ok(Err(status)) => return status,
        }
    }
}

#[tokio::test]
async fn undecodable_requests_end_the_stream_with_invalid_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");

    // Garbage as the very first message.
    let (tx, mut responses) = raw::open(cp.discovery_addr).await;
    tx.send(UNDECODABLE.to_vec()).await.expect("send");
    let status = final_status(&mut responses).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("request #1"),
        "{}",
        status.message()
    );

    // Garbage after a good start: the node, a subscription, its response; then the garbage.
    let (tx, mut responses) = raw::open(cp.discovery_addr).await;
    let hello = DiscoveryRequest {
        node: Some(node("frontend-1", "demo")),
        type_url: type_url::SERVICE.to_owned(),
        ..Default::default()
    };
    tx.send(hello.encode_to_vec()).await.expect("send");
    let first = tokio::time::timeout(SOON, responses.message())
        .await
        .expect("a response in time")
        .expect("a response")
        .expect("the stream goes on");
    assert_eq!(first.type_url, type_url::SERVICE);
    tx.send(UNDECODABLE.to_vec()).await.expect("send");
    let status = final_status(&mut responses).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("request #2"),
        "{}",
        status.message()
    );
    wait_for(|| cp.registry.list().iter().all(|p| p.id != "frontend-1.demo")).await;

    // The server is unharmed.
    synced_client(cp.discovery_addr, "late").await;
}

/// Two namespaces: `demo/articles` is exported to its own namespace only, `shop/cart` to `shop`;
/// `demo/frontend` is everyone's. Each namespace has a policy for its workload and its own mTLS
/// mode.
fn write_two_namespaces(dir: &Path, articles_export: &str) {
    std::fs::write(
        dir.join("mesh.yaml"),
        "apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: test.local
  mtls: {mode: PERMISSIVE}
  namespaceMtls: {shop: STRICT}
",
    )
    .expect("write mesh");
    let cart =
        service("cart").replace("namespace: demo", "namespace: shop") + "  exportTo: [shop]\n";
    let articles = service("articles") + &format!("  exportTo: {articles_export}\n");
    std::fs::write(
        dir.join("services.yaml"),
        format!("{}---\n{articles}---\n{cart}", service("frontend")),
    )
    .expect("write services");
    let policy = |ns: &str, app: &str| {
        format!(
            "apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {app}-allow
  namespace: {ns}
spec:
  selector:
    matchLabels: {{app: {app}}}
  action: ALLOW
  rules: [{{}}]
"
        )
    };
    std::fs::write(
        dir.join("policies.yaml"),
        format!(
            "{}---\n{}",
            policy("demo", "frontend"),
            policy("shop", "cart")
        ),
    )
    .expect("write policies");
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            "{}---\n{}---\n{}",
            workload("frontend-1", "frontend", "10.77.0.2"),
            workload("articles-1", "articles", "10.77.0.3"),
            workload("cart-1", "cart", "10.77.0.4").replace("namespace: demo", "namespace: shop"),
        ),
    )
    .expect("write workloads");
}

fn mesh_config(client: &DiscoveryClient) -> keel_proto::v1::MeshConfig {
    let held = &client.held[type_url::MESH_CONFIG]["mesh"];
    keel_proto::v1::MeshConfig::decode(held.1.as_slice()).expect("decodes")
}

#[tokio::test]
async fn each_proxy_sees_what_is_exported_to_it_and_its_own_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_two_namespaces(dir.path(), "[\".\"]");
    let cp = start_control_plane(dir.path()).await.expect("start");
    let mut frontend = synced_client(cp.discovery_addr, "frontend-1").await;
    let mut cart = DiscoveryClient::connect(cp.discovery_addr, node("cart-1", "shop"))
        .await
        .expect("connect");
    cart.subscribe_all().await.expect("subscribe");
    cart.sync(&type_url::ALL, SOON).await.expect("initial view");

    // Services, and everything keyed by them, only where exported.
    for t in [
        type_url::SERVICE,
        type_url::ENDPOINTS,
        type_url::ROUTE_TABLE,
        type_url::TRAFFIC_POLICY,
    ] {
        assert_eq!(frontend.names(t), ["demo/articles", "demo/frontend"], "{t}");
        assert_eq!(cart.names(t), ["demo/frontend", "shop/cart"], "{t}");
    }
    // Each its own inbound policy and mTLS mode.
    assert_eq!(
        frontend.names(type_url::AUTHORIZATION_POLICY),
        ["demo/frontend-allow"]
    );
    assert_eq!(
        cart.names(type_url::AUTHORIZATION_POLICY),
        ["shop/cart-allow"]
    );
    assert_eq!(
        mesh_config(&frontend).mtls_mode,
        keel_proto::v1::MtlsMode::Permissive as i32
    );
    assert_eq!(
        mesh_config(&cart).mtls_mode,
        keel_proto::v1::MtlsMode::Strict as i32
    );

    // Exported everywhere: the shop's proxy is told about it, in every type, and nobody else
    // is sent anything for it (the frontend had it all along).
    write_two_namespaces(dir.path(), "[\"*\"]");
    let mut added = Vec::new();
    while added.len() < 4 {
        let r = cart.recv(SOON).await.expect("the newly visible service");
        assert!(r.removed_resources.is_empty());
        added.extend(
            r.resources
                .iter()
                .map(|x| (r.type_url.clone(), x.name.clone())),
        );
        cart.ack(&r).await.expect("ack");
    }
    added.sort();
    assert!(added.iter().all(|(_, n)| n == "demo/articles"), "{added:?}");
    assert_eq!(
        cart.names(type_url::SERVICE),
        ["demo/articles", "demo/frontend", "shop/cart"]
    );
    frontend
        .quiet_for(Duration::from_millis(300))
        .await
        .expect("nothing changed for the frontend");

    // Restricted again: removed from the shop's proxy in every type.
    write_two_namespaces(dir.path(), "[demo]");
    let mut removed = Vec::new();
    while removed.len() < 4 {
        let r = cart.recv(SOON).await.expect("the removal");
        removed.extend(r.removed_resources.iter().cloned());
        cart.ack(&r).await.expect("ack");
    }
    assert!(removed.iter().all(|n| n == "demo/articles"), "{removed:?}");
    assert_eq!(
        cart.names(type_url::SERVICE),
        ["demo/frontend", "shop/cart"]
    );
}

#[tokio::test]
async fn a_route_to_a_service_hidden_from_some_of_its_callers_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_two_namespaces(dir.path(), "[\".\"]");
    // frontend (everyone's) routes to articles (demo's only): a shop proxy would get the route
    // but not where it leads.
    let frontend =
        service("frontend") + "  routes:\n  - name: all\n    destinations: [{service: articles}]\n";
    let text = std::fs::read_to_string(dir.path().join("services.yaml")).expect("read");
    std::fs::write(
        dir.path().join("services.yaml"),
        text.replacen(&service("frontend"), &frontend, 1),
    )
    .expect("write");
    let cp = start_control_plane(dir.path()).await.expect("start");
    let rejected = cp.store.source_status().rejected.expect("rejected");
    assert!(
        rejected.0[0].reason.contains("exported to demo"),
        "{}",
        rejected.0[0]
    );
    assert_eq!(
        rejected.0[0].field,
        "spec.routes[0].destinations[0].service"
    );
}

/// What the code under test logs, as text.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A proxy whose connection vanishes (its sidecar killed with its pod) is how most proxies
/// leave: the control plane records why, and logs it at INFO. Warnings are for streams that
/// failed, so that a rollout does not fill the log with them.
#[tokio::test]
async fn a_vanished_proxy_is_recorded_without_a_warning() {
    let logs = CapturedLogs::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path());
    let cp = start_control_plane(dir.path()).await.expect("start");
    // The proxy reaches the control plane through a relay; closing the relay's sockets is what
    // the kernel does when it kills the proxy: the connection ends with no gRPC or HTTP/2 word.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let upstream = cp.discovery_addr;
    let relaying = tokio::spawn(async move {
        let (mut proxy_side, _) = relay.accept().await.expect("accept");
        let mut control_plane_side = tokio::net::TcpStream::connect(upstream)
            .await
            .expect("connect");
        let _ = tokio::io::copy_bidirectional(&mut proxy_side, &mut control_plane_side).await;
    });
    let client = synced_client(relay_addr, "frontend-1").await;
    relaying.abort();
    wait_for(|| !cp.registry.recently_disconnected().is_empty()).await;
    let gone = cp.registry.recently_disconnected();
    let reason = gone[0].end_reason.as_deref().unwrap_or_default();
    let text = logs.text();
    assert!(
        !reason.is_empty(),
        "no reason recorded for a proxy that vanished\n{text}"
    );
    assert!(
        text.contains("INFO") && text.contains("proxy connection lost"),
        "{text}"
    );
    assert!(!text.contains("WARN"), "{text}");
    drop(client);
}

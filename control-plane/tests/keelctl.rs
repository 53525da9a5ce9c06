//! `keelctl` as a user runs it: the real binary against files and a running control plane.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use keel_control_plane::{ControlPlane, ControlPlaneConfig};

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh")
}

async fn keelctl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(KEELCTL)
            .args(&args)
            .output()
            .expect("keelctl runs")
    })
    .await
    .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn control_plane(dir: &Path) -> (ControlPlane, String) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let cp = ControlPlane::start(ControlPlaneConfig {
        config_dir: dir.to_path_buf(),
        discovery_addr: any,
        admin_addr: any,
        identity: None,
    })
    .await
    .expect("control plane starts");
    let admin = format!("http://{}", cp.admin_addr);
    (cp, admin)
}

const SERVICE: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: ratings
  namespace: demo
spec:
  ports:
  - name: http
    port: 80
";

#[tokio::test]
async fn validate_accepts_the_examples() {
    let out = keelctl(&["validate", "-f", examples().to_str().expect("utf-8")]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("valid: "),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn validate_names_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, SERVICE.replace("port: 80", "port: 70000")).expect("write");
    let file = file.to_str().expect("utf-8");

    let out = keelctl(&["validate", "-f", file]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{file}:9:11: invalid-value: spec.ports[0].port")),
        "{stderr}"
    );

    let out = keelctl(&["validate", "-f", file, "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["valid"], false);
    assert_eq!(json["errors"][0]["line"], 9);
    assert_eq!(json["errors"][0]["column"], 11);
    assert_eq!(json["errors"][0]["kind"], "invalid-value");
}

#[tokio::test]
async fn apply_validates_persists_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(examples()).expect("examples") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    let (cp, admin) = control_plane(dir.path()).await;
    let before = cp.store.current().version;

    let input = tempfile::tempdir().expect("tempdir");
    let file = input.path().join("ratings.yaml");
    std::fs::write(&file, SERVICE).expect("write");
    let file = file.to_str().expect("utf-8");

    let out = keelctl(&["apply", "-f", file, "--control-plane", &admin]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Service demo/ratings created");
    assert!(cp.store.current().version > before);
    let key = keel_control_plane::model::ObjectKey::new("demo", "ratings");
    assert!(cp.store.current().model.services.contains_key(&key));
    assert!(dir.path().join("applied/ratings.yaml").exists());

    let out = keelctl(&["apply", "-f", file, "--control-plane", &admin]).await;
    assert_eq!(text(&out.stdout).trim(), "Service demo/ratings unchanged");

    // An invalid apply is refused with the user's file name and position; nothing changes.
    let version = cp.store.current().version;
    let bad = input.path().join("bad.yaml");
    std::fs::write(
        &bad,
        SERVICE.replace("  ports:", "  selector: {app: ratings}\n  routes:\n  - name: r\n    destinations: [{service: nowhere}]\n  ports:"),
    )
    .expect("write");
    let out = keelctl(&[
        "apply",
        "-f",
        bad.to_str().expect("utf-8"),
        "--control-plane",
        &admin,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("bad.yaml:10:"), "{stderr}");
    assert!(stderr.contains("dangling-reference"), "{stderr}");
    assert_eq!(cp.store.current().version, version);

    // Status, human and JSON.
    let out = keelctl(&["status", "--control-plane", &admin]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("Configuration: version {version}")),
        "{stdout}"
    );
    assert!(stdout.contains("Last change: accepted"), "{stdout}");
    assert!(stdout.contains("Proxies: 0"), "{stdout}");
    let out = keelctl(&["status", "--control-plane", &admin, "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["version"], version);
    assert_eq!(json["resources"]["Service"], 6);
}

/// `ratings-{i}` routing to `ratings-{i+1}` (the last to nothing): each file refers to one that
/// sorts after it, so the files cannot be applied one at a time in any order a directory
/// listing gives.
fn chained_service(i: usize, last: usize) -> String {
    let routes = if i < last {
        format!(
            "  routes:\n  - name: next\n    destinations: [{{service: ratings-{:02}}}]\n",
            i + 1
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata:\n  name: ratings-{i:02}\n  namespace: demo\nspec:\n  ports:\n  - name: http\n    port: 80\n{routes}"
    )
}

#[tokio::test]
async fn apply_of_a_directory_is_one_change_validated_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cp, admin) = control_plane(dir.path()).await;
    let before = cp.store.current().version;

    let input = tempfile::tempdir().expect("tempdir");
    const FILES: usize = 20;
    for i in 0..FILES {
        std::fs::write(
            input.path().join(format!("ratings-{i:02}.yaml")),
            chained_service(i, FILES - 1),
        )
        .expect("write");
    }
    let out = keelctl(&[
        "apply",
        "-f",
        input.path().to_str().expect("utf-8"),
        "--control-plane",
        &admin,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected: Vec<String> = (0..FILES)
        .map(|i| format!("Service demo/ratings-{i:02} created"))
        .collect();
    assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
    // One change, published once: no half of it was ever served...
    assert_eq!(cp.store.current().version, before + 1);
    assert_eq!(cp.store.current().model.services.len(), FILES);
    // ...nor seen by the watcher, whose reloads follow the writes: give them time to run, then
    // check that none of them found an invalid or a different state.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(cp.store.source_status().rejected.is_none());
    assert_eq!(cp.store.current().version, before + 1);

    // One bad file in a directory: nothing of it is applied, and the error names the file.
    let bad_input = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        bad_input.path().join("a-good.yaml"),
        SERVICE.replace("name: ratings", "name: reviews"),
    )
    .expect("write");
    std::fs::write(
        bad_input.path().join("b-bad.yaml"),
        chained_service(7, 99).replace("ratings-08", "nowhere"),
    )
    .expect("write");
    let out = keelctl(&[
        "apply",
        "-f",
        bad_input.path().to_str().expect("utf-8"),
        "--control-plane",
        &admin,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("b-bad.yaml:12:30:"), "{stderr}");
    assert!(stderr.contains("dangling-reference"), "{stderr}");
    assert_eq!(cp.store.current().version, before + 1);
    let reviews = keel_control_plane::model::ObjectKey::new("demo", "reviews");
    assert!(!cp.store.current().model.services.contains_key(&reviews));
    assert!(!dir.path().join("applied/a-good.yaml").exists());
}

#[tokio::test]
async fn status_shows_a_rejected_edit_and_the_version_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).expect("write");
    let (cp, admin) = control_plane(dir.path()).await;
    let version = cp.store.current().version;
    std::fs::write(dir.path().join("svc.yaml"), "kind: [unclosed").expect("write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cp.store.source_status().rejected.is_none() {
        assert!(std::time::Instant::now() < deadline, "edit never rejected");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let out = keelctl(&["status", "--control-plane", &admin]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("REJECTED") && stdout.contains(&format!("still serving version {version}")),
        "{stdout}"
    );
    assert!(stdout.contains("svc.yaml:1:"), "{stdout}");
}

#[tokio::test]
async fn unreachable_control_plane_is_a_clear_error() {
    let out = keelctl(&["status", "--control-plane", "http://127.0.0.1:1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the control plane"),
        "{}",
        text(&out.stderr)
    );
}

/// A proxy's discovery stream, by hand: it ACKs every response, except that it NACKs the first
/// `nack` type it is sent.
struct Proxy {
    requests: tokio::sync::mpsc::Sender<keel_proto::v1::DiscoveryRequest>,
    responses: tonic::Streaming<keel_proto::v1::DiscoveryResponse>,
}

impl Proxy {
    async fn connect(addr: SocketAddr, workload: &str) -> Proxy {
        use keel_proto::v1::{DiscoveryRequest, Node, discovery_client::DiscoveryClient};
        let mut client = DiscoveryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        for (i, t) in keel_proto::v1::type_url::ALL.into_iter().enumerate() {
            let node = Node {
                id: format!("{workload}.demo"),
                workload: workload.to_owned(),
                namespace: "demo".to_owned(),
                locality: Some(keel_proto::v1::Locality {
                    region: "r1".to_owned(),
                    zone: "z1".to_owned(),
                    subzone: String::new(),
                }),
                ..Node::default()
            };
            requests
                .send(DiscoveryRequest {
                    node: (i == 0).then_some(node),
                    type_url: t.to_owned(),
                    ..DiscoveryRequest::default()
                })
                .await
                .expect("subscribe");
        }
        let responses = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Proxy {
            requests,
            responses,
        }
    }

    /// Answers the first response of every type: ACKs, or a NACK for `nack`.
    async fn answer_all(&mut self, nack: Option<&str>) {
        use keel_proto::v1::{DiscoveryRequest, ErrorDetail};
        for _ in keel_proto::v1::type_url::ALL {
            let r =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.responses.message())
                    .await
                    .expect("a response in time")
                    .expect("a response")
                    .expect("the stream goes on");
            let error_detail = (Some(r.type_url.as_str()) == nack).then(|| ErrorDetail {
                code: 3,
                message: "endpoint refused by the test".to_owned(),
            });
            let system_version = if error_detail.is_some() {
                String::new()
            } else {
                r.system_version.clone()
            };
            self.requests
                .send(DiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    system_version,
                    error_detail,
                    ..DiscoveryRequest::default()
                })
                .await
                .expect("answer");
        }
    }
}

#[tokio::test]
async fn status_shows_acked_versions_nacks_and_the_last_error_of_each_proxy() {
    use keel_proto::v1::type_url;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).expect("write");
    let (cp, admin) = control_plane(dir.path()).await;
    let version = cp.store.current().version;

    let mut good = Proxy::connect(cp.discovery_addr, "good").await;
    good.answer_all(None).await;
    let mut bad = Proxy::connect(cp.discovery_addr, "bad").await;
    bad.answer_all(Some(type_url::ENDPOINTS)).await;
    // Every answer has been taken in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cp.registry.list().iter().all(|p| {
        p.types.len() == type_url::ALL.len() && p.types.values().all(|t| t.pending_nonce.is_none())
    }) {
        assert!(std::time::Instant::now() < deadline, "answers not recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let out = keelctl(&["status", "--control-plane", &admin]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let human = text(&out.stdout);
    assert!(human.contains("Proxies: 2"), "{human}");
    let line = |id: &str| {
        human
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no line for {id} in:\n{human}"))
            .to_owned()
    };
    let good_line = line("good.demo");
    for t in [
        "MeshConfig",
        "Service",
        "Endpoints",
        "RouteTable",
        "TrafficPolicy",
        "AuthorizationPolicy",
    ] {
        assert!(good_line.contains(&format!("{t}={version}")), "{good_line}");
    }
    let columns: Vec<&str> = good_line.split_whitespace().collect();
    assert_eq!(columns.get(4), Some(&"0"), "NACKS column: {good_line}");
    let bad_line = line("bad.demo");
    assert!(
        bad_line.contains(&format!("Service={version}")),
        "{bad_line}"
    );
    assert!(bad_line.contains("Endpoints=pending"), "{bad_line}");
    let columns: Vec<&str> = bad_line.split_whitespace().collect();
    assert_eq!(columns.get(4), Some(&"1"), "NACKS column: {bad_line}");
    assert!(
        bad_line.contains(&format!(
            "NACK of version {version}: endpoint refused by the test"
        )),
        "{bad_line}"
    );

    let out = keelctl(&["status", "--control-plane", &admin, "-o", "json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let proxies = json["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 2);
    let by_id = |id: &str| {
        proxies
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let good_json = by_id("good.demo");
    assert_eq!(good_json["nacks_total"], 0);
    assert!(good_json["last_error"].is_null());
    assert_eq!(good_json["types"]["Endpoints"]["acked_version"], version);
    assert_eq!(good_json["types"]["Service"]["resources"], 1);
    let bad_json = by_id("bad.demo");
    assert_eq!(bad_json["nacks_total"], 1);
    assert!(bad_json["types"]["Endpoints"]["acked_version"].is_null());
    assert_eq!(bad_json["types"]["Service"]["acked_version"], version);
    let nack = &bad_json["recent_nacks"][0];
    assert_eq!(nack["type_url"], type_url::ENDPOINTS);
    assert_eq!(nack["version"], version);
    assert!(
        nack["kept_version"].is_null(),
        "it had applied no Endpoints"
    );
    assert_eq!(nack["message"], "endpoint refused by the test");
    assert!(
        bad_json["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("endpoint refused by the test"))
    );

    // Once the NACKing proxy goes, its history stays visible.
    drop(bad);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cp.registry.list().len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = keelctl(&["status", "--control-plane", &admin]).await;
    let human = text(&out.stdout);
    assert!(human.contains("Recently disconnected: 1"), "{human}");
    let gone = human
        .lines()
        .skip_while(|l| !l.starts_with("Recently disconnected"))
        .find(|l| l.starts_with("bad.demo"))
        .unwrap_or_else(|| panic!("bad.demo not among the disconnected:\n{human}"));
    assert!(gone.contains("endpoint refused by the test"), "{gone}");
    let out = keelctl(&["status", "--control-plane", &admin, "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let gone = &json["recently_disconnected"][0];
    assert_eq!(gone["id"], "bad.demo");
    assert_eq!(gone["nacks_total"], 1);
    assert!(gone["disconnected_at"].is_string());
}

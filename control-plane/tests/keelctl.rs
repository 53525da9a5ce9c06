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

//! The proxy's certificate while the control plane is unreachable: the real `keel-proxy run`
//! (on loopback ports, no network namespace, no root) certified by an in-process control plane
//! whose secure port it reaches through a relay the test can cut.
//!
//! Certificates live 10 s (the CA's minimum), so the proxy wants to renew about 7 s after it got
//! one. The relay is cut before that: the proxy must keep its certificate (and stay ready) while
//! it is valid, retry with back-off rather than in a loop, stop being ready once it has expired,
//! and renew as soon as the control plane is reachable again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_control_plane::identity::CaStorage;
use keel_control_plane::server::{IdentityConfig, ProofKind};
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MESH: &str = "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: renew.local}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {name: articles-1, namespace: demo}
spec: {serviceAccount: articles, addresses: [10.0.0.3]}
";
const TTL: Duration = Duration::from_secs(10);
/// Generous bound for "eventually": tests fail when something never happens, not when the
/// machine is slow. The back-off ceiling is 30 s.
const EVENTUALLY: Duration = Duration::from_secs(60);

/// A TCP relay to `target` that can be cut: while down it closes every relayed connection and
/// every new one at once, as a network partition that answers with resets would.
struct Relay {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = watch::Sender::new(true);
        let state = up.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = state.clone();
                if !*state.borrow_and_update() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Relay { addr, up, task })
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The running sidecar; killed when dropped.
struct Proxy {
    child: tokio::process::Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    fn logs(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn get(&self, path: &str) -> anyhow::Result<(http::StatusCode, String)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{}{path}", self.admin).parse()?;
        let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await??;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The certificate state from `/config`.
    async fn certificate(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.get("/config").await?;
        let config: serde_json::Value = serde_json::from_str(&body)?;
        Ok(config["certificate"].clone())
    }

    /// Polls `check` every 100 ms until it holds, for at most `within`.
    async fn eventually<F, Fut>(
        &self,
        what: &str,
        within: Duration,
        mut check: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if check().await.unwrap_or(false) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{what}: not within {within:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn_proxy(
    dir: &Path,
    secure: SocketAddr,
    roots: &Path,
    token: &Path,
) -> anyhow::Result<Proxy> {
    let admin = free_addr()?;
    let log = dir.join("proxy.log");
    let out = std::fs::File::create(&log)?;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-proxy"));
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("KEEL_") {
            command.env_remove(variable);
        }
    }
    command
        .args(["run", "--control-plane"])
        .arg(format!("https://{secure}"))
        .arg("--ca-root-file")
        .arg(roots)
        .arg("--identity-token-file")
        .arg(token)
        .args(["--trust-domain", "renew.local"])
        .args(["--workload", "articles-1", "--namespace", "demo"])
        .args(["--service-account", "articles", "--pod-ip", "10.0.0.3"])
        .arg("--outbound-addr")
        .arg(free_addr()?.to_string())
        .arg("--inbound-addr")
        .arg(free_addr()?.to_string())
        .arg("--admin-addr")
        .arg(admin.to_string())
        .env("KEEL_LOG", "info,keel_proxy::tls=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    Ok(Proxy {
        child: command.spawn()?,
        admin,
        log,
    })
}

fn until(cert: &serde_json::Value) -> anyhow::Result<SystemTime> {
    let text = cert["valid_until"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no valid_until in {cert}"))?;
    Ok(humantime::parse_rfc3339(text)?)
}

#[tokio::test]
async fn renewal_survives_an_unreachable_control_plane() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh");
    std::fs::create_dir(&mesh)?;
    std::fs::write(mesh.join("mesh.yaml"), MESH)?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let cp = ControlPlane::start(ControlPlaneConfig {
        config_dir: mesh,
        discovery_addr: any,
        admin_addr: any,
        identity: Some(IdentityConfig {
            storage: CaStorage::Memory,
            workload_ttl: TTL,
            secure_addr: any,
            extra_names: Vec::new(),
            proof: ProofKind::BootstrapToken,
        }),
    })
    .await?;
    let ca = cp.ca.as_ref().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let roots = dir.path().join("roots.pem");
    std::fs::write(
        &roots,
        keel_control_plane::identity::ca::bundle_pem(&ca.bundle()),
    )?;
    let token = dir.path().join("token");
    let tokens = cp
        .tokens
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no tokens"))?;
    std::fs::write(&token, tokens.mint("demo", "articles-1"))?;
    let secure = cp
        .secure_addr
        .ok_or_else(|| anyhow::anyhow!("no secure port"))?;
    let relay = Relay::start(secure).await?;
    let mut proxy = spawn_proxy(dir.path(), relay.addr, &roots, &token)?;

    proxy
        .eventually("the proxy is ready", EVENTUALLY, || async {
            Ok(proxy.get("/ready").await?.0 == 200)
        })
        .await?;
    let first = proxy.certificate().await?;
    anyhow::ensure!(first["issued"] == 1, "{first}");
    let held_until = until(&first)?;

    // The control plane becomes unreachable before the renewal is due.
    relay.set_up(false);
    // Renewal fails, and is retried.
    proxy
        .eventually("two failed renewals", EVENTUALLY, || async {
            Ok(proxy.certificate().await?["failures"].as_u64().unwrap_or(0) >= 2)
        })
        .await?;
    let failing = proxy.certificate().await?;
    // Still before the expiry? Then the proxy must serve with what it holds, and be ready.
    if SystemTime::now() + Duration::from_millis(500) < held_until {
        let (status, body) = proxy.get("/ready").await?;
        anyhow::ensure!(
            status == 200,
            "not ready with a valid certificate: {status} {body}"
        );
    }
    anyhow::ensure!(
        failing["issued"] == 1 && until(&failing)? == held_until,
        "a failed renewal changed the certificate: {failing}"
    );
    anyhow::ensure!(
        failing["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "the failure is not explained: {failing}"
    );

    // Past the expiry, with the control plane still away: no longer ready, and still trying,
    // with back-off (a loop would fail hundreds of times in these seconds).
    let expired = held_until + Duration::from_secs(1);
    if let Ok(wait) = expired.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let (status, body) = proxy.get("/ready").await?;
    anyhow::ensure!(
        status == 503 && body.contains("expired"),
        "ready with an expired certificate: {status} {body}"
    );
    let failures = proxy.certificate().await?["failures"].as_u64().unwrap_or(0);
    eprintln!("{failures} failed renewals between the renewal point and the expiry");
    anyhow::ensure!(
        (2..=12).contains(&failures),
        "{failures} failed attempts within about 5 s of the renewal: not backing off\n{}",
        proxy.logs()
    );
    anyhow::ensure!(
        proxy.child.try_wait()?.is_none(),
        "the proxy exited\n{}",
        proxy.logs()
    );

    // The control plane is back: the proxy renews and is ready again.
    relay.set_up(true);
    proxy
        .eventually(
            "a renewal once the control plane is back",
            EVENTUALLY,
            || async { Ok(proxy.certificate().await?["issued"] == 2) },
        )
        .await?;
    let renewed = proxy.certificate().await?;
    anyhow::ensure!(until(&renewed)? > held_until, "{renewed}");
    proxy
        .eventually("ready again", EVENTUALLY, || async {
            Ok(proxy.get("/ready").await?.0 == 200)
        })
        .await?;
    Ok(())
}

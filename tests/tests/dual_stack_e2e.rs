//! A dual-stack mesh, end to end on a real kernel: IPv6 through both sidecars (the client's
//! sidecar reads the original destination of a redirected IPv6 connection itself, the server's
//! hands it to the app on `[::1]`), IPv4 beside it in the same pods.
//!
//! Destinations outside the mesh are passed through (the mesh's default, `ALLOW_ANY`), over both
//! families, for HTTP and for opaque TCP.
//!
//! Pods, each with an IPv4 and an IPv6 address on the test bridge: `a` (the client, with a
//! sidecar), `b` (an app with a sidecar) and `x` (no sidecar and not in the mesh: an HTTP app, a
//! TCP echo and a server that speaks first). The mesh runs with a CA, as users run it. Service
//! `web` has an IPv4 VIP and reaches b over IPv4; `web6` has an IPv6 VIP and reaches b over
//! IPv6 (b appears as two Workloads, one per address, so that each service has endpoints of one
//! family only). Without root each test prints `SKIP: <reason>` and passes.
//!
//! The pods' servers run on this test's runtime while curl blocks a thread waiting for them, so
//! the tests run on a multi-threaded runtime.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_control_plane::ControlPlane;
use keel_tests::netns::{self, MeshedPod, Metrics, Task, TestNetwork};
use keel_tests::skip_unless_root;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "ds";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const WEB6_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
const BANNER_PORT: u16 = 7001;
const BANNER: &[u8] = b"220 keel test server\r\n";
const READY: Duration = Duration::from_secs(30);

fn yaml(a4: Ipv4Addr, a6: Ipv6Addr, b4: Ipv4Addr, b6: Ipv6Addr) -> String {
    format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: ds.local}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  vips: [{WEB_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: web}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: web6, namespace: {NS}}}
spec:
  vips: [\"{WEB6_VIP}\"]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: web6}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: a, namespace: {NS}, labels: {{app: client}}}}
spec: {{serviceAccount: a, addresses: [{a4}, \"{a6}\"]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: b, namespace: {NS}, labels: {{app: web}}}}
spec: {{serviceAccount: b, addresses: [{b4}]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: b6, namespace: {NS}, labels: {{app: web6}}}}
spec: {{serviceAccount: b, addresses: [\"{b6}\"]}}
"
    )
}

/// Fields drop in order: servers, pods, control plane, files, network.
struct Fixture {
    _servers: Vec<Task>,
    a: MeshedPod,
    b: MeshedPod,
    x: keel_control_plane::demo::netns::Pod,
    _control_plane: ControlPlane,
    _dir: tempfile::TempDir,
    _net: TestNetwork,
}

impl Fixture {
    async fn start() -> anyhow::Result<Fixture> {
        let net = TestNetwork::create_dual_stack()?;
        let (a4, b4) = (net.host(2), net.host(3));
        let v6 = |ip| net.ipv6_of(ip).context("the network has IPv6");
        let (a6, b6) = (v6(a4)?, v6(b4)?);
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("mesh.yaml"), yaml(a4, a6, b4, b6))?;
        let control_plane = net.start_control_plane(dir.path()).await?;
        let pods = net.add_certified_pods(
            &control_plane,
            "ds.local",
            NS,
            &[("a", a4), ("b", b4)],
            "zone-a",
            "info",
        )?;
        let [mut a, mut b]: [MeshedPod; 2] = pods.try_into().map_err(|_| anyhow!("two pods"))?;
        // `[::]` without IPV6_V6ONLY: the app takes both families, as most apps do.
        let x = net.add_pod("x", net.host(4))?;
        let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let servers = vec![
            Task(tokio::spawn(serve_app(netns::listen(&b, any(APP_PORT))?))),
            Task(tokio::spawn(serve_app(netns::listen(&x, any(APP_PORT))?))),
            Task(tokio::spawn(serve_echo(netns::listen(&x, any(ECHO_PORT))?))),
            Task(tokio::spawn(serve_banner(netns::listen(
                &x,
                any(BANNER_PORT),
            )?))),
        ];
        for pod in [&mut a, &mut b] {
            pod.wait_ready(READY).await?;
        }
        Ok(Fixture {
            _servers: servers,
            a,
            b,
            x,
            _control_plane: control_plane,
            _dir: dir,
            _net: net,
        })
    }

    fn logs(&self) -> String {
        format!("{}{}", self.a.logs(), self.b.logs())
    }
}

/// An app that describes the request it got: `peer=<address the connection came from>
/// xff=<x-forwarded-for> id=<keel-client-id>` (addresses in their canonical form, so that an
/// IPv4 client of the dual-stack socket is shown as IPv4).
async fn serve_app(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let peer = peer.ip().to_canonical();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let text = format!(
                    "peer={peer} xff={} id={}",
                    header("x-forwarded-for"),
                    header("keel-client-id")
                );
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Echoes every byte until the client half-closes, then says `bye` and closes.
async fn serve_echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.write_all(b"bye").await;
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Speaks first (as SMTP or MySQL do): the banner, then an echo of one read.
async fn serve_banner(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(BANNER).await;
            let mut buf = [0u8; 64];
            if let Ok(n) = stream.read(&mut buf).await {
                let _ = stream.write_all(&buf[..n]).await;
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Runs curl in pod `a` (through its sidecar); returns (status code, body). A failed transfer is
/// code 0, with curl's complaint as the body.
fn curl(pod: &MeshedPod, url: &str) -> anyhow::Result<(u16, String)> {
    let output = pod.exec([
        "curl",
        "-sS",
        "-g",
        "-m",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ])?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').with_context(|| {
        format!(
            "curl {url}: {stdout:?} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    match code.trim().parse() {
        Ok(code) if code != 0 => Ok((code, body.to_owned())),
        _ => Ok((0, String::from_utf8_lossy(&output.stderr).trim().to_owned())),
    }
}

fn grew(before: &Metrics, after: &Metrics, name: &str, filter: &[(&str, &str)]) -> f64 {
    after.sum(name, filter) - before.sum(name, filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_goes_through_both_sidecars_beside_ipv4() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let a6 = fx.a.ipv6().context("a has IPv6")?;
    let (before_a, before_b) = (fx.a.metrics().await?, fx.b.metrics().await?);
    let expected = format!("peer=::1 xff={a6} id=spiffe://ds.local/ns/{NS}/sa/a");
    let (code, body) = curl(&fx.a, &format!("http://[{WEB6_VIP}]/"))?;
    ensure!(
        code == 200 && body == expected,
        "over IPv6: {code} {body:?}, expected {expected:?}\n{}",
        fx.logs()
    );
    let expected = format!(
        "peer=127.0.0.1 xff={} id=spiffe://ds.local/ns/{NS}/sa/a",
        fx.a.ip()
    );
    let (code, body) = curl(&fx.a, &format!("http://{WEB_VIP}/"))?;
    ensure!(
        code == 200 && body == expected,
        "over IPv4: {code} {body:?}, expected {expected:?}\n{}",
        fx.logs()
    );
    let (after_a, after_b) = (fx.a.metrics().await?, fx.b.metrics().await?);
    for service in ["web", "web6"] {
        let requests = grew(
            &before_a,
            &after_a,
            "keel_requests_total",
            &[
                ("direction", "outbound"),
                ("service", &format!("{NS}/{service}")),
            ],
        );
        ensure!(
            requests == 1.0,
            "a's sidecar counted {requests} requests to {service}"
        );
    }
    let mtls = grew(
        &before_b,
        &after_b,
        "keel_tcp_connections_opened_total",
        &[("direction", "inbound"), ("protocol", "mtls")],
    );
    ensure!(
        mtls == 2.0,
        "b's sidecar accepted {mtls} mTLS connections, expected one per family\n{}",
        fx.logs()
    );
    Ok(())
}

/// A raw connection from pod `a`, redirected through its sidecar, that sends `message`, expects
/// it back, half-closes and returns what came after.
async fn echo_from(a: &MeshedPod, to: SocketAddr, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = netns::connect(a, to).await?;
    stream.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
        .await
        .map_err(|_| anyhow!("{to}: no echo within 10 s"))??;
    ensure!(echoed == message, "{to} echoed {echoed:?}");
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .map_err(|_| anyhow!("{to}: not closed after the half-close"))??;
    Ok(rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_the_mesh_are_passed_through_on_both_families() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let x4 = fx.x.ip();
    let x6 = fx.x.ipv6().context("x has IPv6")?;
    let a6 = fx.a.ipv6().context("a has IPv6")?;
    let before = fx.a.metrics().await?;
    for (x, a) in [
        (
            std::net::IpAddr::from(x4),
            std::net::IpAddr::from(fx.a.ip()),
        ),
        (x6.into(), a6.into()),
    ] {
        let http = SocketAddr::new(x, APP_PORT);
        // HTTP, request by request: from a's sidecar (its address, the proxy's connection),
        // with nothing of the mesh's added.
        let (code, body) = curl(&fx.a, &format!("http://{http}/"))?;
        let expected = format!("peer={a} xff=- id=-");
        ensure!(
            code == 200 && body == expected,
            "HTTP to {http}: {code} {body:?}, expected {expected:?}\n{}",
            fx.logs()
        );
        // Opaque TCP, with the half-close passed on.
        let echo = SocketAddr::new(x, ECHO_PORT);
        let rest = echo_from(&fx.a, echo, b"through a's sidecar").await?;
        ensure!(rest == b"bye", "after the half-close to {echo}: {rest:?}");
        // A server that speaks first: detection gives up waiting for the client and copies.
        let banner = SocketAddr::new(x, BANNER_PORT);
        let mut stream = netns::connect(&fx.a, banner).await?;
        let mut got = vec![0u8; BANNER.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
            .await
            .map_err(|_| anyhow!("{banner}: no banner within 10 s\n{}", fx.logs()))??;
        ensure!(got == BANNER, "{banner} sent {got:?}");
        stream.write_all(b"hello").await?;
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
            .await
            .map_err(|_| anyhow!("{banner}: not closed"))??;
        ensure!(reply == b"hello", "{banner} answered {reply:?}");
    }
    // All of it went through a's sidecar: two HTTP requests for no service, and four opaque
    // connections.
    let after = fx.a.metrics().await?;
    let passthrough = grew(
        &before,
        &after,
        "keel_requests_total",
        &[("direction", "outbound"), ("service", "")],
    );
    ensure!(
        passthrough == 2.0,
        "a's sidecar counted {passthrough} passthrough requests"
    );
    let opaque = grew(
        &before,
        &after,
        "keel_tcp_connections_opened_total",
        &[("direction", "outbound"), ("protocol", "tcp")],
    );
    ensure!(
        opaque == 4.0,
        "a's sidecar counted {opaque} opaque connections"
    );
    Ok(())
}

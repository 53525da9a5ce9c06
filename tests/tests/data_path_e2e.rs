//! The data path's edges, end to end on a real kernel: the proxy's own answers with their
//! `keel-error` reasons, request and response bodies streamed through both sidecars, many
//! HTTP/1.1 client connections sharing one connection between sidecars, upgraded connections,
//! half-closed and stalled clients, a stream cut mid-response beside others on its connection,
//! gRPC errors in trailers, graceful shutdown on SIGTERM (and `/ready` before the first
//! configuration and while draining), and `keelctl status` with real proxies.
//!
//! Pods: `a` (the client, with a sidecar), `b` (an app and a gRPC server with a sidecar), `r` (no sidecar: a server
//! that resets every connection, and a port where nothing listens). The mesh runs with a CA, as
//! users run it, and with `REGISTRY_ONLY` so that destinations outside it are refused. Without
//! root each test prints `SKIP: <reason>` and passes.
//!
//! The pods' servers run on this test's runtime while curl and keelctl block a thread waiting for
//! them, so the tests run on a multi-threaded runtime.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_control_plane::ControlPlane;
use keel_proto::v1::discovery_client::DiscoveryClient;
use keel_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse};
use keel_tests::netns::{self, MeshedPod, Task, TestNetwork};
use keel_tests::skip_unless_root;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "dp";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const SLOW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 51);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 52);
const DEAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const RESET_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);
const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 55);
const GRPC_PORT: u16 = 9090;
const APP_PORT: u16 = 8080;
const DEAD_PORT: u16 = 8081;
const READY: Duration = Duration::from_secs(30);

fn yaml(a: Ipv4Addr, b: Ipv4Addr, r: Ipv4Addr) -> String {
    format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: dp.local, outboundTrafficPolicy: REGISTRY_ONLY}}
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
metadata: {{name: slow, namespace: {NS}}}
spec:
  vips: [{SLOW_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: web}}
  routes:
  - name: impatient
    destinations: [{{service: slow}}]
    timeout: 300ms
    retries: {{attempts: 0}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: empty, namespace: {NS}}}
spec:
  vips: [{EMPTY_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: nobody}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: dead, namespace: {NS}}}
spec:
  vips: [{DEAD_VIP}]
  ports: [{{name: http, port: 80, targetPort: {DEAD_PORT}, protocol: HTTP}}]
  selector: {{app: outside}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: reset, namespace: {NS}}}
spec:
  vips: [{RESET_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: outside}}
  routes:
  - name: once
    destinations: [{{service: reset}}]
    retries: {{attempts: 0}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: grpc, namespace: {NS}}}
spec:
  vips: [{GRPC_VIP}]
  ports: [{{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}, protocol: GRPC}}]
  selector: {{app: web}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: a, namespace: {NS}, labels: {{app: client}}}}
spec: {{serviceAccount: a, addresses: [{a}]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: b, namespace: {NS}, labels: {{app: web}}}}
spec: {{serviceAccount: b, addresses: [{b}]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: r, namespace: {NS}, labels: {{app: outside}}}}
spec: {{serviceAccount: r, addresses: [{r}], meshed: false}}
"
    )
}

/// Fields drop in order: servers, pods, control plane, files, network.
struct Fixture {
    _servers: Vec<Task>,
    a: MeshedPod,
    b: MeshedPod,
    _r: keel_control_plane::demo::netns::Pod,
    control_plane: ControlPlane,
    /// HTTP/1 and HTTP/2 connections b's app accepted.
    app_connections: Arc<AtomicUsize>,
    /// `/sleep/<ms>` requests b's app began.
    app_sleeps: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
    _net: TestNetwork,
}

impl Fixture {
    async fn start() -> anyhow::Result<Fixture> {
        Fixture::start_with(&[]).await
    }

    /// The fixture with `run_args` added to both sidecars' `keel-proxy run` flags.
    async fn start_with(run_args: &[&str]) -> anyhow::Result<Fixture> {
        let net = TestNetwork::create()?;
        let (ip_a, ip_b, ip_r) = (net.host(2), net.host(3), net.host(4));
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("mesh.yaml"), yaml(ip_a, ip_b, ip_r))?;
        let control_plane = net.start_control_plane(dir.path()).await?;
        let pods = net.add_certified_pods_with(
            &control_plane,
            "dp.local",
            NS,
            &[("a", ip_a), ("b", ip_b)],
            "zone-a",
            "info",
            run_args,
        )?;
        let [mut a, mut b]: [MeshedPod; 2] = pods.try_into().map_err(|_| anyhow!("two pods"))?;
        let r = net.add_pod("r", ip_r)?;
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let app_connections = Arc::new(AtomicUsize::new(0));
        let app_sleeps = Arc::new(AtomicUsize::new(0));
        let servers = vec![
            Task(tokio::spawn(serve_app(
                netns::listen(&b, any(APP_PORT))?,
                app_connections.clone(),
                app_sleeps.clone(),
            ))),
            Task(tokio::spawn(serve_resets(netns::listen(
                &r,
                any(APP_PORT),
            )?))),
            Task(tokio::spawn(serve_grpc_errors(netns::listen(
                &b,
                any(GRPC_PORT),
            )?))),
        ];
        for pod in [&mut a, &mut b] {
            pod.wait_ready(READY).await?;
        }
        Ok(Fixture {
            _servers: servers,
            a,
            b,
            _r: r,
            control_plane,
            app_connections,
            app_sleeps,
            _dir: dir,
            _net: net,
        })
    }

    fn logs(&self) -> String {
        format!("{}{}", self.a.logs(), self.b.logs())
    }
}

/// FNV-1a, to compare bodies without keeping them.
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The app in b:
/// - `/body`: reads the request body and answers `<bytes> <fnv> <HTTP version>`;
/// - `/big/<n>`: answers `n` bytes, streamed in 64 KiB chunks without a length;
/// - `/slow`: answers after 2 s;
/// - `/sleep/<ms>`: counts itself in `sleeps`, then answers `slept <ms>` after that long;
/// - `/method`: answers `method=<method> <HTTP version>`;
/// - `/abort`: sends its head and `partial`, then fails (the connection to the proxy is cut
///   mid-body);
/// - a WebSocket-style upgrade: 101, then echoes bytes until the client half-closes, then
///   writes `bye` and closes;
/// - anything else: `version=<HTTP version>`.
async fn serve_app(
    listener: tokio::net::TcpListener,
    connections: Arc<AtomicUsize>,
    sleeps: Arc<AtomicUsize>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let sleeps = sleeps.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let sleeps = sleeps.clone();
                async move {
                    let version = format!("{:?}", req.version());
                    let path = req.uri().path().to_owned();
                    type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
                    let text = |s: String| -> http::Response<Body> {
                        http::Response::new(
                            Full::new(Bytes::from(s)).map_err(|n| match n {}).boxed(),
                        )
                    };
                    if req.headers().contains_key(http::header::UPGRADE) {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = upgrade.await else { return };
                            let mut io = TokioIo::new(upgraded);
                            let mut buf = [0u8; 1024];
                            loop {
                                match io.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if io.write_all(&buf[..n]).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            // The client half-closed; the other direction still works.
                            let _ = io.write_all(b"bye").await;
                            let _ = io.shutdown().await;
                        });
                        let mut response = text(String::new());
                        *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        response
                            .headers_mut()
                            .insert(http::header::UPGRADE, "websocket".parse().expect("value"));
                        response
                            .headers_mut()
                            .insert(http::header::CONNECTION, "upgrade".parse().expect("value"));
                        return Ok::<_, Infallible>(response);
                    }
                    if path == "/body" {
                        let mut body = req.into_body();
                        let (mut len, mut hash) = (0usize, FNV_START);
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(data) = frame.into_data() {
                                len += data.len();
                                hash = fnv(hash, &data);
                            }
                        }
                        return Ok(text(format!("{len} {hash:x} {version}")));
                    }
                    if let Some(n) = path.strip_prefix("/big/") {
                        let n: usize = n.parse().unwrap_or(0);
                        let chunks = (0..n.div_ceil(65536)).map(move |i| {
                            let size = (n - i * 65536).min(65536);
                            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; size])))
                        });
                        let body = StreamBody::new(futures::stream::iter(chunks));
                        return Ok(http::Response::new(BodyExt::boxed(body)));
                    }
                    if path == "/method" {
                        return Ok(text(format!("method={} {version}", req.method())));
                    }
                    if path == "/abort" {
                        // The head and a first chunk, then the app fails mid-body.
                        let frames =
                            futures::stream::iter([true, false]).then(|first| async move {
                                if first {
                                    Ok(Frame::data(Bytes::from_static(b"partial")))
                                } else {
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    Err(std::io::Error::other("the app gave up mid-body"))
                                }
                            });
                        return Ok(http::Response::new(BodyExt::boxed(StreamBody::new(frames))));
                    }
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    if let Some(ms) = path.strip_prefix("/sleep/") {
                        let ms: u64 = ms.parse().unwrap_or(0);
                        sleeps.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        return Ok(text(format!("slept {ms}")));
                    }
                    Ok(text(format!("version={version}")))
                }
            });
            // Room for what the sidecars add to a request at the proxy's header limit.
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().max_headers(200);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A server that reads what a client sends, then resets the connection.
async fn serve_resets(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.set_zero_linger();
            drop(stream);
        });
    }
}

/// Runs curl in pod `a` (through its sidecar); returns (status code, headers, body).
fn curl(pod: &MeshedPod, args: &[&str]) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut argv = vec!["curl", "-sS", "-m", "20", "-D", "/dev/stderr", "-o", "-"];
    argv.extend_from_slice(args);
    let output = pod.exec(&argv)?;
    let headers = String::from_utf8_lossy(&output.stderr).into_owned();
    let code = headers
        .lines()
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("curl {args:?} printed no status: {headers}"))?;
    Ok((code, headers.to_ascii_lowercase(), output.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_names_why_it_answered_itself() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let cases = [
        (format!("http://{EMPTY_VIP}/"), 503, "no-endpoints"),
        (
            format!("http://{DEAD_VIP}/"),
            503,
            "upstream-connect-failed",
        ),
        (format!("http://{SLOW_VIP}/slow"), 504, "timeout"),
        // Outside the mesh under REGISTRY_ONLY (the gateway's address, any port).
        (
            format!("http://{}:9/", fx.control_plane.discovery_addr.ip()),
            502,
            "registry-only",
        ),
    ];
    for (url, status, reason) in &cases {
        let (code, headers, _) = curl(&fx.a, &[url])?;
        ensure!(
            code == *status && headers.contains(&format!("keel-error: {reason}")),
            "{url}: {code}, expected {status} with keel-error: {reason}; headers:\n{headers}\n{}",
            fx.logs()
        );
    }
    // A POST (never retried) to an endpoint that resets the connection.
    let url = format!("http://{RESET_VIP}/");
    let (code, headers, _) =
        curl(&fx.a, &["-X", "POST", "-d", "x", &url]).with_context(|| fx.logs())?;
    ensure!(
        code == 502 && headers.contains("keel-error: upstream-reset"),
        "reset: {code}\n{headers}"
    );
    // Garbage to a declared HTTP port, and a request head over the limit.
    let mut raw = netns::connect(&fx.a, SocketAddr::from((WEB_VIP, 80))).await?;
    raw.write_all(b"\x00\x01\x02 this is not HTTP\r\n\r\n")
        .await?;
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("keel-error: not-http"),
        "garbage: {answer:?}"
    );
    let big = format!("x-big: {}", "a".repeat(100 << 10));
    let (code, headers, _) = curl(&fx.a, &["-H", &big, &format!("http://{WEB_VIP}/")])?;
    ensure!(
        code == 431 && headers.contains("keel-error: headers-too-large"),
        "a 100 KiB header: {code}\n{headers}"
    );
    // The same head arriving in small pieces, as over a slow network, so that hyper's read
    // buffer fills before the head is whole; and heads over the header count, at and under it.
    let big_head = format!("GET / HTTP/1.1\r\nHost: web\r\n{big}\r\n\r\n");
    let many = |n: usize| {
        let fields: String = (1..n).map(|i| format!("x-field-{i}: {i}\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: web\r\n{fields}\r\n")
    };
    for (what, head, status, reason) in [
        (
            "a 100 KiB header in 2 KiB pieces",
            big_head,
            431,
            Some("headers-too-large"),
        ),
        (
            "101 header fields",
            many(101),
            431,
            Some("headers-too-large"),
        ),
        (
            "150 header fields",
            many(150),
            431,
            Some("headers-too-large"),
        ),
        ("100 header fields", many(100), 200, None),
        // Beyond twice the limits hyper answers before keel sees the request: 431 still, but
        // without keel-error (hyper's own answer cannot carry one).
        (
            "a 300 KiB header",
            format!(
                "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
                "a".repeat(300 << 10)
            ),
            431,
            None,
        ),
        // A malformed first head is refused by keel before hyper sees it, naming why.
        (
            "a header line without a colon",
            "GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n".to_owned(),
            400,
            Some("bad-request"),
        ),
    ] {
        let mut raw = netns::connect(&fx.a, SocketAddr::from((WEB_VIP, 80))).await?;
        // A piece every 2 ms, until the proxy answers (sending on would only reset the
        // connection under its answer).
        for piece in head.as_bytes().chunks(2048) {
            raw.write_all(piece).await?;
            if tokio::time::timeout(Duration::from_millis(2), raw.readable())
                .await
                .is_ok()
            {
                break;
            }
        }
        let answer = String::from_utf8_lossy(&read_head(&mut raw).await?).to_ascii_lowercase();
        ensure!(
            answer.starts_with(&format!("http/1.1 {status}")),
            "{what}: {answer:?}\n{}",
            fx.logs()
        );
        if let Some(reason) = reason {
            ensure!(
                answer.contains(&format!("keel-error: {reason}")),
                "{what}: no keel-error: {reason} in {answer:?}"
            );
        }
    }
    // The answer to a malformed head names what is wrong and on which line.
    let mut raw = netns::connect(&fx.a, SocketAddr::from((WEB_VIP, 80))).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nbad name: 1\r\n\r\n")
        .await?;
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains("keel-error: bad-request")
            && answer
                .ends_with("bad-request: malformed request head: invalid header name on line 3\n"),
        "a header name with a space: {answer:?}"
    );
    // The sidecar still serves.
    let (code, _, _) = curl(&fx.a, &[&format!("http://{WEB_VIP}/")])?;
    ensure!(code == 200, "after the errors: {code}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_through_both_sidecars() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    // 5 MiB up, chunked (no length), as HTTP/1.1.
    let upload: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    let file = fx._net.stage_file("upload.bin", &upload, false)?;
    let url = format!("http://{WEB_VIP}/body");
    let data = format!("@{}", file.display());
    let (code, _, body) = curl(
        &fx.a,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &data,
            &url,
        ],
    )?;
    let expected = format!("{} {:x} HTTP/1.1", upload.len(), fnv(FNV_START, &upload));
    ensure!(
        code == 200 && String::from_utf8_lossy(&body) == expected,
        "upload: {code} {:?}, expected {expected:?}\n{}",
        String::from_utf8_lossy(&body),
        fx.logs()
    );
    // 3 MiB down, streamed without a length.
    let (code, headers, body) = curl(&fx.a, &[&format!("http://{WEB_VIP}/big/3145728")])?;
    ensure!(
        code == 200 && body.len() == 3 << 20 && body.iter().all(|b| *b == b'x'),
        "download: {code}, {} bytes\n{headers}",
        body.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_share_one_connection_between_sidecars() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let before = fx.b.metrics().await?;
    let app_before = fx.app_connections.load(Ordering::Relaxed);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let from = fx.a.netns_path();
        clients.push(tokio::spawn(async move {
            let stream = netns::connect_from(&from, SocketAddr::from((WEB_VIP, 80))).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut versions = Vec::new();
            for _ in 0..5 {
                let req = http::Request::get("/")
                    .header("host", "web")
                    .body(http_body_util::Empty::<Bytes>::new())?;
                let response = sender.send_request(req).await?;
                let body = response.into_body().collect().await?.to_bytes();
                versions.push(String::from_utf8_lossy(&body).into_owned());
            }
            Ok::<_, anyhow::Error>(versions)
        }));
    }
    for client in clients {
        for version in client.await?? {
            // The app speaks HTTP/1.1 with b's sidecar, whatever crossed between sidecars.
            ensure!(version == "version=HTTP/1.1", "the app saw {version}");
        }
    }
    let after = fx.b.metrics().await?;
    let opened = |m: &netns::Metrics| {
        m.sum(
            "keel_tcp_connections_opened_total",
            &[("direction", "inbound"), ("protocol", "mtls")],
        )
    };
    let between = opened(&after) - opened(&before);
    let requests = after.sum("keel_requests_total", &[("direction", "inbound")])
        - before.sum("keel_requests_total", &[("direction", "inbound")]);
    ensure!(
        requests >= 40.0,
        "b's sidecar counted {requests} of the 40 requests"
    );
    ensure!(
        between == 1.0,
        "8 client connections opened {between} connections between the sidecars\n{}",
        fx.logs()
    );
    let to_app = fx.app_connections.load(Ordering::Relaxed) - app_before;
    ensure!(
        to_app <= 8,
        "b's sidecar opened {to_app} connections to the app"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_pass_through_with_half_close() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let mut stream = upgrade(&fx.a).await.with_context(|| fx.logs())?;
    echo(&mut stream, b"ping through the mesh").await?;
    // Half-close: the app sees EOF, and its answer still comes back.
    half_close_and_hear_bye(stream).await
}

/// A WebSocket-style upgrade from pod `a` to web: the connection once the 101 has arrived.
async fn upgrade(a: &MeshedPod) -> anyhow::Result<tokio::net::TcpStream> {
    let mut stream = netns::connect(a, SocketAddr::from((WEB_VIP, 80))).await?;
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(stream.read(&mut byte).await? == 1, "closed during the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    ensure!(head.starts_with("http/1.1 101"), "no 101: {head}");
    Ok(stream)
}

/// Sends `message` on an upgraded connection and expects it back.
async fn echo(stream: &mut tokio::net::TcpStream, message: &[u8]) -> anyhow::Result<()> {
    stream.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
        .await
        .map_err(|_| anyhow!("no echo within 10s"))??;
    ensure!(echoed == message, "echo: {echoed:?}");
    Ok(())
}

/// Half-closes an upgraded connection: the app sees EOF and answers `bye` before it closes.
async fn half_close_and_hear_bye(mut stream: tokio::net::TcpStream) -> anyhow::Result<()> {
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .map_err(|_| anyhow!("the upgraded connection did not close"))??;
    ensure!(rest == b"bye", "after the half-close: {rest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelctl_status_lists_the_connected_proxies() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let keelctl = netns::workspace_binary("keelctl", "keel-control-plane")?;
    let admin = format!("http://{}", fx.control_plane.admin_addr);
    let run = |args: &[&str]| {
        std::process::Command::new(&keelctl)
            .args(args)
            .args(["--control-plane", &admin])
            .output()
    };
    let json = run(&["status", "-o", "json"])?;
    ensure!(json.status.success(), "keelctl status -o json failed");
    let status: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let proxies = status["proxies"].as_array().context("proxies")?;
    let ids: Vec<&str> = proxies.iter().filter_map(|p| p["id"].as_str()).collect();
    ensure!(ids == ["a.dp", "b.dp"], "proxies: {ids:?}");
    for p in proxies {
        ensure!(
            p["types"]["Endpoints"]["acked_version"].as_u64() == status["version"].as_u64(),
            "{} has not acknowledged the current version: {p}",
            p["id"]
        );
        ensure!(p["nacks_total"] == 0, "{} has NACKs: {p}", p["id"]);
    }
    let human = run(&["status"])?;
    let text = String::from_utf8_lossy(&human.stdout);
    ensure!(
        human.status.success() && text.contains("Proxies: 2") && text.contains("a.dp"),
        "keelctl status:\n{text}"
    );
    let ca = run(&["ca", "status"])?;
    let text = String::from_utf8_lossy(&ca.stdout);
    ensure!(
        ca.status.success()
            && text.contains("a.dp")
            && text.contains("spiffe://dp.local/ns/dp/sa/b"),
        "keelctl ca status:\n{text}"
    );
    Ok(())
}

/// `GET <path>` to web from pod `a`, over a connection of its own: (status, body).
async fn get(from: PathBuf, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = netns::connect_from(&from, SocketAddr::from((WEB_VIP, 80))).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "web")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `GET /ready` on a sidecar's admin port, from the host: (status, body).
async fn ready(pod: &MeshedPod) -> anyhow::Result<(u16, String)> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(pod.admin()),
    )
    .await
    .map_err(|_| anyhow!("connecting to {}: timed out", pod.admin()))??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/ready")
        .header("host", "admin")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `check` every 50 ms until it gives `Some`, for at most `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the sidecar's process to exit, at most `within`.
async fn exit_status(pod: &mut MeshedPod, within: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = pod.proxy.exited() {
            return Ok(status);
        }
        ensure!(
            Instant::now() < deadline,
            "the sidecar of {} is still running after {within:?}:\n{}",
            pod.name(),
            pod.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/2 client connection that sends no request. It acknowledges the server's SETTINGS
/// and PINGs (a graceful shutdown waits for a PING's answer, as a client must give it) and,
/// once the server has closed the connection, returns the type of every frame received.
async fn idle_http2(mut stream: tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await?;
    stream.write_all(&frame(SETTINGS, 0, &[])).await?;
    let mut seen = Vec::new();
    loop {
        let mut head = [0u8; 9];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(seen),
            // The server may close with an acknowledgement of ours unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && seen.contains(&GOAWAY) => {
                return Ok(seen);
            }
            Err(e) => return Err(e).context("reading an HTTP/2 frame"),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        seen.push(kind);
        let answer = match kind {
            SETTINGS if flags & ACK == 0 => Some(frame(SETTINGS, ACK, &[])),
            PING if flags & ACK == 0 => Some(frame(PING, ACK, &payload)),
            _ => None,
        };
        if let Some(answer) = answer {
            // Writing after the server's last GOAWAY may fail; the frames read tell the story.
            let _ = stream.write_all(&answer).await;
        }
    }
}

/// Whether `error` comes from a connection the other side refused.
fn refused(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_work_in_flight_finish_then_exits() -> anyhow::Result<()> {
    skip_unless_root!();
    // A grace far longer than the work: the sidecar must leave as soon as it is done.
    let mut fx = Fixture::start_with(&["--shutdown-grace", "120s"]).await?;

    // Before its first configuration a sidecar is not ready: one whose control plane is not
    // there (nothing listens on the gateway's port 9).
    let mut lonely = fx._net.add_meshed_pod(
        "n",
        fx._net.host(5),
        &netns::Sidecar {
            control_plane: SocketAddr::from((fx._net.gateway(), 9)),
            identity: None,
            workload: "n",
            namespace: NS,
            service_account: "n",
            region: "local",
            zone: "zone-a",
            log: "info",
        },
    )?;
    let (code, body) = until(Duration::from_secs(30), "n's admin port", || async {
        ready(&lonely).await.ok()
    })
    .await
    .with_context(|| lonely.logs())?;
    ensure!(
        code == 503 && body.contains("waiting for the first configuration"),
        "/ready before any configuration: {code} {body:?}"
    );
    ensure!(lonely.proxy.exited().is_none(), "{}", lonely.logs());

    let web = SocketAddr::from((WEB_VIP, 80));
    let idle = tokio::spawn(idle_http2(netns::connect(&fx.a, web).await?));
    let mut upgraded = upgrade(&fx.a).await.with_context(|| fx.logs())?;
    echo(&mut upgraded, b"before").await?;
    let slow = tokio::spawn(get(fx.a.netns_path(), "/sleep/3000"));
    let sleeps = fx.app_sleeps.clone();
    until(
        Duration::from_secs(10),
        "the slow request reaching the app",
        || {
            let sleeps = sleeps.clone();
            async move { (sleeps.load(Ordering::Relaxed) >= 1).then_some(()) }
        },
    )
    .await?;
    ensure!(ready(&fx.a).await?.0 == 200, "a is ready before SIGTERM");

    fx.a.proxy.signal(libc::SIGTERM)?;
    let signalled = Instant::now();
    // Draining: the admin server still answers, and says so over HTTP.
    let body = until(Duration::from_secs(10), "/ready answering 503", || async {
        match ready(&fx.a).await {
            Ok((503, body)) => Some(body),
            _ => None,
        }
    })
    .await?;
    ensure!(body.contains("draining"), "/ready while draining: {body:?}");
    // New connections are refused: the listener is closed.
    until(
        Duration::from_secs(10),
        "a new connection being refused",
        || async {
            match netns::connect(&fx.a, web).await {
                Err(e) if refused(&e) => Some(()),
                _ => None,
            }
        },
    )
    .await?;
    // The request in flight completes; the idle HTTP/2 connection gets GOAWAY and is closed.
    let (code, body) = slow.await??;
    ensure!(
        code == 200 && body == "slept 3000",
        "the request in flight: {code} {body:?}\n{}",
        fx.logs()
    );
    let frames = tokio::time::timeout(Duration::from_secs(30), idle)
        .await
        .map_err(|_| anyhow!("the idle HTTP/2 connection was not closed"))???;
    ensure!(
        frames.contains(&0x7),
        "no GOAWAY on the idle HTTP/2 connection; frames: {frames:?}"
    );
    // The upgraded connection outlives its HTTP connection and keeps the sidecar alive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        fx.a.proxy.exited().is_none(),
        "the sidecar left with an upgraded connection open:\n{}",
        fx.logs()
    );
    echo(&mut upgraded, b"while draining").await?;
    half_close_and_hear_bye(upgraded).await?;
    // Then it leaves, long before the grace is over.
    let status = exit_status(&mut fx.a, Duration::from_secs(60)).await?;
    ensure!(status.success(), "the drained sidecar exited with {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(120),
        "the sidecar waited for the whole grace"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_what_outlasts_the_grace() -> anyhow::Result<()> {
    skip_unless_root!();
    const GRACE: Duration = Duration::from_secs(2);
    let mut fx = Fixture::start_with(&["--shutdown-grace", "2s"]).await?;
    let from = fx.a.netns_path();
    let long = tokio::spawn(async move {
        let outcome = get(from, "/sleep/60000").await;
        (outcome, Instant::now())
    });
    let sleeps = fx.app_sleeps.clone();
    until(
        Duration::from_secs(10),
        "the long request reaching the app",
        || {
            let sleeps = sleeps.clone();
            async move { (sleeps.load(Ordering::Relaxed) >= 1).then_some(()) }
        },
    )
    .await?;
    fx.a.proxy.signal(libc::SIGTERM)?;
    let signalled = Instant::now();
    let (outcome, ended) = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .map_err(|_| anyhow!("the request outlasting the grace was not cut"))??;
    ensure!(
        outcome.is_err(),
        "the request outlasting the grace got an answer: {outcome:?}"
    );
    ensure!(
        ended - signalled >= GRACE,
        "the request was cut {:?} after SIGTERM, before the {GRACE:?} grace was over",
        ended - signalled
    );
    exit_status(&mut fx.a, Duration::from_secs(30)).await?;
    Ok(())
}

/// Everything a raw connection receives until the other side closes (at most 30 s).
async fn read_all(stream: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| anyhow!("the connection was not closed within 30 s"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_and_stalled_clients_get_an_answer() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start_with(&["--http-head-timeout", "2s"]).await?;
    let web = SocketAddr::from((WEB_VIP, 80));

    // A client that shuts its write side once the request is sent still gets the response,
    // however long the app takes.
    let mut half = netns::connect(&fx.a, web).await?;
    half.write_all(b"GET /sleep/1000 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await?;
    half.shutdown().await?;
    let answer = read_all(&mut half).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("slept 1000"),
        "a half-closed client: {answer:?}\n{}",
        fx.logs()
    );

    // Silence on a port declared HTTP: 408 once the head timeout is over.
    let mut silent = netns::connect(&fx.a, web).await?;
    let answer = read_all(&mut silent).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("keel-error: request-timeout"),
        "a silent client: {answer:?}\n{}",
        fx.logs()
    );

    // Part of a head, then nothing: 408 too, as the first request and after one served.
    for served_before in [false, true] {
        let mut partial = netns::connect(&fx.a, web).await?;
        if served_before {
            partial
                .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                .await?;
        }
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nx-waiting: for")
            .await?;
        let answer = read_all(&mut partial).await?;
        let last = answer.rfind("HTTP/1.1 ").map_or("", |at| &answer[at..]);
        ensure!(
            last.starts_with("HTTP/1.1 408") && last.contains("keel-error: request-timeout"),
            "a stalled head (after a request: {served_before}): {answer:?}\n{}",
            fx.logs()
        );
        if served_before {
            ensure!(
                answer.starts_with("HTTP/1.1 200"),
                "the request before the stalled head: {answer:?}"
            );
        }
    }

    // An idle keep-alive connection is closed after the head timeout, without a word.
    let mut idle = netns::connect(&fx.a, web).await?;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await?;
    let answer = read_all(&mut idle).await?;
    ensure!(
        answer.matches("HTTP/1.1 ").count() == 1 && answer.starts_with("HTTP/1.1 200"),
        "an idle keep-alive connection: {answer:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_response_spares_the_others_on_its_connection() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let stream = netns::connect(&fx.a, SocketAddr::from((WEB_VIP, 80))).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let get = |path: &'static str| {
        let mut sender = sender.clone();
        async move {
            let req = http::Request::get(format!("http://web{path}"))
                .body(http_body_util::Empty::<Bytes>::new())?;
            let response = sender.send_request(req).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            anyhow::Ok((status, body))
        }
    };
    // One stream waits on the app while another is cut after its head and first bytes.
    let (slow, cut) = tokio::join!(get("/sleep/1500"), get("/abort"));
    let (status, body) = cut.with_context(|| fx.logs())?;
    ensure!(
        status == 200 && body.is_err(),
        "the cut stream: {status}, body {body:?}"
    );
    let (status, body) = slow?;
    ensure!(
        status == 200 && body.as_deref().ok() == Some(&b"slept 1500"[..]),
        "the stream beside the cut one: {status}, body {body:?}\n{}",
        fx.logs()
    );
    // The connection itself is unharmed.
    let (status, body) = get("/").await?;
    ensure!(
        status == 200 && body.as_deref().ok() == Some(&b"version=HTTP/2.0"[..]),
        "a request after the cut: {status}, body {body:?}"
    );
    ensure!(!conn.is_finished(), "the client's connection ended");
    Ok(())
}

/// A response head read from a raw connection (up to the blank line, or what came before the
/// connection closed).
async fn read_head(stream: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte))
            .await
            .map_err(|_| anyhow!("no response head within 20 s: {head:?}"))??;
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_method_token_is_http_on_a_declared_http_port() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    // WebDAV's methods and others HTTP/1.1 allows, one of them with a long request line.
    let long = format!("http://{WEB_VIP}/method?{}", "q".repeat(3000));
    for (method, url) in [
        ("PROPFIND", format!("http://{WEB_VIP}/method")),
        ("MKCOL", format!("http://{WEB_VIP}/method")),
        ("PURGE", long),
    ] {
        let (code, headers, body) = curl(&fx.a, &["-X", method, &url])?;
        let body = String::from_utf8_lossy(&body);
        ensure!(
            code == 200 && body == format!("method={method} HTTP/1.1"),
            "{method}: {code} {body:?}\n{headers}\n{}",
            fx.logs()
        );
    }
    Ok(())
}

/// A gRPC server in b that fails on purpose, implementing `keel.mesh.v1.Discovery/Stream`:
/// a stream whose first message has type URL `fail-now` is refused at once (PERMISSION_DENIED,
/// a trailers-only response); otherwise every message comes back until one with type URL
/// `fail`, which ends the stream with NOT_FOUND in the trailers. Both statuses carry the
/// metadata `x-detail: kept`.
struct FailingGrpc;

fn failing(code: tonic::Code, message: &str) -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        "x-detail",
        tonic::metadata::MetadataValue::from_static("kept"),
    );
    tonic::Status::with_metadata(code, message, metadata)
}

type Responses = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Discovery for FailingGrpc {
    type StreamStream = Responses;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut requests = request.into_inner();
        let first = requests.message().await?.unwrap_or_default();
        if first.type_url == "fail-now" {
            return Err(failing(tonic::Code::PermissionDenied, "refused at once"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(request) = next.take() {
                let reply = if request.type_url == "fail" {
                    Err(failing(tonic::Code::NotFound, "no such article: 17"))
                } else {
                    Ok(DiscoveryResponse {
                        type_url: request.type_url,
                        nonce: request.response_nonce,
                        ..Default::default()
                    })
                };
                let last = reply.is_err();
                if tx.send(reply).await.is_err() || last {
                    return;
                }
                next = requests.message().await.ok().flatten();
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

async fn serve_grpc_errors(listener: tokio::net::TcpListener) {
    let _ = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(FailingGrpc))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_cross_both_sidecars_in_trailers() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let before = fx.b.metrics().await?;
    let from = fx.a.netns_path();
    let target = SocketAddr::from((GRPC_VIP, GRPC_PORT));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let from = from.clone();
            async move {
                let stream = netns::connect_from(&from, target).await?;
                anyhow::Ok(TokioIo::new(stream))
            }
        }))
        .await
        .context("connecting the gRPC channel from pod a")?;
    let mut client = DiscoveryClient::new(channel);
    let message = |type_url: &str, nonce: &str| DiscoveryRequest {
        type_url: type_url.to_owned(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    };
    let detail = |status: &tonic::Status| {
        status
            .metadata()
            .get("x-detail")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    // Refused before any message: the status is all the response has.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(message("fail-now", "0")).await?;
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| anyhow!("no answer to fail-now\n{}", fx.logs()))?;
    let status = match refused {
        Ok(_) => bail!("the stream was accepted"),
        Err(status) => status,
    };
    ensure!(
        status.code() == tonic::Code::PermissionDenied
            && status.message() == "refused at once"
            && detail(&status).as_deref() == Some("kept"),
        "the trailers-only error: {status:?}\n{}",
        fx.logs()
    );

    // Two answers, then an error in the trailers.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(message("echo", "1")).await?;
    let mut responses = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| anyhow!("opening the stream: timed out\n{}", fx.logs()))??
    .into_inner();
    let first = next_message(&mut responses)
        .await??
        .context("the first answer")?;
    ensure!(first.nonce == "1", "first answer: {first:?}");
    tx.send(message("echo", "2")).await?;
    let second = next_message(&mut responses)
        .await??
        .context("the second answer")?;
    ensure!(second.nonce == "2", "second answer: {second:?}");
    tx.send(message("fail", "3")).await?;
    let status = match next_message(&mut responses).await? {
        Err(status) => status,
        Ok(other) => bail!("expected the trailers' error, got {other:?}"),
    };
    ensure!(
        status.code() == tonic::Code::NotFound
            && status.message() == "no such article: 17"
            && detail(&status).as_deref() == Some("kept"),
        "the error in the trailers: {status:?}\n{}",
        fx.logs()
    );
    // Both streams went through b's sidecar, over mTLS from a's.
    let after = fx.b.metrics().await?;
    let inbound = |m: &netns::Metrics| {
        m.sum(
            "keel_requests_total",
            &[
                ("direction", "inbound"),
                ("client_id", "spiffe://dp.local/ns/dp/sa/a"),
            ],
        )
    };
    ensure!(
        inbound(&after) - inbound(&before) == 2.0,
        "b's sidecar counted {} gRPC streams from a",
        inbound(&after) - inbound(&before)
    );
    Ok(())
}

async fn next_message(
    responses: &mut tonic::Streaming<DiscoveryResponse>,
) -> anyhow::Result<Result<Option<DiscoveryResponse>, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .map_err(|_| anyhow!("no message within 10 s"))
}

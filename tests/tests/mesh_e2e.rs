//! The mesh end to end, on a real kernel: three pods (network namespaces) with real sidecars
//! (`keel-proxy init` and `keel-proxy run` as uid 1337) and a control plane on the host serving a
//! temporary YAML directory.
//!
//! - pod `a` is the client: unmodified clients (curl, a hyper HTTP/1.1 client, a tonic gRPC
//!   streaming client, a raw TCP client) connect to service VIPs as any application would, and
//!   their connections are redirected through a's sidecar;
//! - pods `b` and `c` are the two endpoints of the `web` (HTTP) and `grpc` (gRPC) services; `b`
//!   alone backs `echo`, a TCP service. Their servers run in this process on sockets opened inside
//!   the pods, so every answer says which pod produced it.
//!
//! Each test asserts that the traffic went through both sidecars (their `/metrics` counters grew
//! on a's outbound side and on b's or c's inbound side), that requests spread over `b` and `c` as
//! the configured balancer says (ROUND_ROBIN: evenly), and that changing the YAML while requests
//! flow re-routes them with no failed request. Without root (or ip, iptables, setpriv, curl) each
//! test prints `SKIP: <reason>` and passes; everything a test creates is removed when it ends,
//! panics included.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_control_plane::ControlPlane;
use keel_proto::v1::discovery_client::DiscoveryClient;
use keel_proto::v1::discovery_server::{Discovery, DiscoveryServer};
use keel_proto::v1::{DiscoveryRequest, DiscoveryResponse};
use keel_tests::netns::{self, MeshedPod, Metrics, Task, TestNetwork};
use keel_tests::skip_unless_root;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const NS: &str = "e2e";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
const SPLIT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 23);
const WEB_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const ECHO_PORT: u16 = 7000;
const WEB_HOST: &str = "web.e2e.svc.cluster.local";
/// Generous bounds: a test fails because something never happens, not because the machine is
/// slow.
const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(20);

const SERVICES: &str = "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: e2e.local
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: web
  namespace: e2e
spec:
  vips: [10.96.0.20]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  selector: {app: web}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: grpc
  namespace: e2e
spec:
  vips: [10.96.0.21]
  ports:
  - {name: grpc, port: 9090, targetPort: 9090, protocol: GRPC}
  selector: {app: web}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: echo
  namespace: e2e
spec:
  vips: [10.96.0.22]
  ports:
  - {name: tcp, port: 7000, targetPort: 7000, protocol: TCP}
  selector: {echo: \"yes\"}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: web-b
  namespace: e2e
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  selector: {app: web, instance: b}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: web-c
  namespace: e2e
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: HTTP}
  selector: {app: web, instance: c}
---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: web
  namespace: e2e
spec:
  targetRef: {service: web}
  loadBalancer: {policy: ROUND_ROBIN}
---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: grpc
  namespace: e2e
spec:
  targetRef: {service: grpc}
  loadBalancer: {policy: ROUND_ROBIN}
";

/// `split`: a service with no endpoints of its own whose one route divides traffic between
/// web-b and web-c.
fn split_yaml(b: u32, c: u32) -> String {
    format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: split
  namespace: e2e
spec:
  vips: [10.96.0.23]
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: HTTP}}
  routes:
  - name: shift
    destinations:
    - {{service: web-b, port: 80, weight: {b}}}
    - {{service: web-c, port: 80, weight: {c}}}
"
    )
}

fn workload_yaml(name: &str, labels: &str, ip: Ipv4Addr) -> String {
    format!(
        "\
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: e2e
  labels: {{{labels}}}
spec:
  serviceAccount: {name}
  addresses: [{ip}]
  locality: {{region: local, zone: zone-a}}
"
    )
}

/// Replaces a file of the watched directory in one step, so the control plane never reads half
/// of it.
fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).with_context(|| format!("writing {name}"))?;
    std::fs::rename(&temporary, dir.join(name)).with_context(|| format!("replacing {name}"))
}

/// Aborts a server task when dropped.
/// The three pods, their servers and the control plane. Fields drop in order: servers, pods
/// (sidecars killed, namespaces deleted), control plane, YAML, network.
struct Fixture {
    _servers: Vec<Task>,
    a: MeshedPod,
    b: MeshedPod,
    c: MeshedPod,
    _control_plane: ControlPlane,
    dir: tempfile::TempDir,
    _net: TestNetwork,
}

impl Fixture {
    async fn start() -> anyhow::Result<Fixture> {
        let net = TestNetwork::create()?;
        let (ip_a, ip_b, ip_c) = (net.host(2), net.host(3), net.host(4));
        let dir = tempfile::tempdir()?;
        write_atomically(dir.path(), "services.yaml", SERVICES)?;
        write_atomically(dir.path(), "split.yaml", &split_yaml(100, 0))?;
        write_atomically(
            dir.path(),
            "workloads.yaml",
            &workloads([ip_a, ip_b, ip_c], true),
        )?;
        // The mesh runs as users run it: with a CA, so every hop between sidecars is mTLS.
        let control_plane = net.start_control_plane(dir.path()).await?;
        let pods = net.add_certified_pods(
            &control_plane,
            "e2e.local",
            NS,
            &[("a", ip_a), ("b", ip_b), ("c", ip_c)],
            "zone-a",
            "info",
        )?;
        let [mut a, mut b, mut c]: [MeshedPod; 3] =
            pods.try_into().map_err(|_| anyhow!("three pods"))?;
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let mut servers = Vec::new();
        for pod in [&b, &c] {
            let name = pod.name().to_owned();
            servers.push(Task(tokio::spawn(serve_http(
                netns::listen(pod, any(WEB_PORT))?,
                name.clone(),
            ))));
            servers.push(Task(tokio::spawn(serve_grpc(
                netns::listen(pod, any(GRPC_PORT))?,
                name,
            ))));
        }
        servers.push(Task(tokio::spawn(serve_echo(netns::listen(
            &b,
            any(ECHO_PORT),
        )?))));
        for pod in [&mut a, &mut b, &mut c] {
            pod.wait_ready(READY).await?;
        }
        Ok(Fixture {
            _servers: servers,
            a,
            b,
            c,
            _control_plane: control_plane,
            dir,
            _net: net,
        })
    }

    fn ips(&self) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
        (self.a.ip(), self.b.ip(), self.c.ip())
    }

    /// The three sidecars' logs, for failure messages.
    fn logs(&self) -> String {
        format!("{}{}{}", self.a.logs(), self.b.logs(), self.c.logs())
    }

    async fn metrics(&self) -> anyhow::Result<[Metrics; 3]> {
        Ok([
            self.a.metrics().await?,
            self.b.metrics().await?,
            self.c.metrics().await?,
        ])
    }
}

/// The workloads a, b and (unless removed) c at `[a, b, c]`.
fn workloads(ips: [Ipv4Addr; 3], with_c: bool) -> String {
    let mut yaml = workload_yaml("a", "app: client", ips[0]);
    yaml += &workload_yaml("b", "app: web, instance: b, echo: \"yes\"", ips[1]);
    if with_c {
        yaml += &workload_yaml("c", "app: web, instance: c", ips[2]);
    }
    yaml
}

/// How much the samples of `name` matching `filter` grew between two scrapes.
fn grew(before: &Metrics, after: &Metrics, name: &str, filter: &[(&str, &str)]) -> f64 {
    after
        .growth(before, name)
        .iter()
        .filter(|(labels, _)| {
            filter
                .iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, n)| n)
        .sum()
}

/// Counters may be updated just after the answer left the sidecar: scrape until `check` holds.
async fn eventually<F>(fx: &Fixture, mut check: F) -> anyhow::Result<()>
where
    F: FnMut(&[Metrics; 3]) -> Result<(), String>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fx.metrics().await?;
        match check(&now) {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= deadline => {
                bail!("{why}\n{}", fx.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers (in pods b and c, on sockets opened there)

/// HTTP/1.1 and HTTP/2: answers every request with `x-served-by: <pod>` and a JSON body naming
/// the pod, the Host it saw and the x-forwarded-for its sidecar added.
async fn serve_http(listener: tokio::net::TcpListener, name: String) {
    let name: Arc<str> = name.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let name = name.clone();
                async move {
                    let header = |h: &str| {
                        request
                            .headers()
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let body = serde_json::json!({
                        "served_by": &*name,
                        "host": header("host"),
                        "xff": header("x-forwarded-for"),
                    });
                    let mut response =
                        http::Response::new(Full::new(Bytes::from(body.to_string())));
                    if let Ok(value) = http::HeaderValue::from_str(&name) {
                        response.headers_mut().insert("x-served-by", value);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A gRPC server implementing `keel.mesh.v1.Discovery/Stream` as an echo: each request comes
/// back as a response with the same type URL and nonce, and the server's name as its version.
struct Echo {
    name: String,
}

#[tonic::async_trait]
impl Discovery for Echo {
    type StreamStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send + 'static>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let name = self.name.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let response = DiscoveryResponse {
                    type_url: request.type_url,
                    nonce: request.response_nonce,
                    system_version: name.clone(),
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve_grpc(listener: tokio::net::TcpListener, name: String) {
    let _ = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(Echo { name }))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await;
}

/// Raw TCP: echoes every byte until the client closes its side, then closes.
async fn serve_echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Clients (in pod a)

/// One HTTP/1.1 connection from pod a, kept alive across requests.
struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    _connection: Task,
}

/// What a server in b or c answered.
#[derive(Debug)]
struct Answer {
    status: http::StatusCode,
    served_by: String,
    body: serde_json::Value,
}

impl Http1 {
    async fn connect(from: &Path, to: SocketAddr) -> anyhow::Result<Http1> {
        let stream = netns::connect_from(from, to).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = Task(tokio::spawn(async move {
            let _ = connection.await;
        }));
        Ok(Http1 {
            sender,
            _connection: connection,
        })
    }

    /// Whether the connection can take another request (the peer may have closed it).
    async fn usable(&mut self) -> bool {
        self.sender.ready().await.is_ok()
    }

    async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<Answer> {
        let request = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::new())?;
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status();
            let served_by = response
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Answer {
                status,
                served_by,
                body: serde_json::from_slice(&body).unwrap_or_default(),
            })
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| anyhow!("GET {path} (Host {host}): no answer within 5s"))?
    }
}

/// Sends requests from pod a until told to stop, on [`Traffic::WORKERS`] connections at once,
/// each worker one request after another, recording who answered each and every failure. A
/// connection the peer closed between requests is replaced (clients do that); a request that was
/// sent and got no 200 is a failure.
struct Traffic {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    seen: Arc<std::sync::Mutex<Vec<Result<String, String>>>>,
}

impl Traffic {
    const WORKERS: usize = 4;

    fn start(from: PathBuf, to: SocketAddr, host: &'static str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let workers = (0..Self::WORKERS)
            .map(|_| {
                let (flag, log, from) = (stop.clone(), seen.clone(), from.clone());
                tokio::spawn(async move {
                    let mut connection: Option<Http1> = None;
                    while !flag.load(Ordering::Relaxed) {
                        let reusable = match connection.take() {
                            Some(mut http) => http.usable().await.then_some(http),
                            None => None,
                        };
                        let mut http = match reusable {
                            Some(http) => http,
                            None => match Http1::connect(&from, to).await {
                                Ok(http) => http,
                                Err(e) => {
                                    push(&log, Err(format!("connect: {e:#}")));
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                }
                            },
                        };
                        match http.get(host, "/").await {
                            Ok(answer) if answer.status == http::StatusCode::OK => {
                                push(&log, Ok(answer.served_by));
                                connection = Some(http);
                            }
                            Ok(answer) => push(&log, Err(format!("status {}", answer.status))),
                            Err(e) => push(&log, Err(format!("{e:#}"))),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            workers,
            seen,
        }
    }

    fn snapshot(&self) -> Vec<Result<String, String>> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until the last `n` outcomes all satisfy `pred`.
    async fn wait_for_last(
        &self,
        n: usize,
        what: &str,
        pred: impl Fn(&Result<String, String>) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let seen = self.snapshot();
            if seen.len() >= n && seen[seen.len() - n..].iter().all(&pred) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail: Vec<_> = seen.iter().rev().take(10).collect();
                bail!("traffic never reached: {what}; last outcomes (newest first): {tail:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the workers and returns every outcome, in the order they were recorded.
    async fn finish(mut self) -> anyhow::Result<Vec<Result<String, String>>> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in &mut self.workers {
            worker.await?;
        }
        Ok(self.snapshot())
    }
}

fn push(log: &std::sync::Mutex<Vec<Result<String, String>>>, outcome: Result<String, String>) {
    if let Ok(mut log) = log.lock() {
        log.push(outcome);
    }
}

fn count(outcomes: &[Result<String, String>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        let key = match outcome {
            Ok(who) => who.clone(),
            Err(_) => "FAILED".to_owned(),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Every state of the mesh YAML the tests serve is valid (no root needed).
#[test]
fn the_test_mesh_is_valid_in_every_state() -> anyhow::Result<()> {
    let ips = [
        Ipv4Addr::new(10, 250, 0, 2),
        Ipv4Addr::new(10, 250, 0, 3),
        Ipv4Addr::new(10, 250, 0, 4),
    ];
    for (weights, with_c) in [((100, 0), true), ((0, 100), true), ((100, 0), false)] {
        let dir = tempfile::tempdir()?;
        write_atomically(dir.path(), "services.yaml", SERVICES)?;
        write_atomically(dir.path(), "split.yaml", &split_yaml(weights.0, weights.1))?;
        write_atomically(dir.path(), "workloads.yaml", &workloads(ips, with_c))?;
        let (model, _) = keel_control_plane::model::load_dir(dir.path())
            .map_err(|errors| anyhow!("weights {weights:?}, with c: {with_c}:\n{errors}"))?;
        assert_eq!(model.services.len(), 6);
        assert_eq!(model.workloads.len(), if with_c { 3 } else { 2 });
    }
    Ok(())
}

/// The harness itself, without a sidecar: pods reach each other over the bridge, VIP ranges
/// route via the gateway, the proxy uid is applied, and dropping removes every namespace, link
/// and process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_builds_pods_and_removes_everything() -> anyhow::Result<()> {
    skip_unless_root!();
    let net = TestNetwork::create()?;
    let suffix = net.suffix().to_owned();
    let uplink = net.uplink().to_owned();
    let x = net.add_pod("x", net.host(2))?;
    let y = net.add_pod("y", net.host(3))?;

    let listener = netns::listen(&x, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9000)))?;
    let server = Task(tokio::spawn(serve_echo(listener)));
    let mut stream = netns::connect(&y, SocketAddr::from((x.ip(), 9000))).await?;
    stream.write_all(b"over the bridge").await?;
    let mut echoed = [0u8; 15];
    stream.read_exact(&mut echoed).await?;
    assert_eq!(&echoed, b"over the bridge");
    drop(server);

    let route = y.exec(["ip", "-4", "route", "get", "10.96.0.20"])?;
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains(&format!("via {}", net.gateway())),
        "VIPs must route via the gateway: {route}"
    );
    let id = x.proxy_command("id").args(["-u"]).output()?;
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "1337");

    let mut sleeper = x.spawn("sleeper", ["sleep", "600"])?;
    let pid = sleeper.pid();
    assert!(sleeper.exited().is_none());
    let orphan = y.spawn("orphan", ["sleep", "600"])?;
    let orphan_pid = orphan.pid();
    std::mem::forget(orphan);
    drop(sleeper);
    drop((x, y));
    drop(net);

    let namespaces = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )
    .into_owned();
    assert!(
        !namespaces.contains(&format!("keel-{suffix}-")),
        "namespaces left behind: {namespaces}"
    );
    assert!(!Path::new("/sys/class/net").join(&uplink).exists());
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false)
    };
    assert!(!alive(pid), "the guarded process survived");
    assert!(
        !alive(orphan_pid),
        "a process left in a pod survived its namespace"
    );
    Ok(())
}

/// curl in pod a reaches `web` by VIP, by a hostname it resolved to the VIP, and by a short Host
/// header; both sidecars count it, and b's or c's sidecar tells the app who called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_service_by_vip_and_by_host() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let (ip_a, ip_b, ip_c) = fx.ips();
    let before = fx.metrics().await?;
    let vip_url = format!("http://{WEB_VIP}/");
    let resolve = format!("{WEB_HOST}:80:{WEB_VIP}");
    let host_url = format!("http://{WEB_HOST}/");
    let cases: [Vec<&str>; 3] = [
        vec![&vip_url],
        vec!["--resolve", &resolve, &host_url],
        vec!["-H", "Host: web", &vip_url],
    ];
    for case in &cases {
        let mut argv = vec!["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"];
        argv.extend(case.iter().copied());
        let output = fx.a.exec(&argv)?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        ensure!(
            output.status.success() && code == "200",
            "curl {case:?} failed ({}): {code} {body} {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            fx.logs()
        );
        let body: serde_json::Value = serde_json::from_str(body)?;
        let served_by = body["served_by"].as_str().unwrap_or("");
        assert!(
            served_by == "b" || served_by == "c",
            "curl {case:?}: {body}"
        );
        let xff = body["xff"].as_str().unwrap_or("");
        assert!(
            xff.contains(&ip_a.to_string()),
            "the inbound sidecar must add x-forwarded-for: {ip_a}; the app saw {xff:?}"
        );
    }
    eventually(&fx, |[a, b, c]| {
        let out = grew(
            &before[0],
            a,
            "keel_requests_total",
            &[("direction", "outbound"), ("service", "e2e/web")],
        );
        let conns = grew(
            &before[0],
            a,
            "keel_tcp_connections_opened_total",
            &[("direction", "outbound"), ("protocol", "http1")],
        );
        let inb = grew(
            &before[1],
            b,
            "keel_requests_total",
            &[("direction", "inbound")],
        ) + grew(
            &before[2],
            c,
            "keel_requests_total",
            &[("direction", "inbound")],
        );
        if out >= 3.0 && conns >= 3.0 && inb >= 3.0 {
            Ok(())
        } else {
            Err(format!(
                "3 curls: a's outbound requests grew {out}, its http1 connections {conns}, \
                 b's and c's inbound requests {inb} ({ip_b}, {ip_c})"
            ))
        }
    })
    .await
}

/// A hyper HTTP/1.1 client on one kept-alive connection: ROUND_ROBIN spreads its requests
/// evenly over b and c, and every sidecar's counters agree with what the client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_requests_are_balanced_round_robin() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let (_, ip_b, ip_c) = fx.ips();
    let before = fx.metrics().await?;
    let mut http = Http1::connect(&fx.a.netns_path(), SocketAddr::from((WEB_VIP, 80))).await?;
    const N: usize = 40;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..N {
        let answer = http.get(WEB_HOST, "/").await?;
        ensure!(
            answer.status == http::StatusCode::OK,
            "{answer:?}\n{}",
            fx.logs()
        );
        assert_eq!(
            answer.body["host"], WEB_HOST,
            "the sidecars must pass the Host header on unchanged"
        );
        *counts.entry(answer.served_by).or_insert(0) += 1;
    }
    let (b, c) = (
        counts.get("b").copied().unwrap_or(0),
        counts.get("c").copied().unwrap_or(0),
    );
    assert_eq!(b + c, N, "answers from elsewhere: {counts:?}");
    // Round robin alternates; allow for the balancer starting anywhere and for a picker that
    // skips once.
    assert!(
        b.abs_diff(c) <= N / 5,
        "ROUND_ROBIN must spread requests evenly: {counts:?}"
    );
    eventually(&fx, |[a, mb, mc]| {
        let to_b = grew(
            &before[0],
            a,
            "keel_requests_total",
            &[
                ("direction", "outbound"),
                ("service", "e2e/web"),
                ("endpoint", &format!("{ip_b}:{WEB_PORT}")),
            ],
        );
        let to_c = grew(
            &before[0],
            a,
            "keel_requests_total",
            &[
                ("direction", "outbound"),
                ("service", "e2e/web"),
                ("endpoint", &format!("{ip_c}:{WEB_PORT}")),
            ],
        );
        let into_b = grew(
            &before[1],
            mb,
            "keel_requests_total",
            &[("direction", "inbound")],
        );
        let into_c = grew(
            &before[2],
            mc,
            "keel_requests_total",
            &[("direction", "inbound")],
        );
        let expected = (b as f64, c as f64);
        if (to_b, to_c) == expected && into_b >= expected.0 && into_c >= expected.1 {
            Ok(())
        } else {
            Err(format!(
                "client saw b={b} c={c}; a's outbound counted b={to_b} c={to_c}; inbound \
                 b={into_b} c={into_c}"
            ))
        }
    })
    .await
}

/// A tonic client streams through the mesh: each message comes back on the same stream, each
/// stream is one request that ROUND_ROBIN places, and the connection is HTTP/2 on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_go_through_the_mesh() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let before = fx.metrics().await?;
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
    const STREAMS: usize = 6;
    const MESSAGES: usize = 5;
    let mut servers: BTreeMap<String, usize> = BTreeMap::new();
    for s in 0..STREAMS {
        let (tx, rx) = tokio::sync::mpsc::channel(MESSAGES);
        let mut responses = tokio::time::timeout(
            Duration::from_secs(5),
            client.stream(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| anyhow!("opening stream {s}: timed out\n{}", fx.logs()))??
        .into_inner();
        let mut server = None;
        for m in 0..MESSAGES {
            let nonce = format!("{s}-{m}");
            tx.send(DiscoveryRequest {
                type_url: "keel.test/echo".to_owned(),
                response_nonce: nonce.clone(),
                ..Default::default()
            })
            .await?;
            let response = tokio::time::timeout(Duration::from_secs(5), responses.message())
                .await
                .map_err(|_| anyhow!("stream {s}, message {m}: no echo within 5s"))??
                .with_context(|| format!("stream {s} ended early"))?;
            assert_eq!(response.nonce, nonce);
            assert_eq!(response.type_url, "keel.test/echo");
            // One stream, one backend: every message of it comes back from the same server.
            let by = server.get_or_insert_with(|| response.system_version.clone());
            assert_eq!(*by, response.system_version, "a stream changed servers");
        }
        drop(tx);
        ensure!(
            tokio::time::timeout(Duration::from_secs(5), responses.message())
                .await
                .map_err(|_| anyhow!("stream {s} did not end after the client closed"))??
                .is_none(),
            "stream {s} sent more than it was asked"
        );
        *servers.entry(server.unwrap_or_default()).or_insert(0) += 1;
    }
    assert_eq!(
        servers.keys().cloned().collect::<Vec<_>>(),
        vec!["b".to_owned(), "c".to_owned()],
        "ROUND_ROBIN must place streams on both endpoints: {servers:?}"
    );
    eventually(&fx, |[a, b, c]| {
        let h2 = grew(
            &before[0],
            a,
            "keel_tcp_connections_opened_total",
            &[("direction", "outbound"), ("protocol", "http2")],
        );
        let out = grew(
            &before[0],
            a,
            "keel_requests_total",
            &[("direction", "outbound"), ("service", "e2e/grpc")],
        );
        let inb = grew(
            &before[1],
            b,
            "keel_requests_total",
            &[("direction", "inbound")],
        ) + grew(
            &before[2],
            c,
            "keel_requests_total",
            &[("direction", "inbound")],
        );
        if h2 >= 1.0 && out >= STREAMS as f64 && inb >= STREAMS as f64 {
            Ok(())
        } else {
            Err(format!(
                "{STREAMS} streams: a's outbound http2 connections grew {h2}, its grpc requests \
                 {out}, b's and c's inbound requests {inb}"
            ))
        }
    })
    .await
}

/// A raw TCP client reaches a TCP-protocol service: bytes both ways, a large payload, and a
/// half-close that the proxies pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_is_proxied_both_ways() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let before = fx.metrics().await?;
    let mut stream = netns::connect(&fx.a, SocketAddr::from((ECHO_VIP, ECHO_PORT))).await?;
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(b"hello keel\n").await?;
        write.write_all(&payload).await?;
        // Half-close: the echo server sees EOF and closes after echoing everything.
        write.shutdown().await?;
        anyhow::Ok(())
    };
    let receive = async {
        let mut echoed = Vec::new();
        read.read_to_end(&mut echoed).await?;
        anyhow::Ok(echoed)
    };
    let (sent, echoed) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(send, receive)
    })
    .await
    .map_err(|_| anyhow!("the echo did not complete within 10s\n{}", fx.logs()))?;
    sent?;
    let echoed = echoed?;
    ensure!(
        echoed.len() == 11 + payload.len(),
        "echoed {} of {} bytes\n{}",
        echoed.len(),
        11 + payload.len(),
        fx.logs()
    );
    assert_eq!(&echoed[..11], b"hello keel\n");
    assert!(echoed[11..] == payload[..], "the payload came back changed");
    eventually(&fx, |[a, b, _]| {
        let out = grew(
            &before[0],
            a,
            "keel_tcp_connections_opened_total",
            &[("direction", "outbound"), ("protocol", "tcp")],
        );
        let inb = grew(
            &before[1],
            b,
            "keel_tcp_connections_opened_total",
            &[("direction", "inbound")],
        );
        if out >= 1.0 && inb >= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "a's outbound tcp connections grew {out}, b's inbound connections {inb}"
            ))
        }
    })
    .await
}

/// Removing endpoint c from the YAML while requests flow moves them all to b, and not one
/// request fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_reroutes_live_traffic_without_errors() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let traffic = Traffic::start(fx.a.netns_path(), SocketAddr::from((WEB_VIP, 80)), WEB_HOST);
    traffic
        .wait_for_last(20, "both endpoints answering", |o| o.is_ok())
        .await?;
    let warm = count(&traffic.snapshot());
    ensure!(
        warm.contains_key("b") && warm.contains_key("c"),
        "before the change both endpoints must answer: {warm:?}"
    );
    let (a, b, c) = fx.ips();
    write_atomically(
        fx.dir.path(),
        "workloads.yaml",
        &workloads([a, b, c], false),
    )?;
    let changed_at = traffic.snapshot().len();
    let converged = traffic
        .wait_for_last(30, "every request answered by b", |o| {
            o.as_ref().is_ok_and(|who| who == "b")
        })
        .await;
    let outcomes = traffic.finish().await?;
    converged.map_err(|e| anyhow!("{e}\n{}", fx.logs()))?;
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed around the change: {:?}\n{}",
        failures.len(),
        outcomes.len(),
        failures.iter().take(5).collect::<Vec<_>>(),
        fx.logs()
    );
    eprintln!(
        "before the change: {:?}; after: {:?}",
        count(&outcomes[..changed_at]),
        count(&outcomes[changed_at..])
    );
    Ok(())
}

/// Shifting a route's weights from b to c while requests flow moves them all to c, and not one
/// request fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifting_route_weights_reroutes_live_traffic_without_errors() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start().await?;
    let traffic = Traffic::start(
        fx.a.netns_path(),
        SocketAddr::from((SPLIT_VIP, 80)),
        "split.e2e.svc.cluster.local",
    );
    traffic
        .wait_for_last(20, "every request answered by b (weights 100/0)", |o| {
            o.as_ref().is_ok_and(|who| who == "b")
        })
        .await
        .map_err(|e| anyhow!("{e}\n{}", fx.logs()))?;
    write_atomically(fx.dir.path(), "split.yaml", &split_yaml(0, 100))?;
    let changed_at = traffic.snapshot().len();
    let converged = traffic
        .wait_for_last(30, "every request answered by c (weights 0/100)", |o| {
            o.as_ref().is_ok_and(|who| who == "c")
        })
        .await;
    let outcomes = traffic.finish().await?;
    converged.map_err(|e| anyhow!("{e}\n{}", fx.logs()))?;
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed around the change: {:?}\n{}",
        failures.len(),
        outcomes.len(),
        failures.iter().take(5).collect::<Vec<_>>(),
        fx.logs()
    );
    eprintln!(
        "before the change: {:?}; after: {:?}",
        count(&outcomes[..changed_at]),
        count(&outcomes[changed_at..])
    );
    Ok(())
}

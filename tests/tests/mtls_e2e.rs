//! mTLS between sidecars, end to end on a real kernel: pods (network namespaces) with real
//! sidecars certified by the control plane's CA, whose root this test made and imported, so it
//! can also mint the certificates an attacker would present.
//!
//! - pod `a` is the client, with a sidecar;
//! - pods `b` (STRICT) and `c` (PERMISSIVE) run sidecars and an HTTP server that answers with
//!   the pod's name and the `keel-client-id` its sidecar passed on;
//! - pod `d` is declared meshed but runs no sidecar: a TLS server of this test's stands there,
//!   presenting whichever certificate the test chooses, to check the outbound side's identity
//!   check.
//!
//! Without root (or ip, iptables, setpriv) each test prints `SKIP: <reason>` and passes.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_control_plane::identity::CaStorage;
use keel_control_plane::server::{IdentityConfig, ProofKind};
use keel_control_plane::{ControlPlane, ControlPlaneConfig};
use keel_proto::spiffe::SpiffeId;
use keel_proxy::tls::verify::PeerVerifier;
use keel_tests::capture::{self, Capture};
use keel_tests::netns::{self, MeshedPod, Task, TestNetwork};
use keel_tests::skip_unless_root;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const NS: &str = "mt";
const TRUST_DOMAIN: &str = "mtls.local";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WEB_C_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const DEE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 33);
const WEB_B_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 34);
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 35);
const APP_PORT: u16 = 8080;
/// The opaque TCP echo service of b and c.
const ECHO_PORT: u16 = 9000;
/// Generous bounds: a test fails because something never happens, not because the machine is
/// slow.
const READY: Duration = Duration::from_secs(30);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, NS, sa).expect("identity")
}

// ---------------------------------------------------------------------------------------------
// Certificates the test makes itself

/// A CA of the test's: the mesh's imported root, or a stranger's.
struct TestCa {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("root");
        let key_pem = key.serialize_pem();
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
            key_pem,
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A leaf with `sans`, valid from `from` to `until`.
    fn leaf(&self, sans: Vec<SanType>, from: SystemTime, until: SystemTime) -> CertifiedKey {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = from.into();
        params.not_after = until.into();
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&pkcs8).expect("key");
        CertifiedKey::new(vec![cert.der().clone()], signing)
    }

    /// A valid leaf for `identity`.
    fn svid(&self, identity: &str) -> CertifiedKey {
        let now = SystemTime::now();
        self.leaf(
            vec![uri(identity)],
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri"))
}

// ---------------------------------------------------------------------------------------------
// The mesh

fn yaml(ips: &[Ipv4Addr; 5]) -> String {
    let [a, b, c, d, e] = ips;
    format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: {TRUST_DOMAIN}}}
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
metadata: {{name: web-c, namespace: {NS}}}
spec:
  vips: [{WEB_C_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: web, instance: c}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: web-b, namespace: {NS}}}
spec:
  vips: [{WEB_B_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: web, instance: b}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: dee, namespace: {NS}}}
spec:
  vips: [{DEE_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: dee}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: plain, namespace: {NS}}}
spec:
  vips: [{PLAIN_VIP}]
  ports: [{{name: http, port: 80, targetPort: {APP_PORT}, protocol: HTTP}}]
  selector: {{app: plain}}
---
apiVersion: keel.dev/v1alpha1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec:
  vips: [{ECHO_VIP}]
  ports: [{{name: tcp, port: {ECHO_PORT}, targetPort: {ECHO_PORT}, protocol: TCP}}]
  selector: {{app: web}}
---
apiVersion: keel.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: web, namespace: {NS}}}
spec:
  targetRef: {{service: web}}
  loadBalancer: {{policy: ROUND_ROBIN}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: a, namespace: {NS}, labels: {{app: client}}}}
spec: {{serviceAccount: a, addresses: [{a}]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: b, namespace: {NS}, labels: {{app: web, instance: b}}}}
spec: {{serviceAccount: b, addresses: [{b}], mtlsMode: STRICT}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: c, namespace: {NS}, labels: {{app: web, instance: c}}}}
spec: {{serviceAccount: c, addresses: [{c}]}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: d, namespace: {NS}, labels: {{app: dee}}}}
spec: {{serviceAccount: d, addresses: [{d}], meshed: true}}
---
apiVersion: keel.dev/v1alpha1
kind: Workload
metadata: {{name: e, namespace: {NS}, labels: {{app: plain}}}}
spec: {{serviceAccount: e, addresses: [{e}], meshed: false}}
"
    )
}

/// Fields drop in order: servers, pods, control plane, files, network.
struct Fixture {
    _servers: Vec<Task>,
    a: MeshedPod,
    b: MeshedPod,
    c: MeshedPod,
    _d: keel_control_plane::demo::netns::Pod,
    /// A pod without a sidecar, outside mTLS.
    e: keel_control_plane::demo::netns::Pod,
    /// The certificate d's server presents; bumping the generation closes its connections.
    d_cert: Arc<Mutex<Arc<CertifiedKey>>>,
    d_generation: tokio::sync::watch::Sender<u64>,
    control_plane: ControlPlane,
    root: TestCa,
    dir: tempfile::TempDir,
    ips: [Ipv4Addr; 5],
    _net: TestNetwork,
}

/// What the control plane's directory holds while the mesh is withheld: not a valid resource.
const WITHHELD: &str = "apiVersion: keel.dev/v1alpha1\nkind: NotAKind\nmetadata: {name: x}\n";

impl Fixture {
    async fn start(workload_ttl: Duration) -> anyhow::Result<Fixture> {
        let mut fx = Fixture::launch(workload_ttl, false).await?;
        fx.wait_ready().await?;
        Ok(fx)
    }

    /// Starts everything; with `withhold`, the control plane's directory holds an invalid file
    /// instead of the mesh, so it has no valid model and sends the sidecars nothing (and signs
    /// them no certificate) until [`Fixture::release_config`]. Does not wait for the sidecars.
    async fn launch(workload_ttl: Duration, withhold: bool) -> anyhow::Result<Fixture> {
        let net = TestNetwork::create()?;
        let ips = [
            net.host(2),
            net.host(3),
            net.host(4),
            net.host(5),
            net.host(6),
        ];
        let dir = tempfile::tempdir()?;
        let root = TestCa::new("mtls test mesh root");
        let (cert_path, key_path) = (dir.path().join("root.pem"), dir.path().join("root-key.pem"));
        std::fs::write(&cert_path, root.cert.pem())?;
        std::fs::write(&key_path, &root.key_pem)?;
        let mesh = dir.path().join("mesh");
        std::fs::create_dir(&mesh)?;
        if withhold {
            std::fs::write(mesh.join("mesh.yaml"), WITHHELD)?;
        } else {
            std::fs::write(mesh.join("mesh.yaml"), yaml(&ips))?;
        }
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            config_dir: mesh,
            discovery_addr: SocketAddr::from((net.gateway(), 0)),
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            identity: Some(IdentityConfig {
                storage: CaStorage::Directory {
                    dir: dir.path().join("ca"),
                    import: Some((cert_path, key_path)),
                },
                workload_ttl,
                secure_addr: SocketAddr::from((net.gateway(), 0)),
                extra_names: Vec::new(),
                proof: ProofKind::BootstrapToken,
            }),
        })
        .await?;
        let pods = net.add_certified_pods(
            &control_plane,
            TRUST_DOMAIN,
            NS,
            &[("a", ips[0]), ("b", ips[1]), ("c", ips[2])],
            "zone-a",
            "info,keel_proxy=debug",
        )?;
        let [a, b, c]: [MeshedPod; 3] = pods.try_into().map_err(|_| anyhow!("three pods"))?;
        let d = net.add_pod("d", ips[3])?;
        let e = net.add_pod("e", ips[4])?;
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, APP_PORT));
        let echo = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_PORT));
        let mut servers = vec![
            Task(tokio::spawn(serve_app(netns::listen(&b, any)?, "b"))),
            Task(tokio::spawn(serve_app(netns::listen(&c, any)?, "c"))),
            Task(tokio::spawn(serve_app(netns::listen(&e, any)?, "e"))),
            Task(tokio::spawn(serve_echo(netns::listen(&b, echo)?, "b"))),
            Task(tokio::spawn(serve_echo(netns::listen(&c, echo)?, "c"))),
        ];
        let d_cert = Arc::new(Mutex::new(Arc::new(root.svid(&id("d").to_string()))));
        let d_generation = tokio::sync::watch::Sender::new(0);
        servers.push(Task(tokio::spawn(serve_fake_sidecar(
            netns::listen(&d, any)?,
            d_cert.clone(),
            d_generation.subscribe(),
        ))));
        Ok(Fixture {
            _servers: servers,
            a,
            b,
            c,
            _d: d,
            e,
            d_cert,
            d_generation,
            control_plane,
            root,
            dir,
            ips,
            _net: net,
        })
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        for pod in [&mut self.a, &mut self.b, &mut self.c] {
            pod.wait_ready(READY).await?;
        }
        Ok(())
    }

    /// Gives the control plane the mesh it was withheld, and waits for the sidecars.
    async fn release_config(&mut self) -> anyhow::Result<()> {
        std::fs::write(
            self.dir.path().join("mesh").join("mesh.yaml"),
            yaml(&self.ips),
        )?;
        self.wait_ready().await
    }

    fn logs(&self) -> String {
        format!("{}{}{}", self.a.logs(), self.b.logs(), self.c.logs())
    }
}

/// The app in b and c: answers `pod=<name> client=<keel-client-id or -> path=<path>`.
async fn serve_app(listener: tokio::net::TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
                    let client = req
                        .headers()
                        .get("keel-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let path = req.uri().path().to_owned();
                    // Read the body, so it crosses both hops.
                    let _ = req.into_body().collect().await;
                    let body = format!("pod={name} client={client} path={path}");
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The echo service in b and c: reads one line and answers `pod=<name> <line>`, then closes.
async fn serve_echo(listener: tokio::net::TcpListener, name: &'static str) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_ok() {
                let _ = stream
                    .get_mut()
                    .write_all(format!("pod={name} {line}").as_bytes())
                    .await;
                let _ = stream.get_mut().shutdown().await;
            }
        });
    }
}

/// One exchange with the echo service from pod `from`, through its sidecar: a new TCP
/// connection, so a new mTLS connection between the sidecars. Returns who answered.
async fn echo_from(from: &Path, marker: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = netns::connect_from(from, SocketAddr::from((ECHO_VIP, ECHO_PORT))).await?;
        stream.write_all(format!("{marker}\n").as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("no echo within 10s"))??;
    let pod = answer
        .strip_suffix(&format!(" {marker}\n"))
        .and_then(|head| head.strip_prefix("pod="))
        .ok_or_else(|| anyhow!("the echo answered {answer:?}, not the marker"))?;
    Ok(pod.to_owned())
}

/// What stands in pod d: TLS 1.3 with a certificate of the test's choosing, HTTP/2 inside,
/// answering `pod=d`. It accepts any client certificate (it is not what is under test). When
/// `generation` changes, open connections are closed, so the next request handshakes anew.
async fn serve_fake_sidecar(
    listener: tokio::net::TcpListener,
    cert: Arc<Mutex<Arc<CertifiedKey>>>,
    generation: tokio::sync::watch::Receiver<u64>,
) {
    #[derive(Debug)]
    struct Current(Arc<Mutex<Arc<CertifiedKey>>>);
    impl rustls::server::ResolvesServerCert for Current {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.lock().expect("cert").clone())
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Current(cert)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let mut generation = generation.clone();
        generation.mark_unchanged();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(|_req: http::Request<Incoming>| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("pod=d"))))
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = conn => {}
                _ = generation.changed() => {}
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn read_answer(response: http::Response<Incoming>) -> anyhow::Result<Answer> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// An HTTP/1.1 request from inside pod `from` (through its sidecar, if it has one).
async fn request_from(
    from: &Path,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Answer> {
    let stream = netns::connect_from(from, to).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(path)
        .header("host", to.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(req.body(Full::new(Bytes::from(body.to_owned())))?),
    )
    .await
    .map_err(|_| anyhow!("no answer within 10s"))??;
    read_answer(response).await
}

/// A plaintext HTTP/1.1 request from the host (no sidecar on this side).
async fn plaintext_from_host(to: SocketAddr, path: &str) -> anyhow::Result<Answer> {
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", to.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| anyhow!("no answer within 10s"))??;
    read_answer(response).await
}

/// An HTTP/2 request over mTLS from the host, as a sidecar would send it, presenting
/// `client_cert` (or none) and expecting the server to prove `server` chained to `roots`.
async fn mtls_from_host(
    to: SocketAddr,
    server: &SpiffeId,
    roots: &[CertificateDer<'static>],
    client_cert: Option<Arc<CertifiedKey>>,
) -> anyhow::Result<Answer> {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Fixed {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let verifier = PeerVerifier::new(Arc::new(store), Arc::new(server.clone()), &provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(Fixed(cert))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    let name = ServerName::try_from(server.server_name())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{to}/host-mtls")).body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| anyhow!("no answer within 10s"))?
        .context("the request")?;
    read_answer(response).await
}

/// Raw bytes from the host to `to`: what comes back before the connection ends (nothing when
/// the peer closes or resets it at once).
async fn raw_from_host(to: SocketAddr, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(to).await?;
        stream.write_all(bytes).await?;
        let mut answer = Vec::new();
        // A reset after some bytes still returns what arrived.
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return anyhow::Ok(answer),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("no end to the raw exchange within 10s"))?
}

/// A TLS client that is not mesh mTLS, as an application with its own PKI would be: it names
/// another server (`web-b.mt.svc`), offers HTTP/1.1, trusts `roots` and presents `client_cert`.
/// Succeeds only if a TLS session is established.
async fn foreign_tls_from_host(
    to: SocketAddr,
    roots: &[CertificateDer<'static>],
    client_cert: Arc<CertifiedKey>,
) -> anyhow::Result<()> {
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Fixed {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_client_cert_resolver(Arc::new(Fixed(client_cert)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(to).await?;
    let name = ServerName::try_from("web-b.mt.svc")?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake timed out"))??;
    Ok(())
}

/// The client half of a TLS handshake with the sidecar at `to`: succeeds when its certificate
/// names `server` and chains to `roots` (the server refusing this certificate-less client comes
/// after, and is not looked at).
async fn tls_handshake(
    to: SocketAddr,
    server: &SpiffeId,
    roots: &[CertificateDer<'static>],
) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    let verifier = PeerVerifier::new(Arc::new(store), Arc::new(server.clone()), &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(to).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server.server_name())?, tcp)
        .await?;
    Ok(())
}

fn app(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, APP_PORT))
}

fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 80))
}

/// A value that appears nowhere else: a capture containing it saw this request in the clear.
fn marker(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{what}-{nanos:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn no_plaintext_crosses_the_wire_between_sidecars() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let capture = Capture::start(&fx.c, "eth0")?;

    // Positive control: plaintext from the host to c (PERMISSIVE) is visible on c's veth.
    let visible = marker("visible");
    let answer = plaintext_from_host(app(fx.c.ip()), &format!("/{visible}")).await?;
    ensure!(answer.status == 200, "plaintext to c: {}", answer.status);

    // The mesh: a -> a's sidecar -> c's sidecar -> c, with the marker in the path, a header and
    // the body.
    let secret = marker("secret");
    let answer = request_from(
        &fx.a.netns_path(),
        vip(WEB_C_VIP),
        &format!("/{secret}"),
        &[("x-secret", &secret)],
        &secret,
    )
    .await?;
    ensure!(
        answer.status == 200 && answer.body.contains("pod=c"),
        "a -> web-c: {} {}\n{}",
        answer.status,
        answer.body,
        fx.logs()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frames = capture.finish()?;
    ensure!(
        capture::contains(&frames, visible.as_bytes()),
        "the capture did not see the plaintext control request: it captures nothing"
    );
    ensure!(
        !capture::contains(&frames, secret.as_bytes()),
        "the mesh request crossed c's veth in the clear"
    );
    // TLS 1.3 application data records did cross it.
    ensure!(
        capture::contains(&frames, &[0x17, 0x03, 0x03]),
        "no TLS records seen on c's veth"
    );
    let metrics = fx.c.metrics().await?;
    ensure!(
        metrics.sum(
            "keel_tcp_connections_opened_total",
            &[("direction", "inbound"), ("protocol", "mtls")]
        ) >= 1.0,
        "c's sidecar counted no mTLS connection"
    );
    Ok(())
}

#[tokio::test]
async fn the_app_sees_the_verified_peer_identity() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    for _ in 0..4 {
        // A client cannot claim an identity: the header it sends is replaced.
        let answer = request_from(
            &fx.a.netns_path(),
            vip(WEB_VIP),
            "/who",
            &[(
                "keel-client-id",
                "spiffe://evil.example/ns/kube-system/sa/admin",
            )],
            "",
        )
        .await?;
        ensure!(
            answer.status == 200,
            "a -> web: {}\n{}",
            answer.status,
            fx.logs()
        );
        ensure!(
            answer.body.contains(&format!("client={}", id("a"))),
            "the app saw {:?}, not a's identity",
            answer.body
        );
    }
    // The inbound sidecars count the requests by the verified client identity.
    let client = id("a").to_string();
    let counted: f64 = [&fx.b, &fx.c]
        .into_iter()
        .map(|pod| async move { pod.metrics().await })
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .map(|m| {
            m.map(|m| {
                m.sum(
                    "keel_requests_total",
                    &[("direction", "inbound"), ("client_id", client.as_str())],
                )
            })
        })
        .sum::<anyhow::Result<f64>>()?;
    ensure!(
        counted >= 4.0,
        "b and c counted {counted} requests from {client}"
    );
    Ok(())
}

#[tokio::test]
async fn strict_refuses_plaintext_strangers_expired_and_wrong_identities() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let b = app(fx.b.ip());
    let roots = [fx.root.der()];
    let before = fx.b.metrics().await?;

    // The positive control: a well-formed mesh certificate is accepted and its identity seen.
    let tester = id("tester");
    let answer = mtls_from_host(
        b,
        &id("b"),
        &roots,
        Some(Arc::new(fx.root.svid(&tester.to_string()))),
    )
    .await
    .with_context(|| fx.logs())?;
    ensure!(
        answer.status == 200 && answer.body.contains(&format!("client={tester}")),
        "a valid certificate: {} {}",
        answer.status,
        answer.body
    );

    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let stranger = TestCa::new("someone else's root");
    let refused: Vec<(&str, Option<CertifiedKey>)> = vec![
        ("no client certificate", None),
        ("another CA", Some(stranger.svid(&tester.to_string()))),
        (
            "an expired certificate",
            Some(
                fx.root
                    .leaf(vec![uri(&tester.to_string())], now - 2 * hour, now - hour),
            ),
        ),
        (
            "a certificate not yet valid",
            Some(
                fx.root
                    .leaf(vec![uri(&tester.to_string())], now + hour, now + 2 * hour),
            ),
        ),
        (
            "another trust domain",
            Some(fx.root.svid("spiffe://evil.local/ns/mt/sa/tester")),
        ),
        (
            "two URI SANs",
            Some(fx.root.leaf(
                vec![uri(&tester.to_string()), uri(&id("other").to_string())],
                now - hour,
                now + hour,
            )),
        ),
        (
            "no SPIFFE ID",
            Some(fx.root.leaf(
                vec![SanType::DnsName("b.mt.svc".try_into()?)],
                now - hour,
                now + hour,
            )),
        ),
        (
            "a SPIFFE ID that is not a workload",
            Some(fx.root.svid("spiffe://mtls.local/admin")),
        ),
    ];
    let count = refused.len();
    for (what, cert) in refused {
        match mtls_from_host(b, &id("b"), &roots, cert.map(Arc::new)).await {
            Ok(answer) => bail!("{what} was accepted: {} {}", answer.status, answer.body),
            Err(e) => eprintln!("{what}: refused ({e:#})"),
        }
    }
    // Plaintext under STRICT: HTTP, and raw bytes that are no protocol the proxy knows. The
    // same bytes reach c's app (PERMISSIVE), which answers them, so a silent close is b's
    // refusal and not the app's.
    ensure!(
        plaintext_from_host(b, "/plain").await.is_err(),
        "plaintext HTTP was accepted under STRICT"
    );
    let raw = b"\x00\x01 keel raw bytes\r\n\r\n";
    let from_c = raw_from_host(app(fx.c.ip()), raw).await?;
    ensure!(
        !from_c.is_empty(),
        "c (PERMISSIVE) did not pass raw bytes to its app"
    );
    let from_b = raw_from_host(b, raw).await.unwrap_or_default();
    ensure!(
        from_b.is_empty(),
        "raw plaintext reached b's app under STRICT: {:?}",
        String::from_utf8_lossy(&from_b)
    );
    // TLS that is not mesh mTLS (another server name, a certificate from another CA): the
    // application's own TLS, which STRICT refuses too.
    ensure!(
        foreign_tls_from_host(
            b,
            &[stranger.der()],
            Arc::new(stranger.svid(&tester.to_string()))
        )
        .await
        .is_err(),
        "foreign TLS was accepted under STRICT"
    );

    let after = fx.b.metrics().await?;
    let grew = |reason: &str| {
        let f = [("reason", reason)];
        after.sum("keel_inbound_refused_connections_total", &f)
            - before.sum("keel_inbound_refused_connections_total", &f)
    };
    ensure!(
        grew("handshake") >= count as f64,
        "b counted {} refused handshakes, not {count}",
        grew("handshake")
    );
    ensure!(
        grew("plaintext") >= 2.0,
        "b counted {} plaintext refusals, not 2 (HTTP and raw)",
        grew("plaintext")
    );
    ensure!(
        grew("foreign_tls") >= 1.0,
        "b counted no refusal of foreign TLS"
    );

    // The mesh itself still reaches b.
    let answer = request_from(&fx.a.netns_path(), vip(WEB_VIP), "/", &[], "").await?;
    ensure!(
        answer.status == 200,
        "a -> web after the attempts: {}",
        answer.status
    );
    Ok(())
}

/// Waits until the sidecar's admin server answers `/live`: its listeners are bound by then.
async fn wait_live(pod: &MeshedPod) -> anyhow::Result<()> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{}/live", pod.admin()).parse()?;
    let deadline = Instant::now() + READY;
    loop {
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(2), client.get(uri.clone())).await
            && response.status() == http::StatusCode::OK
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the sidecar of {} never went live\n{}",
            pod.name(),
            pod.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn nothing_is_let_in_before_the_first_configuration() -> anyhow::Result<()> {
    skip_unless_root!();
    let mut fx = Fixture::launch(Duration::from_secs(3600), true).await?;
    let refused = |m: &keel_tests::netns::Metrics, reason: &str| {
        m.sum(
            "keel_inbound_refused_connections_total",
            &[("reason", reason)],
        )
    };
    // b is to be STRICT and c PERMISSIVE, but their sidecars do not know it yet: the default
    // (PERMISSIVE) must not stand in for a configuration they have not received.
    for pod in [&fx.b, &fx.c] {
        wait_live(pod).await?;
        if let Ok(answer) = plaintext_from_host(app(pod.ip()), "/early").await {
            bail!(
                "{} let plaintext in before its first configuration: {} {}",
                pod.name(),
                answer.status,
                answer.body
            );
        }
        let metrics = pod.metrics().await?;
        ensure!(
            refused(&metrics, "unconfigured") >= 1.0,
            "{} did not count the refusal as unconfigured\n{}",
            pod.name(),
            pod.logs()
        );
    }

    fx.release_config().await?;
    let answer = plaintext_from_host(app(fx.c.ip()), "/later").await?;
    ensure!(
        answer.status == 200,
        "c (PERMISSIVE) refused plaintext once configured: {}",
        answer.status
    );
    ensure!(
        plaintext_from_host(app(fx.b.ip()), "/later").await.is_err(),
        "b (STRICT) accepted plaintext once configured"
    );
    ensure!(
        refused(&fx.b.metrics().await?, "plaintext") >= 1.0,
        "b did not count the plaintext refusal"
    );
    let answer = request_from(&fx.a.netns_path(), vip(WEB_B_VIP), "/mesh", &[], "").await?;
    ensure!(
        answer.status == 200 && answer.body.contains(&format!("client={}", id("a"))),
        "a -> web-b once configured: {} {}",
        answer.status,
        answer.body
    );
    Ok(())
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_mtls() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let answer = plaintext_from_host(app(fx.c.ip()), "/plain").await?;
    ensure!(
        answer.status == 200 && answer.body.contains("client=-"),
        "plaintext to c: {} {}",
        answer.status,
        answer.body
    );
    let answer = request_from(&fx.a.netns_path(), vip(WEB_C_VIP), "/mesh", &[], "").await?;
    ensure!(
        answer.status == 200 && answer.body.contains(&format!("client={}", id("a"))),
        "a -> web-c: {} {}",
        answer.status,
        answer.body
    );
    let tester = id("tester");
    let answer = mtls_from_host(
        app(fx.c.ip()),
        &id("c"),
        &[fx.root.der()],
        Some(Arc::new(fx.root.svid(&tester.to_string()))),
    )
    .await?;
    ensure!(answer.status == 200, "mTLS to c: {}", answer.status);
    Ok(())
}

#[tokio::test]
async fn an_endpoint_without_a_sidecar_is_reached_in_plaintext() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let capture = Capture::start(&fx.e, "eth0")?;
    let visible = marker("to-e");
    let answer = request_from(
        &fx.a.netns_path(),
        vip(PLAIN_VIP),
        &format!("/{visible}"),
        &[],
        "",
    )
    .await?;
    ensure!(
        answer.status == 200 && answer.body.contains("pod=e client=-"),
        "a -> plain: {} {}\n{}",
        answer.status,
        answer.body,
        fx.logs()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        capture::contains(&capture.finish()?, visible.as_bytes()),
        "the request to a workload without a sidecar was not plaintext HTTP/1.1"
    );
    Ok(())
}

#[tokio::test]
async fn the_outbound_side_refuses_a_peer_with_the_wrong_identity() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let from = fx.a.netns_path();
    let call = || request_from(&from, vip(DEE_VIP), "/", &[], "");

    // d presents the identity discovery promised: accepted.
    let answer = call().await?;
    ensure!(
        answer.status == 200 && answer.body == "pod=d",
        "d with its own identity: {} {}\n{}",
        answer.status,
        answer.body,
        fx.logs()
    );

    // A valid mesh certificate, but for another workload; then one from another CA.
    let stranger = TestCa::new("someone else's root");
    for (what, cert) in [
        (
            "another workload's identity",
            fx.root.svid(&id("mallory").to_string()),
        ),
        ("another CA", stranger.svid(&id("d").to_string())),
    ] {
        *fx.d_cert.lock().expect("cert") = Arc::new(cert);
        fx.d_generation.send_modify(|g| *g += 1);
        // The connection verified with d's own certificate is closing; once a's sidecar saw
        // that, every request needs a new handshake, and each must be refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refusals = 0;
        while refusals < 3 {
            let answer = call().await?;
            if answer.status.is_server_error() && answer.headers.contains_key("keel-error") {
                refusals += 1;
                continue;
            }
            ensure!(
                refusals == 0 && Instant::now() < deadline,
                "{what}: answered {} {:?} after {refusals} refusals\n{}",
                answer.status,
                answer.body,
                fx.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Polls `check` every 100 ms until it holds, for at most 15 s (a configuration change has to
/// reach the sidecars first).
async fn eventually<F, Fut>(what: &str, fx: &Fixture, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: never happened\n{}",
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn access_policies_are_enforced_on_the_verified_peer() -> anyhow::Result<()> {
    skip_unless_root!();
    let fx = Fixture::start(Duration::from_secs(3600)).await?;
    let policies = format!(
        "\
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: b-only-a, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{instance: b}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{TRUST_DOMAIN}/ns/{NS}/sa/a]}}}}]
    to: [{{operation: {{methods: [GET], paths: [/allowed*]}}}}]
---
apiVersion: keel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: c-no-plaintext, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{instance: c}}}}
  action: DENY
  rules:
  - from: [{{source: {{notPrincipals: [\"*\"]}}}}]
"
    );
    std::fs::write(fx.dir.path().join("mesh").join("policies.yaml"), policies)?;
    let from = fx.a.netns_path();
    let b = vip(WEB_B_VIP);
    // b: a may GET /allowed*, nothing else, and nobody else may do anything.
    eventually("the policy denying a's GET /other on b", &fx, || async {
        let answer = request_from(&from, b, "/other", &[], "").await?;
        Ok(answer.status == 403)
    })
    .await?;
    let answer = request_from(&from, b, "/other", &[], "").await?;
    ensure!(
        answer.headers.get("keel-error").map(|v| v.as_bytes()) == Some(b"forbidden"),
        "a 403 without keel-error: forbidden"
    );
    let answer = request_from(&from, b, "/allowed/1", &[], "").await?;
    ensure!(
        answer.status == 200,
        "a GET /allowed/1 on b: {}",
        answer.status
    );
    let answer = request_from(&from, b, "/allowed/1", &[], "posted").await?;
    ensure!(
        answer.status == 403,
        "a POST /allowed/1 on b: {}",
        answer.status
    );
    let tester = Arc::new(fx.root.svid(&id("tester").to_string()));
    let answer = mtls_from_host(app(fx.b.ip()), &id("b"), &[fx.root.der()], Some(tester)).await?;
    ensure!(
        answer.status == 403,
        "another identity on b: {}",
        answer.status
    );

    // c: plaintext (no identity) is denied, the mesh is not.
    let c = app(fx.c.ip());
    eventually("the policy denying plaintext on c", &fx, || async {
        Ok(plaintext_from_host(c, "/").await?.status == 403)
    })
    .await?;
    let answer = request_from(&from, vip(WEB_C_VIP), "/", &[], "").await?;
    ensure!(answer.status == 200, "a -> c over mTLS: {}", answer.status);
    let metrics = fx.b.metrics().await?;
    ensure!(
        metrics.sum(
            "keel_requests_total",
            &[
                ("direction", "inbound"),
                ("status", "403"),
                ("error", "forbidden")
            ]
        ) >= 3.0,
        "b did not count its denials"
    );
    Ok(())
}

/// Reads `GET /config` of a sidecar: its certificate state.
async fn certificate_of(pod: &MeshedPod) -> anyhow::Result<serde_json::Value> {
    certificate_at(pod.admin()).await
}

/// The certificate state of the sidecar whose admin server is at `admin`.
async fn certificate_at(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}/config").parse()?;
    let response = client.get(uri).await?;
    let body = response.into_body().collect().await?.to_bytes();
    let config: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(config["certificate"].clone())
}

/// A sidecar's certificate was replaced: the old one's expiry, the new one's, when the test
/// first saw the new one, and how many certificates the sidecar installed since the test last
/// looked (more than one if two came within one look).
struct Replacement {
    pod: String,
    old_until: SystemTime,
    new_until: SystemTime,
    seen: SystemTime,
    installed: u64,
}

/// Watches the sidecars' certificates (`/config`, every 100 ms) until `stop`, recording each
/// replacement. A replacement is told by the sidecar's count of installed certificates, not by
/// the expiry: that is kept in whole seconds, and a renewal for a new root can follow another
/// renewal within the same second.
async fn watch_certificates(
    pods: Vec<(String, SocketAddr)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Vec<Replacement>> {
    let held = |cert: &serde_json::Value| -> anyhow::Result<(u64, SystemTime)> {
        let issued = cert["issued"]
            .as_u64()
            .ok_or_else(|| anyhow!("no issued in {cert}"))?;
        let text = cert["valid_until"]
            .as_str()
            .ok_or_else(|| anyhow!("no valid_until in {cert}"))?;
        Ok((issued, humantime::parse_rfc3339(text)?))
    };
    let mut current = Vec::new();
    for (_, admin) in &pods {
        current.push(held(&certificate_at(*admin).await?)?);
    }
    let mut replacements = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for ((pod, admin), (issued, until)) in pods.iter().zip(current.iter_mut()) {
            let (now_issued, now_until) = held(&certificate_at(*admin).await?)?;
            if now_issued != *issued {
                replacements.push(Replacement {
                    pod: pod.clone(),
                    old_until: *until,
                    new_until: now_until,
                    seen: SystemTime::now(),
                    installed: now_issued.saturating_sub(*issued),
                });
                (*issued, *until) = (now_issued, now_until);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(replacements)
}

/// The inbound mTLS connections b and c have accepted so far.
async fn mtls_accepted(fx: &Fixture) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for pod in [&fx.b, &fx.c] {
        total += pod.metrics().await?.sum(
            "keel_tcp_connections_opened_total",
            &[("direction", "inbound"), ("protocol", "mtls")],
        );
    }
    Ok(total)
}

#[tokio::test]
async fn renewal_and_root_rotation_lose_no_request() -> anyhow::Result<()> {
    skip_unless_root!();
    // Certificates live 30 s, so each sidecar renews every 21 s or so during the test.
    let ttl = Duration::from_secs(30);
    let fx = Fixture::start(ttl).await?;
    let old_root = keel_control_plane::identity::ca::root_id(&fx.root.der());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = tokio::spawn(watch_certificates(
        [&fx.a, &fx.b, &fx.c]
            .iter()
            .map(|p| (p.name().to_owned(), p.admin()))
            .collect(),
        stop.clone(),
    ));

    // Steady load from a: HTTP to web (b and c), four requests at a time, which the sidecars
    // carry over pooled HTTP/2 connections made before any renewal; and opaque TCP to echo (b
    // and c), two connections at a time, each a new mTLS connection between the sidecars, so
    // that handshakes keep happening with whatever certificates and bundles the sidecars hold
    // at that moment. Every answer is checked.
    let sent = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        let from = fx.a.netns_path();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = request_from(&from, vip(WEB_VIP), "/load", &[], "").await;
                sent.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok(a) if a.status == 200 && a.body.contains("client=spiffe://") => {}
                    Ok(a) => failures
                        .lock()
                        .expect("failures")
                        .push(format!("{} {}", a.status, a.body)),
                    Err(e) => failures.lock().expect("failures").push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for _ in 0..2 {
        let (stop, echoed, failures) = (stop.clone(), echoed.clone(), failures.clone());
        let from = fx.a.netns_path();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match echo_from(&from, &marker("echo")).await {
                    Ok(pod) if pod == "b" || pod == "c" => {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(pod) => failures
                        .lock()
                        .expect("failures")
                        .push(format!("echo answered by {pod}")),
                    Err(e) => failures
                        .lock()
                        .expect("failures")
                        .push(format!("echo: {e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // Renewals: every sidecar gets at least two more certificates.
    let before_renewals = mtls_accepted(&fx).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut renewed = true;
        for pod in [&fx.a, &fx.b, &fx.c] {
            renewed &= certificate_of(pod).await?["issued"].as_u64().unwrap_or(0) >= 3;
        }
        if renewed {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "sidecars did not renew\n{}",
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after_renewals = mtls_accepted(&fx).await?;
    ensure!(
        after_renewals - before_renewals >= 10.0,
        "only {} new mTLS connections while the sidecars renewed",
        after_renewals - before_renewals
    );

    // Root rotation, as an operator runs it.
    let keelctl = netns::workspace_binary("keelctl", "keel-control-plane")?;
    let admin = format!("http://{}", fx.control_plane.admin_addr);
    let rotated = tokio::process::Command::new(&keelctl)
        .args([
            "ca",
            "rotate",
            "--timeout",
            "60s",
            "--control-plane",
            &admin,
        ])
        .output()
        .await?;
    ensure!(
        rotated.status.success(),
        "keelctl ca rotate failed: {}{}\n{}",
        String::from_utf8_lossy(&rotated.stdout),
        String::from_utf8_lossy(&rotated.stderr),
        fx.logs()
    );
    let bundle = fx.control_plane.ca.as_ref().context("ca")?.bundle();
    ensure!(
        bundle.anchors.len() == 1,
        "the old root is still in the bundle"
    );
    let new_root = bundle.anchors[0].id.clone();
    ensure!(new_root != old_root, "the root did not change");

    // Load goes on for a while on the new root alone: new handshakes keep succeeding.
    let after_rotation = mtls_accepted(&fx).await?;
    let echoed_before = echoed.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mtls_accepted(&fx).await? - after_rotation < 10.0 {
        ensure!(
            Instant::now() < deadline,
            "no new mTLS connections after the rotation\n{}",
            fx.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    let replacements = watcher.await??;
    let failures = failures.lock().expect("failures").clone();
    let total = sent.load(Ordering::Relaxed);
    let echoes = echoed.load(Ordering::Relaxed);
    eprintln!(
        "{total} requests and {echoes} echo connections during renewals and rotation \
         ({} after it), {} failed; {} certificate replacements",
        echoes - echoed_before,
        failures.len(),
        replacements.iter().map(|r| r.installed).sum::<u64>()
    );
    ensure!(total > 100, "too little load to tell: {total} requests");
    ensure!(
        failures.is_empty(),
        "{} of {total} requests and {echoes} echoes failed, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        fx.logs()
    );
    ensure!(
        echoes - echoed_before >= 10,
        "only {} echo connections after the rotation",
        echoes - echoed_before
    );

    // Each certificate was replaced before 80% of its lifetime. It was signed its lifetime
    // before its expiry, which X.509 keeps in whole seconds (rounded down), so at most a second
    // after that; the test saw the new one at most 100 ms (and a scrape) after it came. The
    // sidecars aim at 65-75%.
    for pod in ["a", "b", "c"] {
        let of_pod: Vec<&Replacement> = replacements.iter().filter(|r| r.pod == pod).collect();
        let installed: u64 = of_pod.iter().map(|r| r.installed).sum();
        ensure!(
            installed >= 3,
            "{pod}: only {installed} certificate replacements seen"
        );
        for r in of_pod {
            let signed = r.old_until + Duration::from_secs(1) - ttl;
            let age = r.seen.duration_since(signed).unwrap_or_default();
            ensure!(
                age <= ttl.mul_f64(0.8),
                "{pod}: a certificate valid until {} was replaced at least {age:?} after it was \
                 signed ({:.0}% of its lifetime), by one valid until {}",
                humantime::format_rfc3339_millis(r.old_until),
                100.0 * age.as_secs_f64() / ttl.as_secs_f64(),
                humantime::format_rfc3339_millis(r.new_until)
            );
        }
    }
    for pod in [&fx.a, &fx.b, &fx.c] {
        let cert = certificate_of(pod).await?;
        ensure!(
            cert["signed_by"].as_str() == Some(new_root.as_str()),
            "{} still holds a certificate from {:?}",
            pod.name(),
            cert["signed_by"]
        );
    }
    // New handshakes: b proves its identity with the new root, and refuses a certificate from
    // the old one.
    let new_roots: Vec<CertificateDer<'static>> =
        bundle.anchors.iter().map(|a| a.der.clone()).collect();
    let old_cert = Arc::new(fx.root.svid(&id("tester").to_string()));
    ensure!(
        mtls_from_host(app(fx.b.ip()), &id("b"), &new_roots, Some(old_cert))
            .await
            .is_err(),
        "b still accepts a certificate from the removed root"
    );
    ensure!(
        tls_handshake(app(fx.b.ip()), &id("b"), &new_roots)
            .await
            .is_ok(),
        "b's certificate does not chain to the new root"
    );
    ensure!(
        tls_handshake(app(fx.b.ip()), &id("b"), &[fx.root.der()])
            .await
            .is_err(),
        "b's certificate still chains to the removed root"
    );
    Ok(())
}

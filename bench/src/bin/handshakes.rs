//! How many mTLS handshakes one core does: keel's own sidecar TLS configurations (the ones
//! `keel-proxy` builds: TLS 1.3, ECDSA P-256 certificates from keel's CA, SPIFFE checks on both
//! sides, no resumption) between a client thread and a server thread on loopback, each thread
//! measuring its own CPU time. Prints one JSON line per run and the medians.
//!
//! ```sh
//! cargo build --release -p keel-bench && target/release/handshakes --runs 5 --handshakes 2000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use keel_control_plane::identity::{CaStorage, CertificateAuthority};
use keel_proto::spiffe::SpiffeId;
use keel_proxy::tls::{Carried, Credentials, MeshTls};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(about = "mTLS handshakes per CPU-second with keel's sidecar TLS configurations")]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Handshakes per run.
    #[arg(long, default_value_t = 2000)]
    handshakes: u32,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn certified(ca: &CertificateAuthority, identity: &SpiffeId) -> anyhow::Result<Credentials> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let signed = ca.sign_workload(csr.der(), identity, "")?;
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&pkcs8)?;
    Ok(Credentials {
        certified: Arc::new(CertifiedKey::new(signed.chain, signing)),
        not_after: SystemTime::now() + Duration::from_secs(3600),
        signed_by: signed.signed_by,
    })
}

struct Run {
    handshakes: u32,
    wall: Duration,
    server_cpu: Duration,
    client_cpu: Duration,
}

fn run(server: Arc<MeshTls>, client: Arc<MeshTls>, n: u32) -> anyhow::Result<Run> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let server_thread = std::thread::spawn(move || -> anyhow::Result<Duration> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let config = server.server_config().context("server credentials")?;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let start = thread_cpu();
            for _ in 0..n {
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let mut tls = acceptor.accept(tcp).await?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await?;
                tls.write_all(&byte).await?;
                tls.flush().await?;
            }
            Ok(thread_cpu() - start)
        })
    });
    let peer = Arc::new(server_identity());
    let client_thread = std::thread::spawn(move || -> anyhow::Result<(Duration, Duration)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let started = Instant::now();
            let start = thread_cpu();
            for _ in 0..n {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let mut tls = client.connect(tcp, &peer, Carried::Http2).await?;
                // TLS 1.3: the server checks the client's certificate after the client is done;
                // one round trip makes sure both sides finished before the next handshake.
                tls.write_all(b"x").await?;
                tls.flush().await?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await?;
            }
            Ok((thread_cpu() - start, started.elapsed()))
        })
    });
    let (client_cpu, wall) = client_thread
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let server_cpu = server_thread
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(Run {
        handshakes: n,
        wall,
        server_cpu,
        client_cpu,
    })
}

fn server_identity() -> SpiffeId {
    SpiffeId::new("bench.local", "bench", "server").expect("identity")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = CertificateAuthority::open(CaStorage::Memory, Duration::from_secs(3600))?;
    let bundle: Vec<CertificateDer<'static>> =
        ca.bundle().anchors.iter().map(|a| a.der.clone()).collect();
    let server = MeshTls::new(server_identity());
    server.set_credentials(certified(&ca, &server_identity())?, Some(bundle.clone()))?;
    let client_id = SpiffeId::new("bench.local", "bench", "client")?;
    let client = MeshTls::new(client_id.clone());
    client.set_credentials(certified(&ca, &client_id)?, Some(bundle))?;

    let (mut server_rates, mut client_rates, mut wall_rates) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        let r = run(server.clone(), client.clone(), args.handshakes)?;
        let per_cpu = |cpu: Duration| f64::from(r.handshakes) / cpu.as_secs_f64();
        let line = serde_json::json!({
            "run": i + 1,
            "handshakes": r.handshakes,
            "server_handshakes_per_cpu_second": per_cpu(r.server_cpu).round(),
            "client_handshakes_per_cpu_second": per_cpu(r.client_cpu).round(),
            "handshakes_per_wall_second": (f64::from(r.handshakes) / r.wall.as_secs_f64()).round(),
        });
        println!("{line}");
        server_rates.push(per_cpu(r.server_cpu));
        client_rates.push(per_cpu(r.client_cpu));
        wall_rates.push(f64::from(r.handshakes) / r.wall.as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "median_server_handshakes_per_cpu_second": median(server_rates).round(),
            "median_client_handshakes_per_cpu_second": median(client_rates).round(),
            "median_handshakes_per_wall_second": median(wall_rates).round(),
        })
    );
    Ok(())
}

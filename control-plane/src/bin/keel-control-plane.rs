//! The keel control plane server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use keel_control_plane::identity::CaStorage;
use keel_control_plane::server::{IdentityConfig, ProofKind};
use keel_control_plane::{ControlPlane, ControlPlaneConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proof {
    /// The local mesh's per-workload tokens (`keelctl token`).
    BootstrapToken,
    /// Kubernetes ServiceAccount tokens, checked with TokenReview.
    KubernetesToken,
}

/// Serves a directory of mesh YAML to keel proxies.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The directory of mesh YAML to serve (watched for changes).
    #[arg(long, env = "KEEL_CONFIG_DIR", default_value = "examples/mesh")]
    config_dir: PathBuf,
    /// Where proxies connect for discovery.
    #[arg(long, env = "KEEL_DISCOVERY_ADDR", default_value = "0.0.0.0:15010")]
    discovery_addr: SocketAddr,
    /// The admin API used by keelctl.
    #[arg(long, env = "KEEL_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Where proxies connect over TLS for discovery and certificates.
    #[arg(long, env = "KEEL_SECURE_ADDR", default_value = "0.0.0.0:15012")]
    secure_addr: SocketAddr,
    /// Extra DNS names or IP addresses for the control plane's serving certificate (the
    /// address proxies dial, if they check it); repeatable.
    #[arg(long = "secure-name", env = "KEEL_SECURE_NAMES", value_delimiter = ',')]
    secure_names: Vec<String>,
    /// The CA's directory: roots, their keys and the bootstrap token key. Created, with a new
    /// root, if missing. Default: $XDG_STATE_HOME/keel/ca or ~/.local/state/keel/ca.
    #[arg(long, env = "KEEL_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// On first start, import this root certificate (PEM) instead of generating one.
    #[arg(long, env = "KEEL_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, env = "KEEL_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates; proxies renew at about 70% of it.
    #[arg(long, env = "KEEL_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    workload_cert_ttl: Duration,
    /// How workloads prove their identity.
    #[arg(
        long,
        env = "KEEL_PROOF",
        value_enum,
        default_value = "bootstrap-token"
    )]
    proof: Proof,
    /// Run without a CA and the secure port: proxies get no certificates, so no mTLS.
    #[arg(long, env = "KEEL_NO_CA")]
    no_ca: bool,
    /// Log filter, e.g. "info" or "keel_control_plane=debug".
    #[arg(long, env = "KEEL_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .init();
    // One socket per proxy: raise the soft descriptor limit to what the system allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open file limit");
    }
    let identity = if args.no_ca {
        None
    } else {
        let dir = match args.ca_dir.clone() {
            Some(dir) => dir,
            None => default_ca_dir().context("no --ca-dir given and no home directory")?,
        };
        Some(IdentityConfig {
            storage: CaStorage::Directory {
                dir,
                import: args.ca_cert.clone().zip(args.ca_key.clone()),
            },
            workload_ttl: args.workload_cert_ttl,
            secure_addr: args.secure_addr,
            extra_names: args.secure_names.clone(),
            proof: match args.proof {
                Proof::BootstrapToken => ProofKind::BootstrapToken,
                Proof::KubernetesToken => ProofKind::KubernetesToken,
            },
        })
    };
    let control_plane = ControlPlane::start(ControlPlaneConfig {
        config_dir: args.config_dir.clone(),
        discovery_addr: args.discovery_addr,
        admin_addr: args.admin_addr,
        identity,
    })
    .await
    .with_context(|| {
        format!(
            "starting the control plane on {}",
            args.config_dir.display()
        )
    })?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    control_plane.shutdown().await;
    Ok(())
}

fn default_ca_dir() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("keel").join("ca"))
}

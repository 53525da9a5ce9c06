//! The keel control plane server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use keel_control_plane::{ControlPlane, ControlPlaneConfig};

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
    let control_plane = ControlPlane::start(ControlPlaneConfig {
        config_dir: args.config_dir.clone(),
        discovery_addr: args.discovery_addr,
        admin_addr: args.admin_addr,
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

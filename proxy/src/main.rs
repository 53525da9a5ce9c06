//! `keel-proxy`: the sidecar. `init` installs the iptables rules that make it transparent;
//! `run` serves.

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's allocator: a request allocates and frees a few dozen small
/// objects (headers, bodies' frames, futures), and under callgrind glibc's malloc and free were
/// about 14% of the sidecar's instructions per request.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

#[cfg(feature = "mimalloc")]
mod alloc;

#[derive(Debug, Parser)]
#[command(
    name = "keel-proxy",
    version,
    about = "keel's transparent sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install (or with --cleanup remove) the iptables rules that redirect the pod's TCP
    /// through the proxy, in the current network namespace.
    Init(keel_proxy::init::InitArgs),
    /// Serve: the outbound, inbound and admin listeners, configured by the control plane.
    Run(Box<keel_proxy::run::RunArgs>),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Init(args) => keel_proxy::init::run(&args),
        Command::Run(args) => keel_proxy::run::run(*args),
    }
}

//! `keel-proxy run`: starts the sidecar. Binds the outbound (15001), inbound (15006) and admin
//! (15020) listeners, on IPv4 and IPv6 (one socket per family, the IPv6 one `IPV6_V6ONLY`, so
//! that each connection's family is its socket's), connects to the control plane, keeps balancers in step with each new
//! configuration, and drains gracefully on SIGTERM (or SIGINT): stop accepting (new connections
//! are refused), let in-flight requests and upgraded connections finish (HTTP/2 GOAWAY), keep
//! the admin server answering (`/ready` says 503), exit at the latest after the grace period.
//!
//! The data path serves with the last good configuration whatever the control plane does; before
//! the first configuration arrives, `/ready` says so and outbound traffic is passed through.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_proto::spiffe::SpiffeId;
use keel_proto::v1::{Locality, Node};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::balance::Balancers;
use crate::config::{Config, ConfigStore};
use crate::discovery::{self, DiscoveryClientConfig};
use crate::metrics::Metrics;
use crate::pool::Upstreams;
use crate::serve::{DrainTrigger, Shared};
use crate::tls::MeshTls;
use crate::tls::certify::{self, CertifyConfig};
use crate::tls::control_plane::{ControlPlane, ControlPlaneTls};
use crate::{inbound, outbound};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The control plane's discovery address, e.g. http://10.77.0.1:15010.
    #[arg(long, env = "KEEL_CONTROL_PLANE")]
    pub control_plane: String,
    /// The workload (pod) this proxy fronts.
    #[arg(long, env = "KEEL_WORKLOAD")]
    pub workload: String,
    #[arg(long, env = "KEEL_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "KEEL_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The mesh's SPIFFE trust domain: the proxy's identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, env = "KEEL_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The pod's IP addresses (repeatable, or comma-separated).
    #[arg(long, env = "KEEL_POD_IP", value_delimiter = ',')]
    pub pod_ip: Vec<IpAddr>,
    #[arg(long, env = "KEEL_REGION", default_value = "")]
    pub region: String,
    #[arg(long, env = "KEEL_ZONE", default_value = "")]
    pub zone: String,
    #[arg(long, env = "KEEL_SUBZONE", default_value = "")]
    pub subzone: String,
    /// Where the outbound listener binds (repeatable, or comma-separated). `keel-proxy init`
    /// redirects IPv4 and IPv6 alike, so both families are served; an IPv6 wildcard is skipped
    /// with a warning where the kernel has no IPv6 at all.
    #[arg(
        long,
        env = "KEEL_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15001,[::]:15001"
    )]
    pub outbound_addr: Vec<SocketAddr>,
    /// Where the inbound listener binds, like --outbound-addr; every address has the same port.
    #[arg(
        long,
        env = "KEEL_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006,[::]:15006"
    )]
    pub inbound_addr: Vec<SocketAddr>,
    /// Where the admin server binds, like --outbound-addr.
    #[arg(
        long,
        env = "KEEL_ADMIN_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15020,[::]:15020"
    )]
    pub admin_addr: Vec<SocketAddr>,
    /// How long protocol detection waits for a client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    #[arg(long, env = "KEEL_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request head, and a body of at most 16 KiB
    /// with it (it is then answered 408), and how long an idle HTTP/1 keep-alive connection is
    /// kept.
    #[arg(long, env = "KEEL_HTTP_HEAD_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_head_timeout: Duration,
    /// How long an HTTP/1 connection to an upstream may wait in the pool for its next request
    /// before it is closed (a service's shorter `idleTimeout` wins). Keep it below the
    /// upstreams' own keep-alive timeouts.
    #[arg(long, env = "KEEL_HTTP1_POOL_IDLE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub http1_pool_idle_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Worker threads for the data path; 1 runs everything on one thread.
    #[arg(long, env = "KEEL_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// The root certificate(s), PEM, to check the control plane with over https:// (until
    /// discovery delivers the mesh's trust bundle). Required for https://.
    #[arg(long, env = "KEEL_CA_ROOT_FILE")]
    pub ca_root_file: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    #[arg(
        long,
        env = "KEEL_CONTROL_PLANE_NAME",
        default_value = "keel-control-plane.keel-system.svc"
    )]
    pub control_plane_name: String,
    /// The proof of identity sent for certificates: a bootstrap token (`keelctl token`) or, in
    /// Kubernetes, a projected ServiceAccount token with audience `keel`. Read anew each time.
    #[arg(long, env = "KEEL_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(serve(args))
}

/// Binds one listener per address. An IPv6 socket is `IPV6_V6ONLY`, so that it never takes the
/// IPv4 connections of the IPv4 socket beside it on the same port, and every connection it
/// accepts is IPv6. Where the kernel has no IPv6 at all, an IPv6 wildcard is left out.
fn listen(what: &str, addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match bind(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(e)
                if addr.is_ipv6()
                    && addr.ip().is_unspecified()
                    && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                tracing::warn!(%addr, "no IPv6 in this kernel; the {what} listener serves IPv4 only");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("binding the {what} listener on {addr}"));
            }
        }
    }
    anyhow::ensure!(
        !listeners.is_empty(),
        "the {what} listener has no address to bind"
    );
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The one port every address of a listener shares.
fn single_port(flag: &str, addrs: &[SocketAddr]) -> anyhow::Result<u16> {
    let mut ports = addrs.iter().map(SocketAddr::port);
    let port = ports
        .next()
        .with_context(|| format!("{flag} names no address"))?;
    anyhow::ensure!(
        ports.all(|p| p == port),
        "{flag}: every address must have the same port (the redirect rules send to one port)"
    );
    Ok(port)
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    // Installed first, so that a signal from here on drains rather than kills.
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let inbound_port = single_port("--inbound-addr", &args.inbound_addr)?;
    let outbound_listeners = listen("outbound", &args.outbound_addr)?;
    let inbound_listeners = listen("inbound", &args.inbound_addr)?;
    let admin_listeners = listen("admin", &args.admin_addr)?;

    let node = Node {
        id: format!("{}.{}", args.workload, args.namespace),
        workload: args.workload.clone(),
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        locality: Some(Locality {
            region: args.region.clone(),
            zone: args.zone.clone(),
            subzone: args.subzone.clone(),
        }),
        pod_ips: args.pod_ip.iter().map(ToString::to_string).collect(),
        proxy_version: discovery::PROXY_VERSION.to_owned(),
    };
    let store = Arc::new(ConfigStore::new(Arc::new(Config::empty(&args.namespace))));
    let secure = args.control_plane.starts_with("https://");
    let control_plane_tls = match (&args.ca_root_file, secure) {
        (Some(path), true) => {
            let roots = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading the CA roots in {}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing the CA roots in {}", path.display()))?;
            Some(Arc::new(
                ControlPlaneTls::new(&args.control_plane_name, roots)
                    .with_context(|| format!("the CA roots in {}", path.display()))?,
            ))
        }
        (None, true) => anyhow::bail!(
            "--control-plane {} is https:// but no --ca-root-file says how to check it",
            args.control_plane
        ),
        (_, false) => None,
    };
    let mut discovery_config = DiscoveryClientConfig::new(args.control_plane.clone(), node.clone());
    discovery_config.tls = control_plane_tls.clone();
    let discovery = Arc::new(
        discovery::spawn(discovery_config, store.clone())
            .context("starting the discovery client")?,
    );

    // With TLS to the control plane the proxy has an identity: a certificate for its service
    // account, renewed in the background.
    let identity = match control_plane_tls {
        Some(tls) => {
            let me = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
                .context("the proxy's identity (--trust-domain, --namespace, --service-account)")?;
            let mesh_tls = MeshTls::new(me.clone());
            let control_plane =
                ControlPlane::new(&args.control_plane, Some(tls), Duration::from_secs(5))?;
            let (task, status) = certify::spawn(
                CertifyConfig::new(me, node.id.clone(), args.identity_token_file.clone()),
                control_plane,
                mesh_tls.clone(),
                store.subscribe(),
            );
            Some((mesh_tls, status, task))
        }
        None => None,
    };

    let metrics = Arc::new(Metrics::default());
    let balancers = Arc::new(Balancers::new(
        crate::locality::Locality {
            region: args.region.clone(),
            zone: args.zone.clone(),
            subzone: args.subzone.clone(),
        },
        metrics.clone(),
    ));
    let mut configs = store.subscribe();
    let balancer_updates = {
        let balancers = balancers.clone();
        tokio::spawn(async move {
            loop {
                let config = configs.borrow_and_update().clone();
                balancers.update(&config);
                if configs.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    let shared = Arc::new(Shared {
        config: store,
        balancers,
        upstreams: Upstreams::new(
            identity.as_ref().map(|(tls, _, _)| tls.clone()),
            args.http1_pool_idle_timeout,
        ),
        metrics: metrics.clone(),
        detect_timeout: args.detect_timeout,
        head_timeout: args.http_head_timeout,
        inbound_port,
        tls: identity.as_ref().map(|(tls, _, _)| tls.clone()),
    });
    let (trigger, drain) = DrainTrigger::new();
    for listener in outbound_listeners {
        tokio::spawn(outbound::serve(shared.clone(), listener, drain.clone()));
    }
    for listener in inbound_listeners {
        tokio::spawn(inbound::serve(shared.clone(), listener, drain.clone()));
    }
    let admin = Arc::new(Admin {
        discovery: discovery.clone(),
        metrics,
        identity: identity
            .as_ref()
            .map(|(tls, status, _)| (tls.clone(), status.clone())),
        drain,
    });
    let admin_tasks: Vec<_> = admin_listeners
        .into_iter()
        .map(|listener| tokio::spawn(admin.clone().serve(listener)))
        .collect();
    tracing::info!(
        outbound = ?args.outbound_addr,
        inbound = ?args.inbound_addr,
        admin = ?args.admin_addr,
        control_plane = %args.control_plane,
        "keel-proxy serving"
    );

    tokio::select! {
        _ = interrupt.recv() => {},
        _ = terminate.recv() => {},
    }
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    let clean = trigger.drain(args.shutdown_grace).await;
    if !clean {
        tracing::warn!("grace period over with connections still open; exiting");
    }
    for task in admin_tasks {
        task.abort();
    }
    balancer_updates.abort();
    if let Some((_, _, task)) = identity {
        task.abort();
    }
    if let Ok(discovery) = Arc::try_unwrap(discovery) {
        discovery.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::RunArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn the_http1_pool_idle_timeout_defaults_to_the_pools_own() {
        let cli = Cli::try_parse_from([
            "keel-proxy",
            "--control-plane",
            "http://cp:15010",
            "--workload",
            "w",
        ])
        .expect("the required flags only");
        assert_eq!(
            cli.run.http1_pool_idle_timeout,
            crate::pool::DEFAULT_H1_POOL_IDLE_TIMEOUT
        );
    }
}

//! `keel-proxy run`: starts the sidecar. Binds the outbound (15001), inbound (15006) and admin
//! (15020) listeners, connects to the control plane, keeps balancers in step with each new
//! configuration, and drains gracefully on SIGTERM: stop accepting, let in-flight requests
//! finish (HTTP/2 GOAWAY), exit at the latest after the grace period.
//!
//! The data path serves with the last good configuration whatever the control plane does; before
//! the first configuration arrives, `/ready` says so and outbound traffic is passed through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_proto::v1::{Locality, Node};
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::balance::Balancers;
use crate::config::{Config, ConfigStore};
use crate::discovery::{self, DiscoveryClientConfig};
use crate::metrics::Metrics;
use crate::pool::Upstreams;
use crate::serve::{DrainTrigger, Shared};
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
    /// The pod's IP addresses (repeatable, or comma-separated).
    #[arg(long, env = "KEEL_POD_IP", value_delimiter = ',')]
    pub pod_ip: Vec<IpAddr>,
    #[arg(long, env = "KEEL_REGION", default_value = "")]
    pub region: String,
    #[arg(long, env = "KEEL_ZONE", default_value = "")]
    pub zone: String,
    #[arg(long, env = "KEEL_SUBZONE", default_value = "")]
    pub subzone: String,
    #[arg(long, env = "KEEL_OUTBOUND_ADDR", default_value = "0.0.0.0:15001")]
    pub outbound_addr: SocketAddr,
    #[arg(long, env = "KEEL_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    #[arg(long, env = "KEEL_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// How long protocol detection waits for a client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    #[arg(long, env = "KEEL_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Worker threads for the data path; 1 runs everything on one thread.
    #[arg(long, env = "KEEL_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
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

async fn listen(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let outbound_listener = listen("outbound", args.outbound_addr).await?;
    let inbound_listener = listen("inbound", args.inbound_addr).await?;
    let admin_listener = listen("admin", args.admin_addr).await?;

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
    let discovery = Arc::new(
        discovery::spawn(
            DiscoveryClientConfig::new(args.control_plane.clone(), node),
            store.clone(),
        )
        .context("starting the discovery client")?,
    );

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
        upstreams: Upstreams::new(),
        metrics: metrics.clone(),
        detect_timeout: args.detect_timeout,
        inbound_port: args.inbound_addr.port(),
    });
    let (trigger, drain) = DrainTrigger::new();
    tokio::spawn(outbound::serve(
        shared.clone(),
        outbound_listener,
        drain.clone(),
    ));
    tokio::spawn(inbound::serve(shared, inbound_listener, drain.clone()));
    let admin = Arc::new(Admin {
        discovery: discovery.clone(),
        metrics,
    });
    let admin_task = tokio::spawn(admin.serve(admin_listener, drain));
    tracing::info!(
        outbound = %args.outbound_addr,
        inbound = %args.inbound_addr,
        admin = %args.admin_addr,
        control_plane = %args.control_plane,
        "keel-proxy serving"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    let clean = trigger.drain(args.shutdown_grace).await;
    if !clean {
        tracing::warn!("grace period over with connections still open; exiting");
    }
    admin_task.abort();
    balancer_updates.abort();
    if let Ok(discovery) = Arc::try_unwrap(discovery) {
        discovery.shutdown().await;
    }
    Ok(())
}

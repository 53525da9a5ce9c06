//! The proxy's typed, validated view of its configuration.
//!
//! The discovery client feeds each [`DiscoveryResponse`](keel_proto::v1::DiscoveryResponse)
//! to a [`ConfigBuilder`], which decodes and validates the resources it carries (addresses,
//! ports, regexes, enums, required fields), applies them to what it already holds, and assembles
//! a new immutable [`Config`]: services indexed by VIP:port and by hostname:port, each with its
//! compiled routes, its endpoints and its traffic policy, plus the inbound authorization policies
//! and the mesh settings. An update either produces a whole new `Config` or fails with a
//! [`ConfigError`] naming the resource, the field and the reason, and then nothing changes (the
//! NACK case). The [`ConfigStore`] publishes each accepted `Config` through an `ArcSwap`, so the
//! data path reads the current snapshot without a lock, and through a `watch` channel, so
//! background tasks (balancers, health tracking) can react to changes.
//!
//! What is validated where: the shape of each resource is checked when it is decoded and a bad
//! one is rejected. References *between* resources are resolved when the `Config` is assembled
//! and are never a reason to reject: the discovery stream delivers each type independently, at
//! most one response in flight per type, so a RouteTable naming a new service can legitimately
//! arrive before that Service does, and a control plane does not resend a version the proxy
//! rejected. (Envoy makes the same choice: RDS does not validate clusters by default.) A dangling
//! reference is listed in [`Config::unresolved`] and shows in `/config`; a request routed to an
//! unknown service fails at request time. Conflicts *within* one type (two services claiming the
//! same VIP:port) are rejected, because each response leaves a type in a state the control plane
//! produced as a whole.
//!
//! This module must never hand raw proto to the data path, never block a reader of the current
//! configuration, and never leave a partially applied update visible.

mod builder;
mod error;
mod resources;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::{ArcSwap, Guard};
use keel_proto::v1::type_url;
use rustc_hash::FxBuildHasher;
use serde::{Serialize, Serializer};
use tokio::sync::watch;

pub use builder::{Applied, ConfigBuilder};
pub use error::{ConfigError, FieldError, Problem};
pub use resources::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, CircuitBreaker, CompiledRegex,
    DistributeRule, Endpoint, Endpoints, FailoverLabel, FailoverRule, FailurePercentageEjection,
    GrpcCode, HashOn, HeaderMatch, LoadBalancer, Locality, LocalityFailover, LocalityPattern,
    MeshSettings, MtlsMode, Operation, OutboundTrafficPolicy, OutlierDetection, Protocol,
    RetryBudget, RetryOn, RetryPolicy, Route, RouteMatch, RouteTable, Service, ServicePort, Source,
    StringMatcher, StringPattern, SuccessRateEjection, TrafficPolicy, TrustAnchor,
    WeightedDestination,
};

/// The resource types of the discovery stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ResourceKind {
    MeshConfig,
    Service,
    Endpoints,
    TrafficPolicy,
    RouteTable,
    AuthorizationPolicy,
}

impl ResourceKind {
    /// Every kind, in the order of [`type_url::ALL`].
    pub const ALL: [ResourceKind; 6] = [
        ResourceKind::MeshConfig,
        ResourceKind::Service,
        ResourceKind::Endpoints,
        ResourceKind::TrafficPolicy,
        ResourceKind::RouteTable,
        ResourceKind::AuthorizationPolicy,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::MeshConfig => type_url::MESH_CONFIG,
            ResourceKind::Service => type_url::SERVICE,
            ResourceKind::Endpoints => type_url::ENDPOINTS,
            ResourceKind::TrafficPolicy => type_url::TRAFFIC_POLICY,
            ResourceKind::RouteTable => type_url::ROUTE_TABLE,
            ResourceKind::AuthorizationPolicy => type_url::AUTHORIZATION_POLICY,
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::MeshConfig => "MeshConfig",
            ResourceKind::Service => "Service",
            ResourceKind::Endpoints => "Endpoints",
            ResourceKind::TrafficPolicy => "TrafficPolicy",
            ResourceKind::RouteTable => "RouteTable",
            ResourceKind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the proxy knows about calling one service. Services without a RouteTable, an
/// Endpoints or a TrafficPolicy resource get an empty table, no endpoints and the default
/// policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub service: Arc<Service>,
    pub routes: Arc<RouteTable>,
    pub endpoints: Arc<Endpoints>,
    pub traffic_policy: Arc<TrafficPolicy>,
}

impl ServiceConfig {
    /// `<namespace>/<name>`.
    pub fn name(&self) -> &str {
        &self.service.name
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.service.port(port)
    }

    /// Each endpoint with the address to connect to for a request to `port`.
    pub fn endpoint_addrs<'a>(
        &'a self,
        port: &'a ServicePort,
    ) -> impl Iterator<Item = (SocketAddr, &'a Endpoint)> + 'a {
        self.endpoints
            .endpoints
            .iter()
            .map(move |e| (e.socket_addr(port), e))
    }
}

impl Serialize for ServiceConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            #[serde(flatten)]
            service: &'a Service,
            routes: &'a [Route],
            endpoints: &'a [Endpoint],
            traffic_policy: &'a TrafficPolicy,
        }
        View {
            service: &self.service,
            routes: &self.routes.routes,
            endpoints: &self.endpoints.endpoints,
            traffic_policy: &self.traffic_policy,
        }
        .serialize(s)
    }
}

/// A service port that a connection or a request is addressed to.
#[derive(Debug, Clone, Copy)]
pub struct ServiceTarget<'a> {
    pub service: &'a Arc<ServiceConfig>,
    pub port: &'a ServicePort,
}

/// A reference the proxy could not resolve. Not an error: it is expected to resolve once the
/// rest of the update arrives, and until then requests that need it fail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unresolved {
    /// Routes, endpoints or a traffic policy for a service the proxy does not have.
    NoSuchService { kind: ResourceKind, name: String },
    /// A route sends traffic to a service the proxy does not have.
    MissingDestination {
        service: String,
        route: String,
        destination: String,
    },
    /// Several services claim a hostname:port, and not exactly one of them is in the proxy's own
    /// namespace; the name is left out of the index rather than guessed.
    AmbiguousHost {
        host: String,
        port: u16,
        services: Vec<String>,
    },
}

/// The versions the proxy holds of one resource type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TypeVersions {
    /// The control plane's snapshot version of the last response that changed this type.
    pub system_version: String,
    /// Resource name -> version.
    pub resources: BTreeMap<String, String>,
}

/// A service port in an index.
#[derive(Debug, Clone)]
struct PortRef {
    service: Arc<ServiceConfig>,
    index: usize,
}

impl PortRef {
    fn target(&self) -> Option<ServiceTarget<'_>> {
        let port = self.service.service.ports.get(self.index)?;
        Some(ServiceTarget {
            service: &self.service,
            port,
        })
    }
}

#[derive(Debug, Clone)]
struct HostEntry {
    port: u16,
    target: PortRef,
}

/// One immutable snapshot of the proxy's configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    generation: u64,
    local_namespace: String,
    mesh: Arc<MeshSettings>,
    services: BTreeMap<String, Arc<ServiceConfig>>,
    // FxHash: looked up on every request; the keys come from the configuration, and a request
    // only probes with its own.
    by_addr: HashMap<SocketAddr, PortRef, FxBuildHasher>,
    by_host: HashMap<String, Vec<HostEntry>, FxBuildHasher>,
    authorization: Vec<Arc<AuthorizationPolicy>>,
    versions: BTreeMap<ResourceKind, TypeVersions>,
    unresolved: Vec<Unresolved>,
}

impl Config {
    /// The configuration of a proxy that has heard nothing yet: no services, default mesh
    /// settings.
    pub fn empty(local_namespace: impl Into<String>) -> Config {
        Config {
            local_namespace: local_namespace.into(),
            ..Config::default()
        }
    }

    /// Counts accepted updates that changed something; 0 for the empty configuration.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The namespace of the proxy's own workload, which resolves short hostnames.
    pub fn local_namespace(&self) -> &str {
        &self.local_namespace
    }

    pub fn mesh(&self) -> &MeshSettings {
        &self.mesh
    }

    /// A service by `<namespace>/<name>`.
    pub fn service(&self, name: &str) -> Option<&Arc<ServiceConfig>> {
        self.services.get(name)
    }

    /// Every service, ordered by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceConfig>> {
        self.services.values()
    }

    /// The service port listening on a VIP and port (a connection's original destination).
    pub fn by_addr(&self, addr: SocketAddr) -> Option<ServiceTarget<'_>> {
        self.by_addr.get(&addr)?.target()
    }

    /// The service port a hostname and port name. The host is matched without case and without
    /// a trailing dot.
    pub fn by_host(&self, host: &str, port: u16) -> Option<ServiceTarget<'_>> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        self.by_host
            .get(host.as_ref())?
            .iter()
            .find(|e| e.port == port)?
            .target
            .target()
    }

    /// The service port an HTTP authority (a Host header or `:authority`) names: `host`,
    /// `host:port`, `ip:port` or `[ipv6]:port`. Without a port, `default_port` (the port the
    /// connection was addressed to) is used. An IP literal is looked up as a VIP.
    pub fn by_authority(&self, authority: &str, default_port: u16) -> Option<ServiceTarget<'_>> {
        let (host, port) = split_authority(authority)?;
        let port = port.unwrap_or(default_port);
        match host.parse::<IpAddr>() {
            Ok(ip) => self.by_addr(SocketAddr::new(ip, port)),
            Err(_) => self.by_host(host, port),
        }
    }

    /// The authorization policies for the proxy's inbound side, ordered by name.
    pub fn authorization_policies(&self) -> &[Arc<AuthorizationPolicy>] {
        &self.authorization
    }

    /// The versions held per resource type (what a reconnecting client announces).
    pub fn versions(&self) -> &BTreeMap<ResourceKind, TypeVersions> {
        &self.versions
    }

    /// References that do not resolve in this snapshot.
    pub fn unresolved(&self) -> &[Unresolved] {
        &self.unresolved
    }
}

/// Splits an authority into host and port. `None` when it cannot be an authority at all.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    fn port(s: &str) -> Option<Option<u16>> {
        if s.is_empty() {
            return Some(None);
        }
        s.parse::<u16>().ok().filter(|p| *p != 0).map(Some)
    }
    // `:authority` may not carry user info, but a Host header is input: ignore it rather than
    // treat it as part of the host.
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            _ => port(after.strip_prefix(':')?)?,
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            None => (authority, None),
            // More than one colon: a bare IPv6 address, no port.
            Some((_, rest)) if rest.contains(':') => (authority, None),
            Some((host, p)) => (host, port(p)?),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

impl Serialize for Config {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn services<S: Serializer>(
            m: &&BTreeMap<String, Arc<ServiceConfig>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, v.as_ref())))
        }
        fn policies<S: Serializer>(
            v: &&[Arc<AuthorizationPolicy>],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|p| p.as_ref()))
        }
        #[derive(Serialize)]
        struct View<'a> {
            generation: u64,
            local_namespace: &'a str,
            mesh: &'a MeshSettings,
            #[serde(serialize_with = "services")]
            services: &'a BTreeMap<String, Arc<ServiceConfig>>,
            #[serde(serialize_with = "policies")]
            authorization_policies: &'a [Arc<AuthorizationPolicy>],
            unresolved: &'a [Unresolved],
            versions: &'a BTreeMap<ResourceKind, TypeVersions>,
        }
        View {
            generation: self.generation,
            local_namespace: &self.local_namespace,
            mesh: &self.mesh,
            services: &self.services,
            authorization_policies: &self.authorization,
            unresolved: &self.unresolved,
            versions: &self.versions,
        }
        .serialize(s)
    }
}

/// Where the current [`Config`] lives: read lock-free by the data path, replaced whole by the
/// discovery client, watched by whoever must react to a change.
///
/// The initial snapshot is a placeholder (no services, default mesh settings) until the first
/// [`ConfigStore::publish`]: [`ConfigStore::is_configured`] tells the two apart, for the parts of
/// the data path that must not act on defaults they were never given (the inbound side's mTLS
/// mode).
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwap<Config>,
    changes: watch::Sender<Arc<Config>>,
    configured: AtomicBool,
}

impl ConfigStore {
    /// A store holding `initial` as its placeholder: not configured until the first publish.
    pub fn new(initial: Arc<Config>) -> ConfigStore {
        let (changes, _) = watch::channel(initial.clone());
        ConfigStore {
            current: ArcSwap::new(initial),
            changes,
            configured: AtomicBool::new(false),
        }
    }

    /// Whether a configuration has been published (the discovery client publishes only
    /// complete, validated ones), as opposed to the placeholder the store started with.
    pub fn is_configured(&self) -> bool {
        self.configured.load(Ordering::Acquire)
    }

    /// The current snapshot, for the data path: no lock, no reference-count traffic in the
    /// common case. Do not hold the guard across an await point; use [`ConfigStore::current`]
    /// to keep a snapshot.
    pub fn load(&self) -> Guard<Arc<Config>> {
        self.current.load()
    }

    /// The current snapshot, owned.
    pub fn current(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Makes `config` the current snapshot and tells the watchers.
    pub fn publish(&self, config: Arc<Config>) {
        self.current.store(config.clone());
        // After the store: whoever sees `configured` reads a published snapshot.
        self.configured.store(true, Ordering::Release);
        self.changes.send_replace(config);
    }

    /// A receiver that sees every published snapshot (or at least the latest one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.changes.subscribe()
    }
}

impl Default for ConfigStore {
    fn default() -> Self {
        ConfigStore::new(Arc::new(Config::default()))
    }
}

#[cfg(test)]
mod tests;

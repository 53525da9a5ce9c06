//! The mesh resources as plain, validated Rust values.
//!
//! Everything here has already been checked by the parser: ports are in range, durations are
//! positive, regexes compile, references are resolved to [`ObjectKey`]s. Code that consumes these
//! types never re-validates them and never sees YAML. This file must never grow parsing logic or
//! depend on the YAML library's types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;

/// The only `apiVersion` keel reads.
pub const API_VERSION: &str = "keel.dev/v1alpha1";

/// The namespace a namespaced resource lands in when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A resource's identity inside its kind: namespace and name.
///
/// Ordered by namespace first, so a range over a `BTreeMap<ObjectKey, _>` visits one namespace's
/// objects together. Cluster-scoped resources (MeshConfig) use the empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A 1-based line and column in a file. Columns count characters, not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where each field of a document sits in its file, keyed by field path
/// (`spec.routes[0].destinations[1].service`). Shared, so cloning an [`Origin`] is cheap.
///
/// Later checks (cross-resource validation, the discovery server refusing a value) use it to
/// point at the exact token instead of at the whole document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldPositions(Arc<BTreeMap<String, Position>>);

impl FieldPositions {
    pub(crate) fn new(positions: BTreeMap<String, Position>) -> Self {
        Self(Arc::new(positions))
    }

    /// The position of the value at `field`, if the document had that field.
    pub fn get(&self, field: &str) -> Option<Position> {
        self.0.get(field).copied()
    }
}

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 0-based index of the document among the file's non-empty documents.
    pub document: usize,
    /// Where the document's content starts (its first key).
    pub line: usize,
    pub column: usize,
    /// The document's bytes in the file text, including its `---` line.
    pub byte_range: Range<usize>,
    /// The position of every field the document spelled out.
    pub fields: FieldPositions,
}

impl Origin {
    /// The position of `field` in this document, or the document's start when the field was not
    /// written (it was defaulted).
    pub fn position_of(&self, field: &str) -> Position {
        self.fields.get(field).unwrap_or(Position {
            line: self.line,
            column: self.column,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The kinds of resource keel understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    MeshConfig,
    Workload,
    Service,
    TrafficPolicy,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::MeshConfig,
        Kind::Workload,
        Kind::Service,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    /// The `kind:` spelling in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MeshConfig => "MeshConfig",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        self != Kind::MeshConfig
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata` of every resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub name: String,
    /// Empty for cluster-scoped kinds; [`DEFAULT_NAMESPACE`] when a namespaced resource omits it.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Accepted so that Kubernetes manifests carrying annotations load unchanged; keel reads none.
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace.clone(), self.name.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// MeshConfig

/// Mesh-wide mutual TLS mode for inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum MtlsMode {
    /// Only mTLS from a mesh identity is accepted.
    Strict,
    /// mTLS and plaintext are both accepted (migration mode).
    #[default]
    Permissive,
    /// Plaintext only; the proxy neither originates nor requires mTLS.
    Disable,
}

/// What the outbound proxy does with traffic to a destination that is not a known service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum OutboundTrafficPolicy {
    /// Forward it unchanged to its original destination.
    #[default]
    AllowAny,
    /// Refuse it.
    RegistryOnly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfigSpec {
    /// SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Authorization policies in this namespace apply to the whole mesh.
    pub root_namespace: String,
    pub mtls: MtlsMode,
    /// Per-namespace override of `mtls`.
    pub namespace_mtls: BTreeMap<String, MtlsMode>,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

impl MeshConfigSpec {
    pub const DEFAULT_TRUST_DOMAIN: &'static str = "cluster.local";
    pub const DEFAULT_ROOT_NAMESPACE: &'static str = "keel-system";
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        Self {
            trust_domain: Self::DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: Self::DEFAULT_ROOT_NAMESPACE.to_owned(),
            mtls: MtlsMode::default(),
            namespace_mtls: BTreeMap::new(),
            outbound_traffic_policy: OutboundTrafficPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    pub meta: Metadata,
    pub origin: Origin,
    pub spec: MeshConfigSpec,
}

// ---------------------------------------------------------------------------------------------
// Workload

/// Where a workload runs. A zone implies a region and a subzone implies a zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub subzone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub service_account: String,
    /// Pod IPs; at least one, no duplicates.
    pub addresses: Vec<IpAddr>,
    pub locality: Locality,
    /// Load-balancing weight, at least 1.
    pub weight: u32,
    pub ready: bool,
    /// Whether the workload runs a keel sidecar (and so speaks mTLS).
    pub meshed: bool,
    /// Overrides the namespace and mesh mTLS mode. Only allowed on meshed workloads.
    pub mtls_mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub meta: Metadata,
    pub origin: Origin,
    pub spec: WorkloadSpec,
}

// ---------------------------------------------------------------------------------------------
// Service

/// Application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// The workload port traffic is forwarded to; equals `port` unless set.
    pub target_port: u16,
    /// `None`: detect the protocol from the first bytes of each connection.
    pub protocol: Option<Protocol>,
}

/// How a request path is matched. Exact and prefix values start with `/`; a regex must match the
/// whole path (it is anchored at both ends when evaluated, as Envoy's `safe_regex` is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// How a header value is matched; regexes match the whole value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
    /// Match requests where the header does *not* match.
    pub invert: bool,
}

/// Conditions a request must meet for a route to apply; all present conditions must hold. An
/// empty match matches every request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// The request's host (authority without port) is one of these, each a hostname of the
    /// service the route belongs to. Empty: any host.
    pub hosts: Vec<String>,
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDestination {
    pub service: ObjectKey,
    /// The destination service's port; `None` keeps the port the request arrived on.
    pub port: Option<u16>,
    /// Relative weight; 0 is allowed (a drained branch) as long as the route's total is positive.
    pub weight: u32,
}

/// Conditions under which a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum RetryOn {
    /// The connection to the endpoint could not be established (always safe to retry).
    ConnectFailure,
    /// The endpoint reset the stream or connection before responding.
    Reset,
    /// The response was 502, 503 or 504.
    GatewayError,
    /// The response was any 5xx.
    ServerError,
    /// The response status is listed in `retriable_status_codes`.
    RetriableStatusCodes,
}

/// gRPC status codes a request may be retried on (the set Envoy supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum GrpcCode {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Envoy's `num_retries`; default 1); 0 turns retries off
    /// for the route (routes without a retry policy get the proxy's default policy).
    pub attempts: u32,
    /// How long one attempt may wait for the response headers; then it counts as a timeout (for
    /// retries and outlier detection). Default none, as in Istio: a request may rightly wait long
    /// for its headers (a long poll, a long unary call). Without it (or a route `timeout`) an
    /// endpoint that accepts requests and never answers is never ejected.
    pub per_try_timeout: Option<Duration>,
    /// Default: `connect-failure` only, the one condition that is safe for any request.
    pub retry_on: Vec<RetryOn>,
    /// HTTP statuses (100..=599); non-empty exactly when `retry_on` has `RetriableStatusCodes`.
    pub retriable_status_codes: Vec<u16>,
    pub retriable_grpc_codes: Vec<GrpcCode>,
    /// Default 25 ms (Envoy).
    pub backoff_base: Duration,
    /// Default 10 × `backoff_base` (Envoy); never below `backoff_base`.
    pub backoff_max: Duration,
    /// Retry requests of any method on a reset, a timeout or a status, not only idempotent ones
    /// (a connect failure is retried for any method anyway). Default false: the app may have
    /// acted on the request, so only a route whose app deduplicates should set it. Envoy and
    /// Istio retry any method; keel only when asked. Set only with a `retry_on` condition it
    /// changes (reset, 5xx, gateway-error, retriable-status-codes).
    pub retry_non_idempotent: bool,
}

impl RetryPolicy {
    pub const DEFAULT_ATTEMPTS: u32 = 1;
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Unique within the service; used in metrics.
    pub name: String,
    pub matches: RouteMatch,
    /// At least one; the weights add up to more than zero.
    pub destinations: Vec<RouteDestination>,
    /// Bounds the whole request, every attempt and back-off, until the response headers. Default
    /// none (Istio's; Envoy's 15 s cuts long polls and long calls off).
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Names clients use for this service. When the YAML lists none: `<name>.<ns>.svc.cluster.local`,
    /// `<name>.<ns>` and `<name>`. Lower case, no trailing dot.
    pub hostnames: Vec<String>,
    pub vips: Vec<IpAddr>,
    /// At least one; port numbers and names are unique.
    pub ports: Vec<ServicePort>,
    /// Workloads in the service's namespace whose labels contain all of these. Empty selects
    /// nothing (as in Kubernetes, where such a service's endpoints are managed elsewhere).
    pub selector: BTreeMap<String, String>,
    /// Evaluated in order; a request that matches none goes to this service itself.
    pub routes: Vec<Route>,
    /// The namespaces whose proxies may see and call this service (Istio's `exportTo`);
    /// `None`, the default, is every namespace.
    pub export_to: Option<std::collections::BTreeSet<String>>,
}

impl ServiceSpec {
    /// Whether proxies in `namespace` see this service.
    pub fn visible_in(&self, namespace: &str) -> bool {
        self.export_to
            .as_ref()
            .is_none_or(|namespaces| namespaces.contains(namespace))
    }

    /// Whether every namespace that sees `other` sees this service too.
    pub fn visible_wherever(&self, other: &ServiceSpec) -> bool {
        match (&self.export_to, &other.export_to) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.is_subset(mine),
        }
    }

    /// The hostnames a service gets when its YAML lists none.
    pub fn default_hostnames(key: &ObjectKey) -> Vec<String> {
        vec![
            format!("{}.{}.svc.cluster.local", key.name, key.namespace),
            format!("{}.{}", key.name, key.namespace),
            key.name.clone(),
        ]
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub meta: Metadata,
    pub origin: Origin,
    pub spec: ServiceSpec,
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

/// What a consistent-hash balancer hashes on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashOn {
    SourceIp,
    Header(HeaderName),
    Cookie(String),
}

/// The load-balancing algorithm; the hashing ones carry what they hash on, so a hash key without
/// a hashing balancer cannot be expressed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two choices over active requests.
    #[default]
    LeastRequest,
    PeakEwma,
    Random,
    RingHash(HashOn),
    Maglev(HashOn),
}

/// Success-rate outlier detection (Envoy defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct SuccessRateEjection {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    /// Hosts below `mean - stdev_factor * stdev` are outliers. Finite and positive.
    pub stdev_factor: f64,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        Self {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

/// Failure-percentage outlier detection (Envoy defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePercentageEjection {
    /// Percent, 0..=100.
    pub threshold: u8,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        Self {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

/// Passive health checking. Defaults are Envoy's, but for the maximum ejection percentage (100,
/// see [`OutlierDetection::DEFAULT_MAX_EJECTION_PERCENT`]). Where Envoy differs from what a YAML
/// author would expect, keel follows Istio: consecutive-gateway-error, success-rate and
/// failure-percentage ejection run only when configured (in Envoy the gateway and
/// failure-percentage detectors default to 0% enforcement, and keel also leaves success-rate
/// ejection off unless asked, as Istio does).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// Eject after this many consecutive 5xx; 0 disables. Default 5.
    pub consecutive_5xx: u32,
    /// Eject after this many consecutive 502/503/504 (and connect failures); 0 disables.
    /// Default 0 (off).
    pub consecutive_gateway_errors: u32,
    /// Default 10 s.
    pub interval: Duration,
    /// Default 30 s.
    pub base_ejection_time: Duration,
    /// Default 300 s, or `base_ejection_time` if that is larger; never below it.
    pub max_ejection_time: Duration,
    /// Percent of hosts that may be ejected at once, 0..=100 (counted over all of the service's
    /// endpoints, every priority included, as Envoy counts them); whatever the percentage, one
    /// endpoint may be ejected when none is, unless it is 0. Default 100, where Envoy's and
    /// Istio's is 10: see [`OutlierDetection::DEFAULT_MAX_EJECTION_PERCENT`].
    pub max_ejection_percent: u8,
    /// Panic threshold: below this percentage of healthy hosts, balance over all hosts.
    /// 0..=100, 0 disables panic. Default 50 (Envoy; Istio uses 0).
    pub min_health_percent: u8,
    pub success_rate: Option<SuccessRateEjection>,
    pub failure_percentage: Option<FailurePercentageEjection>,
}

impl OutlierDetection {
    /// keel's default maximum ejection percentage: no cap of its own. Envoy and Istio default to
    /// 10%, which breaks locality failover, the case outlier detection matters most for: when a
    /// zone of two endpoints dies in a service of six, 10% (even with keel's "at least one")
    /// ejects one of them, the zone stays 50% healthy, keeps 70% of the load on the dead one, and
    /// every such request needs a retry until the retry budget runs out. What a cap protects
    /// against (ejecting so much that the rest is overwhelmed, or ejecting everything on a
    /// failure that is not the endpoints') is the panic threshold's job, and keel keeps Envoy's
    /// 50% (Istio turns panic off): a priority with fewer than half of its endpoints healthy,
    /// when the other priorities cannot make up for it, balances over all of them again. With
    /// `min_health_percent: 0` nothing takes that place, so set a cap along with it. Linkerd's
    /// failure accrual has no cap either.
    pub const DEFAULT_MAX_EJECTION_PERCENT: u8 = 100;
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: Self::DEFAULT_MAX_EJECTION_PERCENT,
            min_health_percent: 50,
            success_rate: None,
            failure_percentage: None,
        }
    }
}

/// When clients in region `from` run out of healthy local endpoints, prefer region `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRule {
    pub from: String,
    pub to: String,
}

/// A locality pattern `region[/zone[/subzone]]`, where the last segment may be `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalityPattern(pub String);

impl LocalityPattern {
    /// Whether `locality` falls under this pattern.
    pub fn matches(&self, locality: &Locality) -> bool {
        let parts = [&locality.region, &locality.zone, &locality.subzone];
        for (i, segment) in self.0.split('/').enumerate() {
            if segment == "*" {
                return true;
            }
            match parts.get(i) {
                Some(Some(value)) if value == segment => {}
                _ => return false,
            }
        }
        true
    }
}

impl fmt::Display for LocalityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Traffic from clients in `from` is spread over the `to` localities by weight (which add up to
/// 100). Endpoints in localities not listed receive nothing. A client that no rule's `from`
/// matches gets the failover priorities (nearest first), where Istio applies neither and spreads
/// it over every endpoint alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributeRule {
    pub from: LocalityPattern,
    pub to: BTreeMap<LocalityPattern, u32>,
}

/// A `failoverPriority` entry: a label key, optionally with the value to match
/// (`topology.kubernetes.io/region` or `topology.kubernetes.io/region=eu-west`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverLabel {
    pub key: String,
    pub value: Option<String>,
}

/// Locality-aware balancing (Istio's `localityLbSetting`). `failover` and `distribute` are
/// mutually exclusive, as in Istio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityFailover {
    pub enabled: bool,
    pub failover_priority: Vec<FailoverLabel>,
    pub failover: Vec<FailoverRule>,
    pub distribute: Vec<DistributeRule>,
}

impl Default for LocalityFailover {
    fn default() -> Self {
        Self {
            enabled: true,
            failover_priority: Vec::new(),
            failover: Vec::new(),
            distribute: Vec::new(),
        }
    }
}

/// Per-service limits (Envoy's circuit-breaker thresholds). Connections, pending and active
/// requests default to Envoy's 1024. Concurrent retries default to no limit of their own
/// (Istio's default): the [`RetryBudget`] is what bounds them unless `max_retries` is set lower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// `u32::MAX`: no limit beyond the retry budget.
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: u32::MAX,
        }
    }
}

/// How many retries a service may receive (Linkerd's retry budget): `percent` of the requests
/// of the last `ttl`, plus `min_retries_per_second` over that window. Defaults 20%, 10 per second
/// and 10 s: retries add at most a fifth to a failing service's load, and a burst of failures
/// (an endpoint or a zone dying under load) is still retried in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudget {
    /// 0..=100.
    pub percent: u8,
    pub min_retries_per_second: u32,
    pub ttl: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: 20,
            min_retries_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicySpec {
    /// The service this policy configures.
    pub target: ObjectKey,
    pub load_balancer: LoadBalancer,
    /// `None`: no passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// `None`: no locality-aware balancing.
    pub locality_failover: Option<LocalityFailover>,
    pub circuit_breaker: CircuitBreaker,
    pub retry_budget: RetryBudget,
    /// Default 5 s (Envoy).
    pub connect_timeout: Duration,
    /// Default 1 h (Envoy's upstream idle timeout).
    pub idle_timeout: Duration,
}

impl TrafficPolicySpec {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

    /// The policy a service gets when no TrafficPolicy targets it.
    pub fn default_for(target: ObjectKey) -> Self {
        Self {
            target,
            load_balancer: LoadBalancer::default(),
            outlier_detection: None,
            locality_failover: None,
            circuit_breaker: CircuitBreaker::default(),
            retry_budget: RetryBudget::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicy {
    pub meta: Metadata,
    pub origin: Origin,
    pub spec: TrafficPolicySpec,
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    /// Log a match without affecting the decision.
    Audit,
}

/// A string match in Istio's form: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Any => true,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

/// Who a request comes from; every non-empty list must match (lists are OR within, AND across).
/// At least one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// Peer identities without the `spiffe://` scheme: `<td>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Bare addresses are stored as host networks (/32, /128).
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

/// What a request does; same combination rules as [`Source`]. At least one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    pub methods: Vec<Method>,
    pub not_methods: Vec<Method>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
}

/// A rule matches when any `from` matches (or `from` is empty) and any `to` matches (or `to` is
/// empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizationRule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// Labels a workload must carry. Empty: every workload in the namespace (every workload in
    /// the mesh when the policy lives in the root namespace).
    pub selector: BTreeMap<String, String>,
    pub action: AuthorizationAction,
    /// An ALLOW policy with no rules allows nothing; a DENY policy with no rules denies nothing
    /// (Istio's semantics).
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    pub meta: Metadata,
    pub origin: Origin,
    pub spec: AuthorizationPolicySpec,
}

// ---------------------------------------------------------------------------------------------

/// Any one resource, as read from a document. Shared: the file it came from and every model
/// built from that file hold the same allocation, so a model is rebuilt without copying the
/// resources that did not change.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    MeshConfig(Arc<MeshConfig>),
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    TrafficPolicy(Arc<TrafficPolicy>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::MeshConfig(_) => Kind::MeshConfig,
            Resource::Workload(_) => Kind::Workload,
            Resource::Service(_) => Kind::Service,
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    pub fn meta(&self) -> &Metadata {
        match self {
            Resource::MeshConfig(r) => &r.meta,
            Resource::Workload(r) => &r.meta,
            Resource::Service(r) => &r.meta,
            Resource::TrafficPolicy(r) => &r.meta,
            Resource::AuthorizationPolicy(r) => &r.meta,
        }
    }

    /// Namespace and name; MeshConfig's namespace is empty.
    pub fn key(&self) -> ObjectKey {
        self.meta().key()
    }

    /// Whether two resources say the same thing, wherever each was written.
    pub fn same_content(&self, other: &Resource) -> bool {
        match (self, other) {
            (Resource::MeshConfig(a), Resource::MeshConfig(b)) => {
                a.meta == b.meta && a.spec == b.spec
            }
            (Resource::Workload(a), Resource::Workload(b)) => a.meta == b.meta && a.spec == b.spec,
            (Resource::Service(a), Resource::Service(b)) => a.meta == b.meta && a.spec == b.spec,
            (Resource::TrafficPolicy(a), Resource::TrafficPolicy(b)) => {
                a.meta == b.meta && a.spec == b.spec
            }
            (Resource::AuthorizationPolicy(a), Resource::AuthorizationPolicy(b)) => {
                a.meta == b.meta && a.spec == b.spec
            }
            _ => false,
        }
    }

    pub fn origin(&self) -> &Origin {
        match self {
            Resource::MeshConfig(r) => &r.origin,
            Resource::Workload(r) => &r.origin,
            Resource::Service(r) => &r.origin,
            Resource::TrafficPolicy(r) => &r.origin,
            Resource::AuthorizationPolicy(r) => &r.origin,
        }
    }
}

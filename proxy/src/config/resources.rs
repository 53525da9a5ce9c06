//! The validated form of each discovery resource, and its conversion from proto.
//!
//! Every `from_proto` here checks one resource's *shape*: addresses parse, ports are in range,
//! regexes compile (once, here), enums are known, required fields are present, weights add up.
//! It never looks at other resources: references between resources (a route naming another
//! service) are resolved when a [`Config`](super::Config) is assembled, because the discovery
//! stream delivers each type independently and a reference may legitimately arrive before its
//! target. Nothing in this file may panic on any input.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method};
use ipnet::IpNet;
use keel_proto::limits;
use keel_proto::spiffe::SpiffeId;
use keel_proto::v1 as pb;
use regex::Regex;
use serde::{Serialize, Serializer};

use super::error::{FieldError, Path, Problem};

type Checked<T> = Result<T, FieldError>;

/// Serializers for the std and http types that have no serde form of their own.
pub(super) mod ser {
    use std::time::Duration;

    use http::{HeaderName, Method};
    use serde::Serializer;

    /// `Duration`'s debug form (`5s`, `250ms`), which is what a human wants to read.
    pub fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{d:?}"))
    }

    pub fn opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn method<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub fn opt_method<S: Serializer>(m: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => method(m, s),
            None => s.serialize_none(),
        }
    }

    pub fn methods<S: Serializer>(v: &[Method], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(Method::as_str))
    }

    pub fn opt_display<T: std::fmt::Display, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn header_name<S: Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Field checks shared by every resource.

fn non_empty<'s>(at: Path<'_>, value: &'s str) -> Checked<&'s str> {
    if value.is_empty() {
        Err(at.error(Problem::Empty))
    } else {
        Ok(value)
    }
}

fn required<T>(at: Path<'_>, value: Option<T>) -> Checked<T> {
    value.ok_or_else(|| at.error(Problem::Missing))
}

fn enumeration<E: TryFrom<i32>>(at: Path<'_>, what: &'static str, value: i32) -> Checked<E> {
    E::try_from(value).map_err(|_| at.error(Problem::UnknownEnum { what, value }))
}

fn port(at: Path<'_>, value: u32) -> Checked<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(at.error(Problem::BadPort { value })),
    }
}

/// 0 means "not set".
fn optional_port(at: Path<'_>, value: u32) -> Checked<Option<u16>> {
    if value == 0 {
        Ok(None)
    } else {
        port(at, value).map(Some)
    }
}

fn ip(at: Path<'_>, value: &str) -> Checked<IpAddr> {
    value.parse().map_err(|_| {
        at.error(Problem::BadIp {
            value: value.to_owned(),
        })
    })
}

/// An address traffic can be sent to: not `0.0.0.0`/`::`, not multicast or broadcast.
fn unicast_ip(at: Path<'_>, value: &str) -> Checked<IpAddr> {
    let addr = ip(at, value)?;
    let broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || broadcast {
        return Err(at.error(Problem::NotUnicast { value: addr }));
    }
    Ok(addr)
}

/// A duration of at most `max`, one of the ceilings of [`keel_proto::limits`]: the control plane
/// refuses longer ones too, but a proxy checks what it is sent rather than trust it, since a huge
/// value would overflow the clock arithmetic it feeds (`Instant + interval`).
fn duration(at: Path<'_>, value: prost_types::Duration, max: Duration) -> Checked<Duration> {
    let d = Duration::try_from(value).map_err(|e| {
        at.error(Problem::BadDuration {
            reason: e.to_string(),
        })
    })?;
    if d > max {
        return Err(at.error(Problem::BadDuration {
            reason: format!("{d:?} is longer than the most this field allows, {max:?}"),
        }));
    }
    Ok(d)
}

/// Absent or zero: `None` (as in Envoy, a zero timeout means "no timeout").
fn optional_duration(
    at: Path<'_>,
    value: Option<prost_types::Duration>,
    max: Duration,
) -> Checked<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(d) => Ok(Some(duration(at, d, max)?).filter(|d| !d.is_zero())),
    }
}

/// Absent or zero: `default`.
fn duration_or(
    at: Path<'_>,
    value: Option<prost_types::Duration>,
    default: Duration,
    max: Duration,
) -> Checked<Duration> {
    Ok(optional_duration(at, value, max)?.unwrap_or(default))
}

fn percent(at: Path<'_>, value: u32) -> Checked<u8> {
    match u8::try_from(value) {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(at.error(Problem::OutOfRange {
            value: u64::from(value),
            min: 0,
            max: 100,
        })),
    }
}

/// The resource's name must be what its body says it is.
fn named(at: Path<'_>, resource_name: &str, found: &str) -> Checked<()> {
    if resource_name == found {
        Ok(())
    } else {
        Err(at.error(Problem::NameMismatch {
            expected: resource_name.to_owned(),
            found: found.to_owned(),
        }))
    }
}

/// `<namespace>/<name>`, both non-empty.
fn service_name(at: Path<'_>, value: &str) -> Checked<()> {
    non_empty(at, value)?;
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(()),
        _ => Err(at.error(Problem::Malformed {
            value: value.to_owned(),
            expected: "a name of the form \"<namespace>/<name>\"",
        })),
    }
}

/// A namespace or a resource's own name: non-empty, no `/`.
fn name_segment(at: Path<'_>, value: &str) -> Checked<()> {
    non_empty(at, value)?;
    if value.contains('/') {
        return Err(at.error(Problem::Malformed {
            value: value.to_owned(),
            expected: "a name without '/'",
        }));
    }
    Ok(())
}

fn method(at: Path<'_>, value: &str) -> Checked<Method> {
    non_empty(at, value)?;
    Method::from_bytes(value.as_bytes()).map_err(|_| {
        at.error(Problem::BadMethod {
            value: value.to_owned(),
        })
    })
}

fn header_name(at: Path<'_>, value: &str) -> Checked<HeaderName> {
    non_empty(at, value)?;
    HeaderName::from_bytes(value.as_bytes()).map_err(|_| {
        at.error(Problem::BadHeaderName {
            value: value.to_owned(),
        })
    })
}

/// Remembers values already seen in a list and rejects repeats.
struct Unique<T>(HashSet<T>);

impl<T: std::hash::Hash + Eq + fmt::Display> Unique<T> {
    fn new() -> Self {
        Unique(HashSet::new())
    }

    fn check(&mut self, at: Path<'_>, value: T) -> Checked<()> {
        if self.0.contains(&value) {
            return Err(at.error(Problem::Duplicate {
                value: value.to_string(),
            }));
        }
        self.0.insert(value);
        Ok(())
    }
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-` and `_` (SPIFFE ID spec §2.1).
fn trust_domain(at: Path<'_>, value: &str) -> Checked<()> {
    non_empty(at, value)?;
    let valid = value.len() <= 255
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(at.error(Problem::Malformed {
            value: value.to_owned(),
            expected: "a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')",
        }))
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
fn spiffe_id(at: Path<'_>, value: &str) -> Checked<SpiffeId> {
    value.parse().map_err(|_| {
        at.error(Problem::Malformed {
            value: value.to_owned(),
            expected: "a SPIFFE ID \"spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>\"",
        })
    })
}

// ---------------------------------------------------------------------------------------------
// MeshConfig

/// The proxy's inbound mutual TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Only mTLS from a mesh identity is accepted.
    Strict,
    /// mTLS and plaintext are both accepted.
    #[default]
    Permissive,
    /// Plaintext only.
    Disable,
}

/// What the outbound side does with traffic to a destination that is not a known service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundTrafficPolicy {
    /// Forward it unchanged to its original destination.
    #[default]
    AllowAny,
    /// Refuse it.
    RegistryOnly,
}

/// A root of the mesh's certificate authority.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct TrustAnchor {
    pub id: String,
    /// DER; parsed as an X.509 certificate when received.
    #[serde(skip)]
    pub certificate: Arc<[u8]>,
    pub signing: bool,
}

impl fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchor")
            .field("id", &self.id)
            .field(
                "certificate",
                &format_args!("{} bytes", self.certificate.len()),
            )
            .field("signing", &self.signing)
            .finish()
    }
}

/// Mesh-wide settings as they apply to this proxy (resource name `mesh`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeshSettings {
    pub trust_domain: String,
    pub mtls_mode: MtlsMode,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The trust bundle; empty when the control plane runs no CA.
    pub trust_anchors: Vec<TrustAnchor>,
    /// The labels of the proxy's own workload, for locality failover by `failover_priority`.
    pub workload_labels: BTreeMap<String, String>,
}

impl MeshSettings {
    /// The only name a MeshConfig resource may have.
    pub const RESOURCE_NAME: &'static str = "mesh";
    pub const DEFAULT_TRUST_DOMAIN: &'static str = "cluster.local";

    pub(super) fn from_proto(name: &str, m: pb::MeshConfig) -> Checked<MeshSettings> {
        let root = Path::Root;
        if name != Self::RESOURCE_NAME {
            return Err(root.field("name").error(Problem::Malformed {
                value: name.to_owned(),
                expected: "\"mesh\"",
            }));
        }
        trust_domain(root.field("trust_domain"), &m.trust_domain)?;
        let mtls_mode = match enumeration(root.field("mtls_mode"), "MtlsMode", m.mtls_mode)? {
            pb::MtlsMode::Strict => MtlsMode::Strict,
            pb::MtlsMode::Permissive => MtlsMode::Permissive,
            pb::MtlsMode::Disable => MtlsMode::Disable,
        };
        let outbound_traffic_policy = match enumeration(
            root.field("outbound_traffic_policy"),
            "OutboundTrafficPolicy",
            m.outbound_traffic_policy,
        )? {
            pb::OutboundTrafficPolicy::AllowAny => OutboundTrafficPolicy::AllowAny,
            pb::OutboundTrafficPolicy::RegistryOnly => OutboundTrafficPolicy::RegistryOnly,
        };
        let mut trust_anchors = Vec::with_capacity(m.trust_anchors.len());
        let anchors_at = root.field("trust_anchors");
        for (i, anchor) in m.trust_anchors.into_iter().enumerate() {
            let at = anchors_at.index(i);
            non_empty(at.field("id"), &anchor.id)?;
            if x509_parser::parse_x509_certificate(&anchor.certificate).is_err() {
                return Err(at.field("certificate").error(Problem::Malformed {
                    value: format!("{} bytes", anchor.certificate.len()),
                    expected: "a DER X.509 certificate",
                }));
            }
            trust_anchors.push(TrustAnchor {
                id: anchor.id,
                certificate: anchor.certificate.into(),
                signing: anchor.signing,
            });
        }
        if trust_anchors.iter().filter(|a| a.signing).count() > 1 {
            return Err(anchors_at.error(Problem::Inconsistent {
                reason: "more than one anchor is marked as signing",
            }));
        }
        let labels_at = root.field("workload_labels");
        for key in m.workload_labels.keys() {
            non_empty(labels_at, key)?;
        }
        Ok(MeshSettings {
            trust_domain: m.trust_domain,
            mtls_mode,
            outbound_traffic_policy,
            trust_anchors,
            workload_labels: m.workload_labels,
        })
    }
}

/// Used until the control plane sends a MeshConfig: the defaults of the mesh model.
impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            trust_domain: Self::DEFAULT_TRUST_DOMAIN.to_owned(),
            mtls_mode: MtlsMode::default(),
            outbound_traffic_policy: OutboundTrafficPolicy::default(),
            trust_anchors: Vec::new(),
            workload_labels: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Service

/// The application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Not declared: detect it from the first bytes of each connection.
    Detect,
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    /// Whether requests on this port are HTTP (and so can be routed per request).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    /// The port clients use, on a VIP or a hostname.
    pub port: u16,
    /// The port the workload listens on.
    pub target_port: u16,
    pub protocol: Protocol,
}

/// A service the proxy may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// `<namespace>/<name>`, the key every other resource uses for it.
    pub name: String,
    pub namespace: String,
    /// Lower case, without a trailing dot.
    pub hostnames: Vec<String>,
    pub vips: Vec<IpAddr>,
    /// At least one; port numbers are unique.
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub(super) fn from_proto(name: &str, s: pb::Service) -> Checked<Service> {
        let root = Path::Root;
        name_segment(root.field("namespace"), &s.namespace)?;
        name_segment(root.field("name"), &s.name)?;
        named(
            root.field("name"),
            name,
            &format!("{}/{}", s.namespace, s.name),
        )?;

        let hostnames_at = root.field("hostnames");
        let mut seen = Unique::new();
        let mut hostnames = Vec::with_capacity(s.hostnames.len());
        for (i, raw) in s.hostnames.iter().enumerate() {
            let at = hostnames_at.index(i);
            let host = hostname(at, raw)?;
            seen.check(at, host.clone())?;
            hostnames.push(host);
        }

        let vips_at = root.field("vips");
        let mut seen = Unique::new();
        let mut vips = Vec::with_capacity(s.vips.len());
        for (i, raw) in s.vips.iter().enumerate() {
            let at = vips_at.index(i);
            let vip = unicast_ip(at, raw)?;
            seen.check(at, vip)?;
            vips.push(vip);
        }

        let ports_at = root.field("ports");
        if s.ports.is_empty() {
            return Err(ports_at.error(Problem::Empty));
        }
        let mut numbers = Unique::new();
        let mut names = Unique::new();
        let mut ports = Vec::with_capacity(s.ports.len());
        for (i, p) in s.ports.into_iter().enumerate() {
            let at = ports_at.index(i);
            let number = port(at.field("port"), p.port)?;
            numbers.check(at.field("port"), number)?;
            if !p.name.is_empty() {
                names.check(at.field("name"), p.name.clone())?;
            }
            // As in Kubernetes, an unset target port is the service port.
            let target_port =
                optional_port(at.field("target_port"), p.target_port)?.unwrap_or(number);
            let protocol = match enumeration(at.field("protocol"), "Protocol", p.protocol)? {
                pb::Protocol::Unspecified => Protocol::Detect,
                pb::Protocol::Http => Protocol::Http,
                pb::Protocol::Http2 => Protocol::Http2,
                pb::Protocol::Grpc => Protocol::Grpc,
                pb::Protocol::Tcp => Protocol::Tcp,
            };
            ports.push(ServicePort {
                name: Some(p.name).filter(|n| !n.is_empty()),
                port: number,
                target_port,
                protocol,
            });
        }
        Ok(Service {
            name: name.to_owned(),
            namespace: s.namespace,
            hostnames,
            vips,
            ports,
        })
    }
}

/// A DNS name as clients write it in a Host header: normalized to lower case without the
/// trailing dot. An IP literal is refused (it belongs in `vips`).
fn hostname(at: Path<'_>, raw: &str) -> Checked<String> {
    let host = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if host.is_empty() {
        return Err(at.error(Problem::Empty));
    }
    let valid = host.len() <= 253
        && host.parse::<IpAddr>().is_err()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(host)
    } else {
        Err(at.error(Problem::Malformed {
            value: raw.to_owned(),
            expected: "a DNS hostname",
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// RouteTable

/// A regex compiled once, anchored at both ends (it must match the whole value, as Envoy's
/// `safe_regex` does). Serialized as the pattern the control plane sent.
#[derive(Debug, Clone)]
pub struct CompiledRegex {
    pattern: String,
    regex: Regex,
}

impl CompiledRegex {
    fn new(at: Path<'_>, pattern: &str) -> Checked<CompiledRegex> {
        let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|error| {
            at.error(Problem::BadRegex {
                pattern: pattern.to_owned(),
                error,
            })
        })?;
        Ok(CompiledRegex {
            pattern: pattern.to_owned(),
            regex,
        })
    }

    /// The pattern as configured, before anchoring.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for CompiledRegex {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Serialize for CompiledRegex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pattern)
    }
}

/// How a path or a header value is matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(CompiledRegex),
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(s) => value.starts_with(s.as_str()),
            StringMatcher::Regex(r) => r.is_match(value),
        }
    }

    fn from_proto(at: Path<'_>, m: Option<pb::StringMatch>) -> Checked<StringMatcher> {
        use pb::string_match::Kind;
        match required(at, m.and_then(|m| m.kind))? {
            Kind::Exact(s) => Ok(StringMatcher::Exact(s)),
            Kind::Prefix(s) => Ok(StringMatcher::Prefix(s)),
            Kind::Regex(r) => CompiledRegex::new(at.field("regex"), &r).map(StringMatcher::Regex),
        }
    }
}

/// A condition on a request header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "ser::header_name")]
    pub name: HeaderName,
    pub value: StringMatcher,
    /// Match requests whose header does *not* match (including requests without the header).
    pub invert: bool,
}

impl HeaderMatch {
    /// A header sent several times matches when any of its values does. A value that is not
    /// visible ASCII never matches.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let any = headers
            .get_all(&self.name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| self.value.matches(v)));
        any != self.invert
    }
}

/// The conditions a request must meet for a route to apply; all present conditions must hold,
/// and an empty match matches every request.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RouteMatch {
    /// The request's host (its authority without the port, lower case, without a trailing dot)
    /// is one of these; empty: any host. A request addressed by IP matches none.
    pub hosts: Vec<String>,
    /// Matched against the path without its query string.
    pub path: Option<StringMatcher>,
    #[serde(serialize_with = "ser::opt_method")]
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
}

impl RouteMatch {
    /// `authority`: the request's `:authority` or `Host`, as received.
    pub fn matches(
        &self,
        authority: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        self.host_matches(authority)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.path.as_ref().is_none_or(|p| p.matches(path))
            && self.headers.iter().all(|h| h.matches(headers))
    }

    fn host_matches(&self, authority: Option<&str>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some((host, _)) = authority.and_then(super::split_authority) else {
            return false;
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// Where a share of a route's requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedDestination {
    /// `<namespace>/<name>`; resolved against the services when the config is assembled.
    pub service: String,
    /// `None`: the port the request arrived on.
    pub port: Option<u16>,
    pub weight: u32,
}

/// Conditions under which a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RetryOn {
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "gateway-error")]
    GatewayError,
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

impl RetryOn {
    const EXPECTED: &'static str =
        "connect-failure, reset, 5xx, gateway-error, retriable-status-codes";

    fn parse(at: Path<'_>, value: &str) -> Checked<RetryOn> {
        Ok(match value {
            "connect-failure" => RetryOn::ConnectFailure,
            "reset" => RetryOn::Reset,
            "5xx" => RetryOn::ServerError,
            "gateway-error" => RetryOn::GatewayError,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            _ => {
                return Err(at.error(Problem::UnknownName {
                    what: "retry condition",
                    value: value.to_owned(),
                    expected: Self::EXPECTED,
                }));
            }
        })
    }
}

/// gRPC status codes a request may be retried on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrpcCode {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl GrpcCode {
    const EXPECTED: &'static str =
        "cancelled, deadline-exceeded, internal, resource-exhausted, unavailable";

    /// The numeric code in a `grpc-status` trailer.
    pub fn code(self) -> i32 {
        match self {
            GrpcCode::Cancelled => 1,
            GrpcCode::DeadlineExceeded => 4,
            GrpcCode::ResourceExhausted => 8,
            GrpcCode::Internal => 13,
            GrpcCode::Unavailable => 14,
        }
    }

    fn parse(at: Path<'_>, value: &str) -> Checked<GrpcCode> {
        Ok(match value {
            "cancelled" => GrpcCode::Cancelled,
            "deadline-exceeded" => GrpcCode::DeadlineExceeded,
            "internal" => GrpcCode::Internal,
            "resource-exhausted" => GrpcCode::ResourceExhausted,
            "unavailable" => GrpcCode::Unavailable,
            _ => {
                return Err(at.error(Problem::UnknownName {
                    what: "gRPC code",
                    value: value.to_owned(),
                    expected: Self::EXPECTED,
                }));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    #[serde(serialize_with = "ser::opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// Never empty: `connect-failure` when the control plane lists none.
    pub retry_on: Vec<RetryOn>,
    pub retriable_status_codes: Vec<u16>,
    pub retriable_grpc_codes: Vec<GrpcCode>,
    #[serde(serialize_with = "ser::duration")]
    pub backoff_base: Duration,
    /// Never below `backoff_base`.
    #[serde(serialize_with = "ser::duration")]
    pub backoff_max: Duration,
    /// Retry any method on the conditions above, not only idempotent ones; only with a
    /// condition besides `connect-failure` (which is retried for any method anyway).
    pub retry_non_idempotent: bool,
}

impl RetryPolicy {
    /// Envoy's default retry back-off base.
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
    /// Retries of a route's policy that does not say (Envoy's `num_retries`, the mesh model's
    /// default).
    pub const DEFAULT_ATTEMPTS: u32 = 1;

    fn from_proto(at: Path<'_>, r: pb::RetryPolicy) -> Checked<RetryPolicy> {
        let per_try_timeout = optional_duration(
            at.field("per_try_timeout"),
            r.per_try_timeout,
            limits::REQUEST_TIMEOUT,
        )?;

        let on_at = at.field("retry_on");
        let mut seen = Unique::new();
        let mut retry_on = Vec::with_capacity(r.retry_on.len().max(1));
        for (i, name) in r.retry_on.iter().enumerate() {
            let condition = RetryOn::parse(on_at.index(i), name)?;
            seen.check(on_at.index(i), name.as_str())?;
            retry_on.push(condition);
        }
        if retry_on.is_empty() {
            retry_on.push(RetryOn::ConnectFailure);
        }

        let codes_at = at.field("retriable_status_codes");
        let mut retriable_status_codes = Vec::with_capacity(r.retriable_status_codes.len());
        for (i, code) in r.retriable_status_codes.iter().enumerate() {
            match u16::try_from(*code) {
                Ok(c) if (100..=599).contains(&c) => retriable_status_codes.push(c),
                _ => {
                    return Err(codes_at.index(i).error(Problem::OutOfRange {
                        value: u64::from(*code),
                        min: 100,
                        max: 599,
                    }));
                }
            }
        }
        let wants_codes = retry_on.contains(&RetryOn::RetriableStatusCodes);
        if wants_codes && retriable_status_codes.is_empty() {
            return Err(codes_at.error(Problem::Inconsistent {
                reason: "retry_on has retriable-status-codes but no status code is listed",
            }));
        }
        if !wants_codes && !retriable_status_codes.is_empty() {
            return Err(codes_at.error(Problem::Inconsistent {
                reason: "status codes are listed but retry_on lacks retriable-status-codes",
            }));
        }

        let grpc_at = at.field("retriable_grpc_codes");
        let retriable_grpc_codes = r
            .retriable_grpc_codes
            .iter()
            .enumerate()
            .map(|(i, c)| GrpcCode::parse(grpc_at.index(i), c))
            .collect::<Checked<Vec<_>>>()?;

        let backoff_base = duration_or(
            at.field("backoff_base"),
            r.backoff_base,
            Self::DEFAULT_BACKOFF_BASE,
            limits::RETRY_BACKOFF,
        )?;
        // Envoy's default: ten times the base.
        let backoff_max = duration_or(
            at.field("backoff_max"),
            r.backoff_max,
            backoff_base.saturating_mul(10).min(limits::RETRY_BACKOFF),
            limits::RETRY_BACKOFF,
        )?;
        if backoff_max < backoff_base {
            return Err(at.field("backoff_max").error(Problem::Inconsistent {
                reason: "backoff_max is below backoff_base",
            }));
        }
        if r.retry_non_idempotent && retry_on.iter().all(|c| *c == RetryOn::ConnectFailure) {
            return Err(at
                .field("retry_non_idempotent")
                .error(Problem::Inconsistent {
                    reason: "retry_non_idempotent is set but retry_on has no condition it changes",
                }));
        }
        Ok(RetryPolicy {
            attempts: r.attempts.unwrap_or(Self::DEFAULT_ATTEMPTS),
            per_try_timeout,
            retry_on,
            retriable_status_codes,
            retriable_grpc_codes,
            backoff_base,
            backoff_max,
            retry_non_idempotent: r.retry_non_idempotent,
        })
    }
}

/// One route of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Unique within the route table; used in metrics.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// At least one; the weights add up to more than zero.
    pub destinations: Vec<WeightedDestination>,
    #[serde(skip)]
    total_weight: u64,
    #[serde(serialize_with = "ser::opt_duration")]
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

impl Route {
    /// The sum of the destinations' weights; always positive.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// The destination that owns `point` on the line of weights, for a `point` drawn uniformly
    /// from `0..total_weight()` (larger points wrap around). Destinations of weight 0 are never
    /// picked.
    pub fn pick(&self, point: u64) -> Option<&WeightedDestination> {
        let mut remaining = point % self.total_weight.max(1);
        for d in self.destinations.iter().filter(|d| d.weight > 0) {
            if remaining < u64::from(d.weight) {
                return Some(d);
            }
            remaining -= u64::from(d.weight);
        }
        None
    }

    fn from_proto(at: Path<'_>, r: pb::Route) -> Checked<Route> {
        non_empty(at.field("name"), &r.name)?;
        let matcher = match r.r#match {
            None => RouteMatch::default(),
            Some(m) => {
                let match_at = at.field("match");
                let path = match m.path {
                    None => None,
                    Some(p) => {
                        let path_at = match_at.field("path");
                        let matcher = StringMatcher::from_proto(path_at, Some(p))?;
                        if let StringMatcher::Exact(s) | StringMatcher::Prefix(s) = &matcher
                            && !s.starts_with('/')
                        {
                            return Err(path_at.error(Problem::Malformed {
                                value: s.clone(),
                                expected: "a path starting with '/'",
                            }));
                        }
                        Some(matcher)
                    }
                };
                let headers_at = match_at.field("headers");
                let headers = m
                    .headers
                    .into_iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let at = headers_at.index(i);
                        Ok(HeaderMatch {
                            name: header_name(at.field("name"), &h.name)?,
                            value: StringMatcher::from_proto(at.field("value"), h.value)?,
                            invert: h.invert,
                        })
                    })
                    .collect::<Checked<Vec<_>>>()?;
                let method = if m.method.is_empty() {
                    None
                } else {
                    Some(method(match_at.field("method"), &m.method)?)
                };
                let hosts_at = match_at.field("hosts");
                for (i, host) in m.hosts.iter().enumerate() {
                    let valid = !host.is_empty()
                        && host.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                        });
                    if !valid {
                        return Err(hosts_at.index(i).error(Problem::Malformed {
                            value: host.clone(),
                            expected: "a lower case hostname",
                        }));
                    }
                }
                RouteMatch {
                    hosts: m.hosts,
                    path,
                    method,
                    headers,
                }
            }
        };

        let dest_at = at.field("destinations");
        if r.destinations.is_empty() {
            return Err(dest_at.error(Problem::Empty));
        }
        let mut total_weight = 0u64;
        let mut destinations = Vec::with_capacity(r.destinations.len());
        for (i, d) in r.destinations.into_iter().enumerate() {
            let at = dest_at.index(i);
            service_name(at.field("service"), &d.service)?;
            let port = optional_port(at.field("port"), d.port)?;
            total_weight += u64::from(d.weight);
            destinations.push(WeightedDestination {
                service: d.service,
                port,
                weight: d.weight,
            });
        }
        if total_weight == 0 {
            return Err(dest_at.error(Problem::ZeroWeights));
        }
        Ok(Route {
            name: r.name,
            matcher,
            destinations,
            total_weight,
            timeout: optional_duration(at.field("timeout"), r.timeout, limits::REQUEST_TIMEOUT)?,
            retry: r
                .retry
                .map(|p| RetryPolicy::from_proto(at.field("retry"), p))
                .transpose()?,
        })
    }
}

/// The routes of one service, in match order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteTable {
    pub service: String,
    pub routes: Vec<Route>,
}

impl RouteTable {
    /// The table of a service that has no routes: every request goes to the service itself.
    pub fn empty(service: &str) -> RouteTable {
        RouteTable {
            service: service.to_owned(),
            routes: Vec::new(),
        }
    }

    /// The first route whose match holds. `None`: the request goes to the service itself (on
    /// the port it arrived on), which is the mesh model's implicit last route.
    pub fn select(
        &self,
        authority: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(authority, method, path, headers))
    }

    pub(super) fn from_proto(name: &str, t: pb::RouteTable) -> Checked<RouteTable> {
        let root = Path::Root;
        service_name(root.field("service"), &t.service)?;
        named(root.field("service"), name, &t.service)?;
        let routes_at = root.field("routes");
        let mut names = Unique::new();
        let mut routes = Vec::with_capacity(t.routes.len());
        for (i, r) in t.routes.into_iter().enumerate() {
            let at = routes_at.index(i);
            let route = Route::from_proto(at, r)?;
            names.check(at.field("name"), route.name.clone())?;
            routes.push(route);
        }
        Ok(RouteTable {
            service: t.service,
            routes,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints

/// Where a workload runs. Empty strings are unknown levels; a zone implies a region and a
/// subzone implies a zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    fn from_proto(at: Path<'_>, l: Option<pb::Locality>) -> Checked<Locality> {
        let Some(l) = l else {
            return Ok(Locality::default());
        };
        if !l.zone.is_empty() && l.region.is_empty() {
            return Err(at.field("region").error(Problem::Inconsistent {
                reason: "a zone is set without a region",
            }));
        }
        if !l.subzone.is_empty() && l.zone.is_empty() {
            return Err(at.field("zone").error(Problem::Inconsistent {
                reason: "a subzone is set without a zone",
            }));
        }
        Ok(Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        })
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for part in [&self.region, &self.zone, &self.subzone] {
            if part.is_empty() {
                break;
            }
            if !first {
                f.write_str("/")?;
            }
            f.write_str(part)?;
            first = false;
        }
        Ok(())
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// `None`: the target port of whichever service port the request is for.
    pub port: Option<u16>,
    /// At least 1.
    pub weight: u32,
    pub locality: Locality,
    /// The SPIFFE ID its certificate must carry; `None` for endpoints outside the mesh.
    #[serde(serialize_with = "ser::opt_display")]
    pub identity: Option<Arc<SpiffeId>>,
    pub ready: bool,
    /// `<namespace>/<name>` of the workload, for metrics and status.
    pub workload: String,
    /// Whether a keel sidecar fronts it: requests travel over the HTTP/2 hop between sidecars.
    pub meshed: bool,
    /// Whether to originate mTLS to it, checking that its certificate names `identity`. Only
    /// set when `identity` is.
    pub mtls: bool,
    /// The workload's labels, for locality failover by `failover_priority`.
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// The identity to expect when the proxy must reach this endpoint over mTLS.
    pub fn mtls_peer(&self) -> Option<&Arc<SpiffeId>> {
        self.identity.as_ref().filter(|_| self.mtls)
    }

    /// The address to connect to for a request to `port` of the endpoint's service.
    pub fn socket_addr(&self, port: &ServicePort) -> SocketAddr {
        SocketAddr::new(self.address, self.port.unwrap_or(port.target_port))
    }

    fn from_proto(at: Path<'_>, e: pb::Endpoint) -> Checked<Endpoint> {
        let address = unicast_ip(at.field("address"), &e.address)?;
        let port = optional_port(at.field("port"), e.port)?;
        let labels_at = at.field("labels");
        for key in e.labels.keys() {
            non_empty(labels_at, key)?;
        }
        let identity = if e.identity.is_empty() {
            None
        } else {
            Some(Arc::new(spiffe_id(at.field("identity"), &e.identity)?))
        };
        if e.mtls && identity.is_none() {
            return Err(at.field("identity").error(Problem::Inconsistent {
                reason: "an endpoint reached with mTLS needs the identity to expect",
            }));
        }
        Ok(Endpoint {
            address,
            port,
            // proto3 cannot tell an unset weight from 0; an endpoint listed is meant to be used.
            weight: e.weight.max(1),
            locality: Locality::from_proto(at.field("locality"), e.locality)?,
            identity,
            ready: e.ready,
            workload: e.workload,
            meshed: e.meshed,
            mtls: e.mtls,
            labels: e.labels,
        })
    }
}

/// The endpoints of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    pub service: String,
    pub endpoints: Vec<Endpoint>,
}

impl Endpoints {
    pub fn empty(service: &str) -> Endpoints {
        Endpoints {
            service: service.to_owned(),
            endpoints: Vec::new(),
        }
    }

    pub(super) fn from_proto(name: &str, e: pb::Endpoints) -> Checked<Endpoints> {
        let root = Path::Root;
        service_name(root.field("service"), &e.service)?;
        named(root.field("service"), name, &e.service)?;
        let list_at = root.field("endpoints");
        let mut seen = Unique::new();
        let mut endpoints = Vec::with_capacity(e.endpoints.len());
        for (i, raw) in e.endpoints.into_iter().enumerate() {
            let at = list_at.index(i);
            let endpoint = Endpoint::from_proto(at, raw)?;
            let key = match endpoint.port {
                Some(p) => SocketAddr::new(endpoint.address, p).to_string(),
                None => endpoint.address.to_string(),
            };
            seen.check(at.field("address"), key)?;
            endpoints.push(endpoint);
        }
        Ok(Endpoints {
            service: e.service,
            endpoints,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

/// What a consistent-hash balancer hashes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    SourceIp,
    Header(#[serde(serialize_with = "ser::header_name")] HeaderName),
    Cookie(String),
}

impl HashOn {
    fn from_proto(at: Path<'_>, h: Option<pb::HashPolicy>) -> Checked<HashOn> {
        use pb::hash_policy::Key;
        match required(at, h.and_then(|h| h.key))? {
            Key::SourceIp(true) => Ok(HashOn::SourceIp),
            Key::SourceIp(false) => Err(at.field("source_ip").error(Problem::Inconsistent {
                reason: "source_ip is false, so nothing is hashed",
            })),
            Key::Header(name) => Ok(HashOn::Header(header_name(at.field("header"), &name)?)),
            Key::Cookie(name) => {
                non_empty(at.field("cookie"), &name)?;
                Ok(HashOn::Cookie(name))
            }
        }
    }
}

/// The load-balancing algorithm; the hashing ones carry what they hash on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case", tag = "algorithm", content = "hash_on")]
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SuccessRateEjection {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    /// Hosts below `mean - stdev_factor * stdev` are outliers; positive.
    pub stdev_factor: f64,
}

/// Envoy's defaults, which are the mesh model's.
impl Default for SuccessRateEjection {
    fn default() -> Self {
        SuccessRateEjection {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailurePercentageEjection {
    /// Percent, 0..=100.
    pub threshold: u8,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

/// Envoy's defaults, which are the mesh model's.
impl Default for FailurePercentageEjection {
    fn default() -> Self {
        FailurePercentageEjection {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

/// Passive health checking (Envoy's outlier detection). A field the control plane leaves out
/// takes the mesh model's default (its `DEFAULT_*` constants here), never 0, which would turn a
/// detector or the panic threshold off without anyone having said so.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    /// 0 disables.
    pub consecutive_5xx: u32,
    /// 0 disables.
    pub consecutive_gateway_errors: u32,
    /// Positive.
    #[serde(serialize_with = "ser::duration")]
    pub interval: Duration,
    /// Positive.
    #[serde(serialize_with = "ser::duration")]
    pub base_ejection_time: Duration,
    /// Never below `base_ejection_time`.
    #[serde(serialize_with = "ser::duration")]
    pub max_ejection_time: Duration,
    /// Percent, 0..=100.
    pub max_ejection_percent: u8,
    /// Percent, 0..=100; below this share of healthy endpoints all endpoints are used.
    pub min_health_percent: u8,
    pub success_rate: Option<SuccessRateEjection>,
    pub failure_percentage: Option<FailurePercentageEjection>,
}

impl OutlierDetection {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
    pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
    /// No cap of keel's own; the panic threshold guards (see `health`).
    pub const DEFAULT_MAX_EJECTION_PERCENT: u8 = 100;
    /// Envoy's panic threshold.
    pub const DEFAULT_MIN_HEALTH_PERCENT: u8 = 50;

    fn from_proto(at: Path<'_>, o: pb::OutlierDetection) -> Checked<OutlierDetection> {
        let interval = duration_or(
            at.field("interval"),
            o.interval,
            Self::DEFAULT_INTERVAL,
            limits::OUTLIER_INTERVAL,
        )?;
        let base_ejection_time = duration_or(
            at.field("base_ejection_time"),
            o.base_ejection_time,
            Self::DEFAULT_BASE_EJECTION_TIME,
            limits::EJECTION_TIME,
        )?;
        let max_ejection_time = duration_or(
            at.field("max_ejection_time"),
            o.max_ejection_time,
            Self::DEFAULT_MAX_EJECTION_TIME.max(base_ejection_time),
            limits::EJECTION_TIME,
        )?;
        if max_ejection_time < base_ejection_time {
            return Err(at.field("max_ejection_time").error(Problem::Inconsistent {
                reason: "max_ejection_time is below base_ejection_time",
            }));
        }
        let success_rate = match o.success_rate {
            None => None,
            Some(s) => {
                let d = SuccessRateEjection::default();
                let factor = s
                    .stdev_factor
                    .map_or(d.stdev_factor, |f| f64::from(f) / 1000.0);
                if factor == 0.0 {
                    return Err(at
                        .field("success_rate")
                        .field("stdev_factor")
                        .error(Problem::Zero));
                }
                Some(SuccessRateEjection {
                    minimum_hosts: s.minimum_hosts.unwrap_or(d.minimum_hosts),
                    request_volume: s.request_volume.unwrap_or(d.request_volume),
                    stdev_factor: factor,
                })
            }
        };
        let failure_percentage = match o.failure_percentage {
            None => None,
            Some(f) => {
                let d = FailurePercentageEjection::default();
                Some(FailurePercentageEjection {
                    threshold: match f.threshold {
                        None => d.threshold,
                        Some(t) => percent(at.field("failure_percentage").field("threshold"), t)?,
                    },
                    minimum_hosts: f.minimum_hosts.unwrap_or(d.minimum_hosts),
                    request_volume: f.request_volume.unwrap_or(d.request_volume),
                })
            }
        };
        let percent_or = |field: &'static str, value: Option<u32>, default: u8| match value {
            None => Ok(default),
            Some(v) => percent(at.field(field), v),
        };
        Ok(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(Self::DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            interval,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent: percent_or(
                "max_ejection_percent",
                o.max_ejection_percent,
                Self::DEFAULT_MAX_EJECTION_PERCENT,
            )?,
            min_health_percent: percent_or(
                "min_health_percent",
                o.min_health_percent,
                Self::DEFAULT_MIN_HEALTH_PERCENT,
            )?,
            success_rate,
            failure_percentage,
        })
    }
}

/// A locality pattern `region[/zone[/subzone]]` whose last segment may be `*`, or `*` alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalityPattern(String);

impl LocalityPattern {
    fn parse(at: Path<'_>, value: &str) -> Checked<LocalityPattern> {
        let segments: Vec<&str> = value.split('/').collect();
        let last = segments.len().saturating_sub(1);
        let valid = segments.len() <= 3
            && segments.iter().enumerate().all(|(i, s)| {
                !s.is_empty() && (*s != "*" || i == last) && (s.len() == 1 || !s.contains('*'))
            });
        if valid {
            Ok(LocalityPattern(value.to_owned()))
        } else {
            Err(at.error(Problem::Malformed {
                value: value.to_owned(),
                expected: "a locality pattern \"region[/zone[/subzone]]\" (the last segment may be '*')",
            }))
        }
    }

    /// A pattern from its text, if it is well formed.
    pub fn new(value: &str) -> Option<LocalityPattern> {
        LocalityPattern::parse(Path::Root, value).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `locality` falls under this pattern.
    pub fn matches(&self, locality: &Locality) -> bool {
        let parts = [&locality.region, &locality.zone, &locality.subzone];
        for (i, segment) in self.0.split('/').enumerate() {
            if segment == "*" {
                return true;
            }
            match parts.get(i) {
                Some(value) if !value.is_empty() && *value == segment => {}
                _ => return false,
            }
        }
        true
    }
}

impl Serialize for LocalityPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A `failover_priority` entry: a label key, optionally with the value to match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverLabel {
    pub key: String,
    pub value: Option<String>,
}

/// When clients in region `from` run out of healthy local endpoints, prefer region `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverRule {
    pub from: String,
    pub to: String,
}

/// Traffic from clients in `from` is spread over the `to` localities by weight (adding up to
/// 100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DistributeRule {
    pub from: LocalityPattern,
    pub to: BTreeMap<LocalityPattern, u32>,
}

/// Locality-aware balancing; `failover` and `distribute` are mutually exclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalityFailover {
    pub enabled: bool,
    pub failover_priority: Vec<FailoverLabel>,
    pub failover: Vec<FailoverRule>,
    pub distribute: Vec<DistributeRule>,
}

impl LocalityFailover {
    fn from_proto(at: Path<'_>, l: pb::LocalityFailover) -> Checked<LocalityFailover> {
        let prio_at = at.field("failover_priority");
        let failover_priority = l
            .failover_priority
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let at = prio_at.index(i);
                let (key, value) = match entry.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (entry, None),
                };
                non_empty(at, &key)?;
                Ok(FailoverLabel { key, value })
            })
            .collect::<Checked<Vec<_>>>()?;

        let fo_at = at.field("failover");
        let failover = l
            .failover
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let at = fo_at.index(i);
                non_empty(at.field("from"), &f.from)?;
                non_empty(at.field("to"), &f.to)?;
                Ok(FailoverRule {
                    from: f.from,
                    to: f.to,
                })
            })
            .collect::<Checked<Vec<_>>>()?;

        let dist_at = at.field("distribute");
        let mut distribute = Vec::with_capacity(l.distribute.len());
        for (i, d) in l.distribute.into_iter().enumerate() {
            let at = dist_at.index(i);
            let from = LocalityPattern::parse(at.field("from"), &d.from)?;
            let to_at = at.field("to");
            let mut to = BTreeMap::new();
            let mut total = 0u64;
            for (pattern, weight) in d.to {
                to.insert(LocalityPattern::parse(to_at, &pattern)?, weight);
                total += u64::from(weight);
            }
            if total != 100 {
                return Err(to_at.error(Problem::BadTotal {
                    total,
                    expected: 100,
                }));
            }
            distribute.push(DistributeRule { from, to });
        }
        if !failover.is_empty() && !distribute.is_empty() {
            return Err(dist_at.error(Problem::Inconsistent {
                reason: "failover and distribute are mutually exclusive",
            }));
        }
        Ok(LocalityFailover {
            enabled: l.enabled,
            failover_priority,
            failover,
            distribute,
        })
    }
}

/// Limits on what the proxy sends to one service at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// `u32::MAX`: only the [`RetryBudget`] bounds retries.
    pub max_retries: u32,
}

/// Envoy's default thresholds for connections and requests; retries are bounded by the retry
/// budget (as in Istio, whose default for `maxRetries` is unlimited).
impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: u32::MAX,
        }
    }
}

/// Retries to a service: `percent` of its requests of the last `ttl`, plus
/// `min_retries_per_second` over that window (Linkerd's retry budget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    /// 0..=100.
    pub percent: u8,
    pub min_retries_per_second: u32,
    /// Positive.
    #[serde(serialize_with = "ser::duration")]
    pub ttl: Duration,
}

impl RetryBudget {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
}

/// Linkerd's retry-budget defaults.
impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20,
            min_retries_per_second: 10,
            ttl: Self::DEFAULT_TTL,
        }
    }
}

/// How the proxy calls one service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub service: String,
    pub load_balancer: LoadBalancer,
    /// `None`: no passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// `None`: no locality-aware balancing.
    pub locality_failover: Option<LocalityFailover>,
    pub circuit_breaker: CircuitBreaker,
    pub retry_budget: RetryBudget,
    #[serde(serialize_with = "ser::duration")]
    pub connect_timeout: Duration,
    /// `None`: connections are never closed for idleness.
    #[serde(serialize_with = "ser::opt_duration")]
    pub idle_timeout: Option<Duration>,
}

impl TrafficPolicy {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

    /// The policy of a service the control plane sent none for (the mesh model's defaults).
    pub fn default_for(service: &str) -> TrafficPolicy {
        TrafficPolicy {
            service: service.to_owned(),
            load_balancer: LoadBalancer::default(),
            outlier_detection: None,
            locality_failover: None,
            circuit_breaker: CircuitBreaker::default(),
            retry_budget: RetryBudget::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Some(Self::DEFAULT_IDLE_TIMEOUT),
        }
    }

    pub(super) fn from_proto(name: &str, p: pb::TrafficPolicy) -> Checked<TrafficPolicy> {
        let root = Path::Root;
        service_name(root.field("service"), &p.service)?;
        named(root.field("service"), name, &p.service)?;
        let lb_at = root.field("load_balancer");
        let hash_at = root.field("hash");
        let algorithm: pb::LoadBalancer = enumeration(lb_at, "LoadBalancer", p.load_balancer)?;
        let has_hash = p.hash.is_some();
        let unhashed = |lb: LoadBalancer| {
            if has_hash {
                Err(hash_at.error(Problem::Inconsistent {
                    reason: "a hash key is set but the load balancer is not RING_HASH or MAGLEV",
                }))
            } else {
                Ok(lb)
            }
        };
        let load_balancer = match algorithm {
            pb::LoadBalancer::Unspecified | pb::LoadBalancer::LeastRequest => {
                unhashed(LoadBalancer::LeastRequest)?
            }
            pb::LoadBalancer::RoundRobin => unhashed(LoadBalancer::RoundRobin)?,
            pb::LoadBalancer::PeakEwma => unhashed(LoadBalancer::PeakEwma)?,
            pb::LoadBalancer::Random => unhashed(LoadBalancer::Random)?,
            pb::LoadBalancer::RingHash => {
                LoadBalancer::RingHash(HashOn::from_proto(hash_at, p.hash)?)
            }
            pb::LoadBalancer::Maglev => LoadBalancer::Maglev(HashOn::from_proto(hash_at, p.hash)?),
        };
        let outlier_detection = p
            .outlier_detection
            .map(|o| OutlierDetection::from_proto(root.field("outlier_detection"), o))
            .transpose()?;
        let locality_failover = p
            .locality_failover
            .map(|l| LocalityFailover::from_proto(root.field("locality_failover"), l))
            .transpose()?;
        // Absent limits are Envoy's defaults, not 0 (which would refuse everything).
        let breaker = CircuitBreaker::default();
        let circuit_breaker = p
            .circuit_breaker
            .map(|c| CircuitBreaker {
                max_connections: c.max_connections.unwrap_or(breaker.max_connections),
                max_pending_requests: c
                    .max_pending_requests
                    .unwrap_or(breaker.max_pending_requests),
                max_requests: c.max_requests.unwrap_or(breaker.max_requests),
                max_retries: c.max_retries.unwrap_or(breaker.max_retries),
            })
            .unwrap_or(breaker);
        let budget = RetryBudget::default();
        let retry_budget = match p.retry_budget {
            None => budget,
            Some(b) => RetryBudget {
                percent: match b.percent {
                    None => budget.percent,
                    Some(v) => percent(root.field("retry_budget").field("percent"), v)?,
                },
                min_retries_per_second: b
                    .min_retries_per_second
                    .unwrap_or(budget.min_retries_per_second),
                ttl: duration_or(
                    root.field("retry_budget").field("ttl"),
                    b.ttl,
                    RetryBudget::DEFAULT_TTL,
                    limits::RETRY_BUDGET_TTL,
                )?,
            },
        };
        let connect_timeout = duration_or(
            root.field("connect_timeout"),
            p.connect_timeout,
            Self::DEFAULT_CONNECT_TIMEOUT,
            limits::CONNECT_TIMEOUT,
        )?;
        // Absent: the default; zero: never (as Envoy's idle_timeout of 0 disables it).
        let idle_timeout = match p.idle_timeout {
            None => Some(Self::DEFAULT_IDLE_TIMEOUT),
            Some(d) => {
                optional_duration(root.field("idle_timeout"), Some(d), limits::IDLE_TIMEOUT)?
            }
        };
        Ok(TrafficPolicy {
            service: p.service,
            load_balancer,
            outlier_detection,
            locality_failover,
            circuit_breaker,
            retry_budget,
            connect_timeout,
            idle_timeout,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationAction {
    Allow,
    Deny,
    /// Log a match without affecting the decision.
    Audit,
}

/// A string match in Istio's form: exact, `prefix*`, `*suffix`, or `*` (any value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringPattern {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringPattern::Exact(s) => value == s,
            StringPattern::Prefix(s) => value.starts_with(s.as_str()),
            StringPattern::Suffix(s) => value.ends_with(s.as_str()),
            StringPattern::Any => true,
        }
    }

    fn parse(at: Path<'_>, value: &str) -> Checked<StringPattern> {
        non_empty(at, value)?;
        let pattern = if value == "*" {
            StringPattern::Any
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringPattern::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringPattern::Prefix(prefix.to_owned())
        } else {
            StringPattern::Exact(value.to_owned())
        };
        let inner = match &pattern {
            StringPattern::Exact(s) | StringPattern::Prefix(s) | StringPattern::Suffix(s) => s,
            StringPattern::Any => "",
        };
        if inner.contains('*') {
            return Err(at.error(Problem::Malformed {
                value: value.to_owned(),
                expected: "an exact value, \"prefix*\", \"*suffix\" or \"*\"",
            }));
        }
        Ok(pattern)
    }

    fn parse_all(at: Path<'_>, values: &[String]) -> Checked<Vec<StringPattern>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| StringPattern::parse(at.index(i), v))
            .collect()
    }
}

impl fmt::Display for StringPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringPattern::Exact(s) => f.write_str(s),
            StringPattern::Prefix(s) => write!(f, "{s}*"),
            StringPattern::Suffix(s) => write!(f, "*{s}"),
            StringPattern::Any => f.write_str("*"),
        }
    }
}

impl Serialize for StringPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Who a request comes from; every non-empty list must match (OR within a list, AND across).
/// At least one list is non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Source {
    /// Peer identities without the `spiffe://` scheme: `<td>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StringPattern>,
    pub not_principals: Vec<StringPattern>,
    pub namespaces: Vec<StringPattern>,
    pub not_namespaces: Vec<StringPattern>,
    /// Bare addresses become host networks (/32, /128).
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

fn ip_blocks(at: Path<'_>, values: &[String]) -> Checked<Vec<IpNet>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| at.index(i).error(Problem::BadCidr { value: v.clone() }))
        })
        .collect()
}

impl Source {
    fn from_proto(at: Path<'_>, s: pb::Source) -> Checked<Source> {
        let source = Source {
            principals: StringPattern::parse_all(at.field("principals"), &s.principals)?,
            not_principals: StringPattern::parse_all(
                at.field("not_principals"),
                &s.not_principals,
            )?,
            namespaces: StringPattern::parse_all(at.field("namespaces"), &s.namespaces)?,
            not_namespaces: StringPattern::parse_all(
                at.field("not_namespaces"),
                &s.not_namespaces,
            )?,
            ip_blocks: ip_blocks(at.field("ip_blocks"), &s.ip_blocks)?,
            not_ip_blocks: ip_blocks(at.field("not_ip_blocks"), &s.not_ip_blocks)?,
        };
        if source == Source::default() {
            return Err(at.error(Problem::Empty));
        }
        Ok(source)
    }
}

/// What a request does; same combination rules as [`Source`]. At least one list is non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Operation {
    #[serde(serialize_with = "ser::methods")]
    pub methods: Vec<Method>,
    #[serde(serialize_with = "ser::methods")]
    pub not_methods: Vec<Method>,
    pub paths: Vec<StringPattern>,
    pub not_paths: Vec<StringPattern>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<StringPattern>,
    pub not_hosts: Vec<StringPattern>,
}

fn methods(at: Path<'_>, values: &[String]) -> Checked<Vec<Method>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| method(at.index(i), v))
        .collect()
}

fn ports(at: Path<'_>, values: &[u32]) -> Checked<Vec<u16>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| port(at.index(i), *v))
        .collect()
}

impl Operation {
    fn from_proto(at: Path<'_>, o: pb::Operation) -> Checked<Operation> {
        let operation = Operation {
            methods: methods(at.field("methods"), &o.methods)?,
            not_methods: methods(at.field("not_methods"), &o.not_methods)?,
            paths: StringPattern::parse_all(at.field("paths"), &o.paths)?,
            not_paths: StringPattern::parse_all(at.field("not_paths"), &o.not_paths)?,
            ports: ports(at.field("ports"), &o.ports)?,
            not_ports: ports(at.field("not_ports"), &o.not_ports)?,
            hosts: StringPattern::parse_all(at.field("hosts"), &o.hosts)?,
            not_hosts: StringPattern::parse_all(at.field("not_hosts"), &o.not_hosts)?,
        };
        if operation == Operation::default() {
            return Err(at.error(Problem::Empty));
        }
        Ok(operation)
    }
}

/// Matches when any `from` matches (or `from` is empty) and any `to` matches (or `to` is empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct AuthorizationRule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

/// An access policy for the proxy's inbound traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    /// `<namespace>/<name>`.
    pub name: String,
    pub namespace: String,
    pub action: AuthorizationAction,
    /// An ALLOW policy without rules allows nothing; a DENY policy without rules denies nothing.
    pub rules: Vec<AuthorizationRule>,
}

impl AuthorizationPolicy {
    pub(super) fn from_proto(
        name: &str,
        p: pb::AuthorizationPolicy,
    ) -> Checked<AuthorizationPolicy> {
        let root = Path::Root;
        name_segment(root.field("namespace"), &p.namespace)?;
        name_segment(root.field("name"), &p.name)?;
        named(
            root.field("name"),
            name,
            &format!("{}/{}", p.namespace, p.name),
        )?;
        let action = match enumeration(root.field("action"), "AuthorizationAction", p.action)? {
            pb::AuthorizationAction::Allow => AuthorizationAction::Allow,
            pb::AuthorizationAction::Deny => AuthorizationAction::Deny,
            pb::AuthorizationAction::Audit => AuthorizationAction::Audit,
        };
        let rules_at = root.field("rules");
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.into_iter().enumerate() {
            let at = rules_at.index(i);
            let from_at = at.field("from");
            let to_at = at.field("to");
            rules.push(AuthorizationRule {
                from: r
                    .from
                    .into_iter()
                    .enumerate()
                    .map(|(j, s)| Source::from_proto(from_at.index(j), s))
                    .collect::<Checked<_>>()?,
                to: r
                    .to
                    .into_iter()
                    .enumerate()
                    .map(|(j, o)| Operation::from_proto(to_at.index(j), o))
                    .collect::<Checked<_>>()?,
            });
        }
        Ok(AuthorizationPolicy {
            name: name.to_owned(),
            namespace: p.namespace,
            action,
            rules,
        })
    }
}

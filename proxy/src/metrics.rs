//! The proxy's Prometheus metrics: requests per route and endpoint (and, inbound over mTLS, per
//! verified client identity, `client_id`) with their latency, and TCP connections and bytes per
//! direction and protocol. Served by the admin server at `/metrics`.
//! The resilience families (see [`Resilience`]) show outlier ejections, endpoint health, priority
//! load, retries and circuit-breaker rejections per service.
//!
//! Recording a request must stay cheap: it is on every request's path. The caller describes the
//! request with [`RequestLabels`], borrowed from its own state (no label is formatted or
//! allocated per request), and the series' counter and histogram are found in a cache keyed by
//! those borrowed labels; only the first request of a new label set builds the owned label set
//! and registers the series with prometheus-client's families, which the admin server encodes.
//! This module must never take a lock on the request path that `/metrics` can hold for long
//! (the cache's read lock is only contended while a new series is inserted).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustc_hash::FxBuildHasher;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnProtocol {
    http1,
    http2,
    tcp,
    /// TLS the proxy does not terminate (the application's own).
    tls,
    /// mTLS between sidecars, terminated by the inbound side.
    mtls,
}

/// Why the inbound side refused a connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// Plaintext under STRICT mTLS.
    plaintext,
    /// TLS that is not mesh mTLS for this proxy, under STRICT.
    foreign_tls,
    /// The mTLS handshake failed (unknown CA, expired, wrong identity, no client certificate).
    handshake,
    /// Mesh mTLS arrived but the proxy has no certificate yet.
    no_identity,
    /// An access policy denied the (opaque TCP) connection.
    denied,
    /// The proxy has no configuration from the control plane yet.
    unconfigured,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: Refusal,
}

impl From<crate::detect::Protocol> for ConnProtocol {
    fn from(p: crate::detect::Protocol) -> Self {
        match p {
            crate::detect::Protocol::Http1 => ConnProtocol::http1,
            crate::detect::Protocol::Http2 => ConnProtocol::http2,
            crate::detect::Protocol::Tls => ConnProtocol::tls,
            crate::detect::Protocol::Opaque => ConnProtocol::tcp,
        }
    }
}

/// One request's labels, borrowed from the request's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestLabels<'a> {
    pub direction: Direction,
    /// `<namespace>/<name>` of the destination service; "" when unknown (passthrough, inbound).
    pub service: &'a str,
    pub route: &'a str,
    /// The endpoint reached, if any.
    pub endpoint: Option<SocketAddr>,
    pub status: u16,
    /// The proxy's own reason when it answered itself (`keel-error`), else "".
    pub error: &'static str,
    /// Inbound over mTLS: the client's verified SPIFFE ID; else "".
    pub client_id: &'a str,
}

/// The `endpoint` label: `ip:port`, or "" when no endpoint was reached. Formatted only when
/// `/metrics` is encoded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct EndpointLabel(Option<SocketAddr>);

impl EncodeLabelValue for EndpointLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self.0 {
            Some(addr) => write!(encoder, "{addr}"),
            None => Ok(()),
        }
    }
}

/// The owned label set of `keel_requests_total`, built once per series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabelSet {
    pub direction: Direction,
    pub service: String,
    pub route: String,
    pub endpoint: EndpointLabel,
    pub status: u16,
    pub error: &'static str,
    pub client_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub service: String,
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub protocol: ConnProtocol,
}

fn latency_histogram() -> Histogram {
    // 100 us to about 26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// The cache's key: a request's labels, owned.
#[derive(Debug)]
struct RequestKey {
    direction: Direction,
    service: Box<str>,
    route: Box<str>,
    endpoint: Option<SocketAddr>,
    status: u16,
    error: &'static str,
    client_id: Box<str>,
}

/// What the cache's lookups hash and compare: the same for a [`RequestKey`] and for borrowed
/// [`RequestLabels`], so that a lookup needs no owned key.
trait RequestKeyView {
    fn labels(&self) -> RequestLabels<'_>;
}

impl RequestKeyView for RequestKey {
    fn labels(&self) -> RequestLabels<'_> {
        RequestLabels {
            direction: self.direction,
            service: &self.service,
            route: &self.route,
            endpoint: self.endpoint,
            status: self.status,
            error: self.error,
            client_id: &self.client_id,
        }
    }
}

impl RequestKeyView for RequestLabels<'_> {
    fn labels(&self) -> RequestLabels<'_> {
        *self
    }
}

impl Hash for dyn RequestKeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.labels().hash(state);
    }
}

impl PartialEq for dyn RequestKeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.labels() == other.labels()
    }
}

impl Eq for dyn RequestKeyView + '_ {}

impl Hash for RequestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn RequestKeyView).hash(state);
    }
}

impl PartialEq for RequestKey {
    fn eq(&self, other: &Self) -> bool {
        self.labels() == other.labels()
    }
}

impl Eq for RequestKey {}

impl<'a> Borrow<dyn RequestKeyView + 'a> for RequestKey {
    fn borrow(&self) -> &(dyn RequestKeyView + 'a) {
        self
    }
}

/// A request series' counter and its route's latency histogram (handles shared with the
/// families that `/metrics` encodes).
#[derive(Clone)]
struct RequestSeries {
    count: Counter,
    latency: Histogram,
}

pub struct Metrics {
    registry: Registry,
    resilience: Resilience,
    series: RwLock<HashMap<RequestKey, RequestSeries, FxBuildHasher>>,
    requests: Family<RequestLabelSet, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    active: Family<ConnLabels, Gauge>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keel");
        let requests = Family::<RequestLabelSet, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by direction, service, route, endpoint and status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, as seen by the proxy",
            latency.clone(),
        );
        let opened = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_connections_opened",
            "Connections accepted",
            opened.clone(),
        );
        let closed = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_connections_closed",
            "Connections closed",
            closed.clone(),
        );
        let active = Family::<ConnLabels, Gauge>::default();
        registry.register(
            "tcp_connections_active",
            "Connections open now",
            active.clone(),
        );
        let sent = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent to clients of opaque TCP connections",
            sent.clone(),
        );
        let received = Family::<ConnLabels, Counter>::default();
        registry.register(
            "tcp_received_bytes",
            "Bytes received from clients of opaque TCP connections",
            received.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "inbound_refused_connections",
            "Inbound connections refused by the mTLS mode, a failed mTLS handshake or an access policy",
            refused.clone(),
        );
        let resilience = Resilience::register(&mut registry);
        Metrics {
            registry,
            resilience,
            series: RwLock::new(HashMap::default()),
            requests,
            latency,
            opened,
            closed,
            active,
            sent,
            received,
            refused,
        }
    }
}

/// A connection being counted; dropping it counts the close.
pub struct ConnectionGuard<'a> {
    metrics: &'a Metrics,
    labels: ConnLabels,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.metrics.closed.get_or_create(&self.labels).inc();
        self.metrics.active.get_or_create(&self.labels).dec();
    }
}

impl Metrics {
    pub fn connection(&self, direction: Direction, protocol: ConnProtocol) -> ConnectionGuard<'_> {
        let labels = ConnLabels {
            direction,
            protocol,
        };
        self.opened.get_or_create(&labels).inc();
        self.active.get_or_create(&labels).inc();
        ConnectionGuard {
            metrics: self,
            labels,
        }
    }

    pub fn bytes(&self, direction: Direction, protocol: ConnProtocol, sent: u64, received: u64) {
        let labels = ConnLabels {
            direction,
            protocol,
        };
        self.sent.get_or_create(&labels).inc_by(sent);
        self.received.get_or_create(&labels).inc_by(received);
    }

    /// Counts one request and its latency (to its response headers).
    pub fn request(&self, labels: RequestLabels<'_>, latency: Duration) {
        let found = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&labels as &dyn RequestKeyView)
            .cloned();
        let series = match found {
            Some(series) => series,
            None => self.new_series(labels),
        };
        series.count.inc();
        series.latency.observe(latency.as_secs_f64());
    }

    /// Registers the series of `labels` with the families and caches its handles.
    fn new_series(&self, labels: RequestLabels<'_>) -> RequestSeries {
        let series = RequestSeries {
            count: self
                .requests
                .get_or_create(&RequestLabelSet {
                    direction: labels.direction,
                    service: labels.service.to_owned(),
                    route: labels.route.to_owned(),
                    endpoint: EndpointLabel(labels.endpoint),
                    status: labels.status,
                    error: labels.error,
                    client_id: labels.client_id.to_owned(),
                })
                .clone(),
            latency: self
                .latency
                .get_or_create(&LatencyLabels {
                    direction: labels.direction,
                    service: labels.service.to_owned(),
                    route: labels.route.to_owned(),
                })
                .clone(),
        };
        let key = RequestKey {
            direction: labels.direction,
            service: labels.service.into(),
            route: labels.route.into(),
            endpoint: labels.endpoint,
            status: labels.status,
            error: labels.error,
            client_id: labels.client_id.into(),
        };
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(series)
            .clone()
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// An endpoint was ejected by outlier detection.
    pub fn ejection(&self, service: &str, endpoint: &str, reason: &str) {
        self.resilience
            .ejections
            .get_or_create(&EjectionLabels {
                service: service.to_owned(),
                endpoint: endpoint.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// An ejection was refused because too many endpoints are ejected already.
    pub fn ejection_overflow(&self, service: &str) {
        self.resilience
            .ejections_overflow
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Whether an endpoint is a candidate now (ready and not ejected).
    pub fn endpoint_health(&self, service: &str, endpoint: &str, workload: &str, healthy: bool) {
        self.resilience
            .endpoint_healthy
            .get_or_create(&EndpointLabels {
                service: service.to_owned(),
                endpoint: endpoint.to_owned(),
                workload: workload.to_owned(),
            })
            .set(i64::from(healthy));
    }

    /// Removes the health gauge of an endpoint that is gone.
    pub fn forget_endpoint(&self, service: &str, endpoint: &str, workload: &str) {
        self.resilience.endpoint_healthy.remove(&EndpointLabels {
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
            workload: workload.to_owned(),
        });
    }

    /// A priority level's share of requests (percent) and whether it is in panic.
    pub fn priority_load(&self, service: &str, priority: usize, load: u32, panic: bool) {
        let labels = PriorityLabels {
            service: service.to_owned(),
            priority: priority as u64,
        };
        self.resilience
            .priority_load
            .get_or_create(&labels)
            .set(i64::from(load));
        self.resilience
            .priority_panic
            .get_or_create(&labels)
            .set(i64::from(panic));
    }

    /// Removes the gauges of a priority level that no longer exists.
    pub fn forget_priority(&self, service: &str, priority: usize) {
        let labels = PriorityLabels {
            service: service.to_owned(),
            priority: priority as u64,
        };
        self.resilience.priority_load.remove(&labels);
        self.resilience.priority_panic.remove(&labels);
    }

    /// A request was retried, and why (`connect-failure`, `reset`, `timeout`, `status`,
    /// `grpc-status`).
    pub fn retry(&self, service: &str, reason: &str) {
        self.resilience
            .retries
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A retry the policy allowed was not made (`budget`, `max-retries`, `deadline`,
    /// `body-too-large`).
    pub fn retry_skipped(&self, service: &str, reason: &str) {
        self.resilience
            .retries_skipped
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A circuit breaker refused a request or a connection.
    pub fn circuit_open(&self, service: &str, limit: &str) {
        self.resilience
            .circuit_breaker_rejections
            .get_or_create(&LimitLabels {
                service: service.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Resilience: outlier ejection, endpoint health, priority load, retries, circuit breakers.

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: String,
    pub endpoint: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    /// The endpoint's address (with its port when it has its own).
    pub endpoint: String,
    pub workload: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    pub service: String,
    pub priority: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub service: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub service: String,
    pub limit: String,
}

/// The families that show how the proxy copes with failing endpoints.
struct Resilience {
    ejections: Family<EjectionLabels, Counter>,
    ejections_overflow: Family<ServiceLabels, Counter>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    priority_load: Family<PriorityLabels, Gauge>,
    priority_panic: Family<PriorityLabels, Gauge>,
    retries: Family<ReasonLabels, Counter>,
    retries_skipped: Family<ReasonLabels, Counter>,
    circuit_breaker_rejections: Family<LimitLabels, Counter>,
}

impl Resilience {
    fn register(registry: &mut Registry) -> Resilience {
        let r = Resilience {
            ejections: Family::default(),
            ejections_overflow: Family::default(),
            endpoint_healthy: Family::default(),
            priority_load: Family::default(),
            priority_panic: Family::default(),
            retries: Family::default(),
            retries_skipped: Family::default(),
            circuit_breaker_rejections: Family::default(),
        };
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by reason",
            r.ejections.clone(),
        );
        registry.register(
            "outlier_ejections_overflow",
            "Ejections refused because the maximum ejection percentage was reached",
            r.ejections_overflow.clone(),
        );
        registry.register(
            "endpoint_healthy",
            "1 if the endpoint is ready and not ejected, else 0",
            r.endpoint_healthy.clone(),
        );
        registry.register(
            "priority_load_percent",
            "Share of a service's requests sent to each priority level (0 is the caller's locality)",
            r.priority_load.clone(),
        );
        registry.register(
            "priority_panic",
            "1 if a priority level is in panic (balancing over all its ready endpoints)",
            r.priority_panic.clone(),
        );
        registry.register(
            "retries",
            "Retries sent, by the condition that caused them",
            r.retries.clone(),
        );
        registry.register(
            "retries_skipped",
            "Retries the policy allowed but that were not made (budget, max-retries, deadline, body-too-large)",
            r.retries_skipped.clone(),
        );
        registry.register(
            "circuit_breaker_rejections",
            "Requests or connections refused by a service's circuit breakers, by limit",
            r.circuit_breaker_rejections.clone(),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text() {
        let m = Metrics::default();
        {
            let _c = m.connection(Direction::outbound, ConnProtocol::http1);
        }
        let labels = RequestLabels {
            direction: Direction::outbound,
            service: "demo/articles",
            route: "reads",
            endpoint: Some("10.0.0.1:8080".parse().expect("addr")),
            status: 200,
            error: "",
            client_id: "",
        };
        m.request(labels, Duration::from_millis(3));
        // The second request finds the series in the cache: the same counter counts it.
        m.request(labels, Duration::from_millis(5));
        m.request(
            RequestLabels {
                direction: Direction::inbound,
                service: "",
                route: "",
                endpoint: None,
                status: 503,
                error: "app-unreachable",
                client_id: "spiffe://keel.local/ns/demo/sa/frontend",
            },
            Duration::from_millis(1),
        );
        let text = m.encode();
        assert!(text.contains(
            r#"keel_requests_total{direction="outbound",service="demo/articles",route="reads",endpoint="10.0.0.1:8080",status="200",error="",client_id=""} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"keel_requests_total{direction="inbound",service="",route="",endpoint="",status="503",error="app-unreachable",client_id="spiffe://keel.local/ns/demo/sa/frontend"} 1"#
        ), "{text}");
        assert!(
            text.contains(
                r#"keel_request_duration_seconds_count{direction="outbound",service="demo/articles",route="reads"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keel_tcp_connections_opened_total{direction="outbound",protocol="http1"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keel_tcp_connections_closed_total{direction="outbound",protocol="http1"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn resilience_families_show_and_forget() {
        let m = Metrics::default();
        m.ejection("demo/web", "10.0.0.2", "consecutive_5xx");
        m.endpoint_health("demo/web", "10.0.0.2", "demo/web-1", false);
        m.priority_load("demo/web", 1, 30, false);
        m.retry("demo/web", "status");
        m.retry_skipped("demo/web", "budget");
        m.circuit_open("demo/web", "max-requests");
        let text = m.encode();
        for line in [
            r#"keel_outlier_ejections_total{service="demo/web",endpoint="10.0.0.2",reason="consecutive_5xx"} 1"#,
            r#"keel_endpoint_healthy{service="demo/web",endpoint="10.0.0.2",workload="demo/web-1"} 0"#,
            r#"keel_priority_load_percent{service="demo/web",priority="1"} 30"#,
            r#"keel_retries_total{service="demo/web",reason="status"} 1"#,
            r#"keel_retries_skipped_total{service="demo/web",reason="budget"} 1"#,
            r#"keel_circuit_breaker_rejections_total{service="demo/web",limit="max-requests"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        m.forget_endpoint("demo/web", "10.0.0.2", "demo/web-1");
        m.forget_priority("demo/web", 1);
        let text = m.encode();
        assert!(!text.contains("keel_endpoint_healthy{"), "{text}");
        assert!(!text.contains("keel_priority_load_percent{"), "{text}");
    }
}

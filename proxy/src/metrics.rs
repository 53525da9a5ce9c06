//! The proxy's Prometheus metrics: requests per route and endpoint with their latency, and TCP
//! connections and bytes per direction and protocol. Served by the admin server at `/metrics`.
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
    tls,
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
    series: RwLock<HashMap<RequestKey, RequestSeries, FxBuildHasher>>,
    requests: Family<RequestLabelSet, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    active: Family<ConnLabels, Gauge>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
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
        Metrics {
            registry,
            series: RwLock::new(HashMap::default()),
            requests,
            latency,
            opened,
            closed,
            active,
            sent,
            received,
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
        };
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(series)
            .clone()
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
            },
            Duration::from_millis(1),
        );
        let text = m.encode();
        assert!(text.contains(
            r#"keel_requests_total{direction="outbound",service="demo/articles",route="reads",endpoint="10.0.0.1:8080",status="200",error=""} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"keel_requests_total{direction="inbound",service="",route="",endpoint="",status="503",error="app-unreachable"} 1"#
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
}

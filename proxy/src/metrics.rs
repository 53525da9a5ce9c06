//! The proxy's Prometheus metrics: requests per route and endpoint with their latency, and TCP
//! connections and bytes per direction and protocol. Served by the admin server at `/metrics`.
//!
//! Recording is lock-free apart from the label-set lookup inside prometheus-client's families;
//! nothing here allocates per request beyond the label values.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    /// `<namespace>/<name>` of the destination service; "" when unknown (passthrough, inbound).
    pub service: String,
    pub route: String,
    /// The endpoint's `ip:port`, or "" when none was reached.
    pub endpoint: String,
    pub status: u16,
    /// The proxy's own reason when it answered itself (`keel-error`), else "".
    pub error: String,
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

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
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
        let requests = Family::<RequestLabels, Counter>::default();
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
        Metrics {
            registry,
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

    pub fn request(&self, labels: RequestLabels, latency: Duration) {
        self.latency
            .get_or_create(&LatencyLabels {
                direction: labels.direction,
                service: labels.service.clone(),
                route: labels.route.clone(),
            })
            .observe(latency.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
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
        m.request(
            RequestLabels {
                direction: Direction::outbound,
                service: "demo/articles".into(),
                route: "reads".into(),
                endpoint: "10.0.0.1:8080".into(),
                status: 200,
                error: String::new(),
            },
            Duration::from_millis(3),
        );
        let text = m.encode();
        assert!(text.contains(
            r#"keel_requests_total{direction="outbound",service="demo/articles",route="reads",endpoint="10.0.0.1:8080",status="200",error=""} 1"#
        ), "{text}");
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

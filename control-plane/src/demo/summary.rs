//! The demo's summary: the load generator's own measurements (requests, successes, latency
//! percentiles, which instance answered), grouped by the service called and the route the
//! client's sidecar reported for each kind of request, next to what the sidecars counted.
//!
//! Pure: it joins data and renders text. It must never invent a route: a kind whose route the
//! sidecar did not report is shown as `?`, and a count the sidecars cannot confirm as `-`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use super::metrics::Labels;
use crate::model::{Model, ObjectKey};

/// `keel-demo-app --role load`'s report.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LoadReport {
    pub elapsed_ms: u64,
    pub kinds: Vec<KindReport>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KindReport {
    pub kind: String,
    pub service: String,
    pub request: String,
    pub latencies_us: Vec<u64>,
    pub statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub served_by: BTreeMap<String, u64>,
}

impl KindReport {
    fn sent(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }

    fn succeeded(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| status.starts_with('2'))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The route a kind of request took, as its sidecar labelled it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteLabel {
    /// `<namespace>/<name>`.
    pub service: String,
    pub route: String,
}

/// One line of the route table.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    /// The service the client called (`<namespace>/<name>`).
    pub service: String,
    /// The route label (empty for the service's default route), `?` when the sidecar did not
    /// report one.
    pub route: String,
    pub requests: u64,
    pub succeeded: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Answers by instance.
    pub served_by: BTreeMap<String, u64>,
    /// Failures without an answer, by error.
    pub errors: BTreeMap<String, u64>,
    /// What the client's sidecar counted for this route over the same run.
    pub sidecar: Option<u64>,
}

/// The `q`-quantile (0..=1) of sorted values, nearest-rank.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Groups the report's kinds by (service, route) and joins the sidecar's counts.
///
/// `routes` maps a kind to the label its sidecar reported; `outbound` is how much each
/// `keel_requests_total{direction="outbound"}` series of the client's sidecar grew during the run.
/// A series counts for a row when its route label is the row's and its service is the called
/// service or one of that route's destinations in `model`.
pub fn route_rows(
    namespace: &str,
    report: &LoadReport,
    routes: &BTreeMap<String, RouteLabel>,
    outbound: &BTreeMap<Labels, f64>,
    model: &Model,
) -> Vec<RouteRow> {
    let mut grouped: BTreeMap<(String, String), Vec<&KindReport>> = BTreeMap::new();
    for kind in &report.kinds {
        let service = format!("{namespace}/{}", kind.service);
        let route = routes
            .get(&kind.kind)
            .map_or_else(|| "?".to_owned(), |label| label.route.clone());
        grouped.entry((service, route)).or_default().push(kind);
    }
    grouped
        .into_iter()
        .map(|((service, route), kinds)| {
            let mut latencies: Vec<u64> = kinds
                .iter()
                .flat_map(|k| k.latencies_us.iter().copied())
                .collect();
            latencies.sort_unstable();
            let mut served_by = BTreeMap::new();
            let mut errors = BTreeMap::new();
            for kind in &kinds {
                for (who, n) in &kind.served_by {
                    *served_by.entry(who.clone()).or_insert(0) += n;
                }
                for (why, n) in &kind.errors {
                    *errors.entry(why.clone()).or_insert(0) += n;
                }
            }
            let sidecar = (route != "?").then(|| {
                let related = related_services(model, &service, &route);
                outbound
                    .iter()
                    .filter(|(labels, _)| {
                        labels.get("route") == Some(&route)
                            && labels.get("service").is_some_and(|s| related.contains(s))
                    })
                    .map(|(_, n)| *n)
                    .sum::<f64>()
                    .round() as u64
            });
            RouteRow {
                requests: kinds.iter().map(|k| k.sent()).sum(),
                succeeded: kinds.iter().map(|k| k.succeeded()).sum(),
                p50_us: quantile(&latencies, 0.50),
                p99_us: quantile(&latencies, 0.99),
                served_by,
                errors,
                sidecar,
                service,
                route,
            }
        })
        .collect()
}

/// The called service and the destinations of its route named `route`, as `<ns>/<name>`.
fn related_services(model: &Model, service: &str, route: &str) -> BTreeSet<String> {
    let mut related = BTreeSet::from([service.to_owned()]);
    let key = service
        .split_once('/')
        .map(|(ns, name)| ObjectKey::new(ns, name));
    if let Some(svc) = key.and_then(|k| model.services.get(&k))
        && let Some(r) = svc.spec.routes.iter().find(|r| r.name == route)
    {
        related.extend(r.destinations.iter().map(|d| d.service.to_string()));
    }
    related
}

fn millis(us: Option<u64>) -> String {
    match us {
        Some(us) if us < 10_000 => format!("{:.2}ms", us as f64 / 1000.0),
        Some(us) => format!("{:.0}ms", us as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

fn shares(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return "-".to_owned();
    }
    counts
        .iter()
        .map(|(who, n)| format!("{who} {:.0}%", *n as f64 * 100.0 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A route label as shown: the default route's label is empty.
fn route_name(route: &str) -> &str {
    if route.is_empty() { "(default)" } else { route }
}

/// The route table, with a footnote per row that failed or that the sidecar counted differently.
pub fn render_routes(rows: &[RouteRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}  SERVED BY",
        "SERVICE", "ROUTE", "REQUESTS", "SUCCESS", "P50", "P99", "SIDECAR"
    );
    let mut notes = Vec::new();
    for row in rows {
        let success = if row.requests == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", row.succeeded as f64 * 100.0 / row.requests as f64)
        };
        let sidecar = match row.sidecar {
            Some(n) if n == row.requests => format!("{n}"),
            Some(n) => {
                notes.push(format!(
                    "{} {}: the client sent {} requests, its sidecar counted {n}",
                    row.service,
                    route_name(&row.route),
                    row.requests
                ));
                format!("{n}!")
            }
            None => "-".to_owned(),
        };
        let route = route_name(&row.route);
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}  {}",
            row.service,
            route,
            row.requests,
            success,
            millis(row.p50_us),
            millis(row.p99_us),
            sidecar,
            shares(&row.served_by)
        );
        for (why, n) in &row.errors {
            notes.push(format!(
                "{} {}: {n} × {why}",
                row.service,
                route_name(&row.route)
            ));
        }
    }
    for note in notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

/// What one sidecar counted on its inbound side during the run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InboundRow {
    pub workload: String,
    pub requests: u64,
    pub succeeded: u64,
    /// By the `service` label.
    pub services: BTreeSet<String>,
}

/// Sums a sidecar's `keel_requests_total{direction="inbound"}` growth.
pub fn inbound_row(workload: &str, inbound: &BTreeMap<Labels, f64>) -> InboundRow {
    let mut row = InboundRow {
        workload: workload.to_owned(),
        ..InboundRow::default()
    };
    for (labels, n) in inbound {
        if labels.get("direction").map(String::as_str) != Some("inbound") {
            continue;
        }
        let n = n.round() as u64;
        row.requests += n;
        if labels.get("status").is_some_and(|s| s.starts_with('2')) {
            row.succeeded += n;
        }
        if let Some(service) = labels.get("service").filter(|s| !s.is_empty()) {
            row.services.insert(service.clone());
        }
    }
    row
}

/// The per-workload table of what each sidecar let in; the SERVICES column only when some
/// sidecar labels its inbound requests with a service.
pub fn render_inbound(rows: &[InboundRow]) -> String {
    let with_services = rows.iter().any(|r| !r.services.is_empty());
    let mut out = String::new();
    let _ = write!(out, "{:<16} {:>8} {:>8}", "WORKLOAD", "INBOUND", "SUCCESS");
    let _ = writeln!(out, "{}", if with_services { "  SERVICES" } else { "" });
    for row in rows {
        let success = if row.requests == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", row.succeeded as f64 * 100.0 / row.requests as f64)
        };
        let _ = write!(
            out,
            "{:<16} {:>8} {:>8}",
            row.workload, row.requests, success
        );
        if with_services {
            let services: Vec<&str> = row.services.iter().map(String::as_str).collect();
            let _ = write!(out, "  {}", services.join(", "));
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(kind: &str, service: &str, latencies: &[u64], ok: u64, failed: u64) -> KindReport {
        KindReport {
            kind: kind.to_owned(),
            service: service.to_owned(),
            request: String::new(),
            latencies_us: latencies.to_vec(),
            statuses: BTreeMap::from([("200".to_owned(), ok), ("503".to_owned(), failed)]),
            errors: BTreeMap::new(),
            served_by: BTreeMap::from([("a-1".to_owned(), ok + failed)]),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kinds_on_one_route_merge_and_sidecar_counts_join() {
        let report = LoadReport {
            elapsed_ms: 1000,
            kinds: vec![
                kind("articles-get", "articles", &[1000, 3000], 2, 0),
                kind("articles-list", "articles", &[2000, 4000], 1, 1),
                kind("reads-bump", "reads", &[500], 1, 0),
            ],
        };
        let routes = BTreeMap::from([
            (
                "articles-get".to_owned(),
                RouteLabel {
                    service: "demo/articles".to_owned(),
                    route: "default".to_owned(),
                },
            ),
            (
                "articles-list".to_owned(),
                RouteLabel {
                    service: "demo/articles".to_owned(),
                    route: "default".to_owned(),
                },
            ),
        ]);
        let outbound = BTreeMap::from([
            (
                labels(&[
                    ("route", "default"),
                    ("service", "demo/articles"),
                    ("endpoint", "1"),
                ]),
                3.0,
            ),
            (
                labels(&[
                    ("route", "default"),
                    ("service", "demo/articles"),
                    ("endpoint", "2"),
                ]),
                1.0,
            ),
            (
                labels(&[("route", "default"), ("service", "demo/comments")]),
                9.0,
            ),
        ]);
        let rows = route_rows("demo", &report, &routes, &outbound, &Model::default());
        assert_eq!(rows.len(), 2);
        let articles = &rows[0];
        assert_eq!(
            (articles.service.as_str(), articles.route.as_str()),
            ("demo/articles", "default")
        );
        assert_eq!((articles.requests, articles.succeeded), (4, 3));
        assert_eq!((articles.p50_us, articles.p99_us), (Some(2000), Some(4000)));
        assert_eq!(articles.sidecar, Some(4));
        let reads = &rows[1];
        assert_eq!((reads.route.as_str(), reads.sidecar), ("?", None));

        let text = render_routes(&rows);
        assert!(
            text.contains("demo/articles    default           4    75.0%"),
            "{text}"
        );
        assert!(!text.contains("note"), "{text}");
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), Some(50));
        assert_eq!(quantile(&values, 0.99), Some(99));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn inbound_rows_sum_successes() {
        let grown = BTreeMap::from([
            (
                labels(&[
                    ("direction", "inbound"),
                    ("service", "demo/reads"),
                    ("status", "200"),
                ]),
                5.0,
            ),
            (
                labels(&[
                    ("direction", "inbound"),
                    ("service", "demo/reads"),
                    ("status", "503"),
                ]),
                1.0,
            ),
            (labels(&[("direction", "outbound"), ("status", "200")]), 7.0),
        ]);
        let row = inbound_row("reads-1", &grown);
        assert_eq!((row.requests, row.succeeded), (6, 5));
        assert!(render_inbound(&[row]).contains("reads-1                 6    83.3%  demo/reads"));
    }
}

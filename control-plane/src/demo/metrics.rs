//! Reading a sidecar's Prometheus text exposition (`GET /metrics` on its admin port) into
//! samples that can be summed and compared before and after some traffic.
//!
//! It understands the text format's sample lines (`name{label="value",...} value [timestamp]`,
//! with `\\`, `\"` and `\n` escapes) and skips comments. It is a reader for counters that keel's
//! own proxies expose, used by `keelctl demo` and the cross-process tests; it must never become
//! a general Prometheus client, and never fail a whole scrape because of one line it does not
//! understand (such lines are counted in [`Metrics::skipped`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A sample's labels, ordered so that equal label sets compare equal.
pub type Labels = BTreeMap<String, String>;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// Lines that were neither comments, blank, nor samples this reader understands.
    pub skipped: usize,
}

impl Metrics {
    /// Parses a text exposition.
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_sample(line) {
                Some(sample) => metrics.samples.push(sample),
                None => metrics.skipped += 1,
            }
        }
        metrics
    }

    /// Samples named `name` whose labels include every pair of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples named `name` whose labels include every pair of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    /// How much each counter named `name` grew since `before`, by label set; series that did not
    /// grow are left out. A series absent from `before` counts from zero, and one that shrank
    /// (the proxy restarted) counts from zero as well.
    pub fn growth(&self, before: &Metrics, name: &str) -> BTreeMap<Labels, f64> {
        let old: BTreeMap<&Labels, f64> = before
            .samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| (&s.labels, s.value))
            .collect();
        let mut grown = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let from = old.get(&s.labels).copied().unwrap_or(0.0);
            let delta = if s.value >= from {
                s.value - from
            } else {
                s.value
            };
            if delta > 0.0 {
                *grown.entry(s.labels.clone()).or_insert(0.0) += delta;
            }
        }
        grown
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels = Labels::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

/// Scrapes `http://<admin>/metrics`.
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<Metrics> {
    let text = get_text(&format!("http://{admin}/metrics")).await?;
    Ok(Metrics::parse(&text))
}

/// `GET url`, expecting 200 within five seconds; the body as text.
async fn get_text(url: &str) -> anyhow::Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .with_context(|| format!("{url} did not answer within 5s"))?
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .with_context(|| format!("{url} did not finish its answer within 5s"))?
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    anyhow::ensure!(status == http::StatusCode::OK, "{url} answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP keel_requests_total Requests.
# TYPE keel_requests_total counter
keel_requests_total{direction="outbound",service="demo/articles",route="default",endpoint="10.77.0.3:8080",status="200"} 7
keel_requests_total{direction="outbound",service="demo/articles",route="default",endpoint="10.77.0.4:8080",status="200"} 5 1700000000000
keel_requests_total{direction="inbound",service="demo/x",route="a \"quoted\", comma\\",endpoint="e",status="503"} 1
keel_tcp_connections_opened_total{direction="outbound",protocol="http1"} 3
process_start_time_seconds 1.7e9
garbage line without value{
"#;

    #[test]
    fn parses_samples_labels_and_escapes() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.samples.len(), 5);
        assert_eq!(m.skipped, 1);
        assert_eq!(
            m.sum(
                "keel_requests_total",
                &[("direction", "outbound"), ("service", "demo/articles")]
            ),
            12.0
        );
        let inbound: Vec<&Sample> = m
            .matching("keel_requests_total", &[("direction", "inbound")])
            .collect();
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0].labels["route"], "a \"quoted\", comma\\");
        assert_eq!(m.sum("process_start_time_seconds", &[]), 1.7e9);
    }

    #[test]
    fn growth_counts_new_series_and_restarts_from_zero() {
        let before = Metrics::parse(TEXT);
        let after = Metrics::parse(
            r#"keel_requests_total{direction="outbound",service="demo/articles",route="default",endpoint="10.77.0.3:8080",status="200"} 10
keel_requests_total{direction="outbound",service="demo/articles",route="default",endpoint="10.77.0.4:8080",status="200"} 2
keel_requests_total{direction="outbound",service="demo/reads",route="split",endpoint="10.77.0.7:8080",status="200"} 4
"#,
        );
        let grown = after.growth(&before, "keel_requests_total");
        let values: Vec<f64> = grown.values().copied().collect();
        assert_eq!(values, vec![3.0, 2.0, 4.0]);
    }
}

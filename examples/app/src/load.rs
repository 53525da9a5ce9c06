//! The load generator (`--role load`): what readers and writers do to the articles service,
//! sent from inside a pod through its sidecar, with each request's latency measured here, by the
//! client, from the moment it is sent to the end of its answer.
//!
//! Requests follow a fixed, weighted mix of kinds (see [`Kind::MIX`]), paced evenly over the
//! duration (open loop) with at most `concurrency` in flight. The report is one JSON document on
//! stdout ([`Report`]); `keelctl demo` reads it. Any answer that is not a 2xx counts as a
//! failure. It must never retry, and never let a request run past the upstream timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::articles::SEEDED;
use crate::upstream::Upstream;

/// One kind of request in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    ArticlesList,
    ArticlesGet,
    ArticlesPost,
    CommentsList,
    CommentsPost,
    ReadsBump,
    ReadsCanary,
}

/// The service a kind calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Articles,
    Comments,
    Reads,
}

impl Kind {
    /// The mix: kinds with their relative frequency.
    pub const MIX: [(Kind, u32); 7] = [
        (Kind::ArticlesGet, 4),
        (Kind::ArticlesList, 2),
        (Kind::ArticlesPost, 1),
        (Kind::CommentsList, 2),
        (Kind::CommentsPost, 1),
        (Kind::ReadsBump, 3),
        (Kind::ReadsCanary, 1),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ArticlesList => "articles-list",
            Kind::ArticlesGet => "articles-get",
            Kind::ArticlesPost => "articles-post",
            Kind::CommentsList => "comments-list",
            Kind::CommentsPost => "comments-post",
            Kind::ReadsBump => "reads-bump",
            Kind::ReadsCanary => "reads-canary",
        }
    }

    pub fn target(self) -> Target {
        match self {
            Kind::ArticlesList | Kind::ArticlesGet | Kind::ArticlesPost => Target::Articles,
            Kind::CommentsList | Kind::CommentsPost => Target::Comments,
            Kind::ReadsBump | Kind::ReadsCanary => Target::Reads,
        }
    }

    /// The request as a human reads it.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::ArticlesList => "GET /articles",
            Kind::ArticlesGet => "GET /articles/{id}",
            Kind::ArticlesPost => "POST /articles",
            Kind::CommentsList => "GET /comments?article={id}",
            Kind::CommentsPost => "POST /comments",
            Kind::ReadsBump => "POST /reads/{id}",
            Kind::ReadsCanary => "POST /reads/{id} x-canary: 1",
        }
    }

    /// Method, path, body and extra headers of the `n`th request of this kind.
    fn request(
        self,
        n: u64,
    ) -> (
        Method,
        String,
        Option<serde_json::Value>,
        &'static [(&'static str, &'static str)],
    ) {
        // Only seeded articles: every instance has them, so no answer depends on balancing.
        let id = 1 + n % SEEDED.len() as u64;
        match self {
            Kind::ArticlesList => (Method::GET, "/articles".to_owned(), None, &[]),
            Kind::ArticlesGet => (Method::GET, format!("/articles/{id}"), None, &[]),
            Kind::ArticlesPost => (
                Method::POST,
                "/articles".to_owned(),
                Some(json!({"title": format!("Load test {n}"), "body": "Sent by keel-demo-app."})),
                &[],
            ),
            Kind::CommentsList => (Method::GET, format!("/comments?article={id}"), None, &[]),
            Kind::CommentsPost => (
                Method::POST,
                "/comments".to_owned(),
                Some(json!({"article": id, "author": "load", "text": format!("Comment {n}")})),
                &[],
            ),
            Kind::ReadsBump => (Method::POST, format!("/reads/{id}"), None, &[]),
            Kind::ReadsCanary => (
                Method::POST,
                format!("/reads/{id}"),
                None,
                &[("x-canary", "1")],
            ),
        }
    }
}

/// What the load generator was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub requests: u64,
    pub duration: Duration,
    pub concurrency: usize,
    /// Send only this kind instead of the mix.
    pub only: Option<Kind>,
}

/// The services the load calls; a kind whose service is absent is left out of the mix.
#[derive(Debug, Clone)]
pub struct Targets {
    pub articles: Option<Upstream>,
    pub comments: Option<Upstream>,
    pub reads: Option<Upstream>,
}

impl Targets {
    fn get(&self, target: Target) -> Option<&Upstream> {
        match target {
            Target::Articles => self.articles.as_ref(),
            Target::Comments => self.comments.as_ref(),
            Target::Reads => self.reads.as_ref(),
        }
    }
}

/// The JSON report, one entry per kind sent.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub elapsed_ms: u64,
    pub kinds: Vec<KindReport>,
}

#[derive(Debug, Default, Serialize)]
pub struct KindReport {
    pub kind: &'static str,
    pub service: &'static str,
    pub request: &'static str,
    /// Every request's latency, in microseconds, in the order they completed.
    pub latencies_us: Vec<u64>,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer, by error.
    pub errors: BTreeMap<String, u64>,
    /// Answers by the `x-served-by` of the instance that sent them.
    pub served_by: BTreeMap<String, u64>,
}

struct Outcome {
    kind: Kind,
    latency: Duration,
    result: Result<(u16, Option<String>), String>,
}

/// One cycle of the mix, interleaved so that every stretch of the run sees every kind; kinds
/// whose service is absent are left out. The run repeats it.
fn cycle(plan: &Plan, targets: &Targets) -> anyhow::Result<Vec<Kind>> {
    let mix: Vec<(Kind, u32)> = match plan.only {
        Some(kind) => vec![(kind, 1)],
        None => Kind::MIX.to_vec(),
    };
    let mut cycle = Vec::new();
    let max = mix.iter().map(|(_, w)| *w).max().unwrap_or(0);
    for round in 0..max {
        for (kind, weight) in &mix {
            if round < *weight && targets.get(kind.target()).is_some() {
                cycle.push(*kind);
            }
        }
    }
    if cycle.is_empty() {
        anyhow::bail!(
            "no service to send the requested kinds to: give --articles, --comments or --reads"
        );
    }
    Ok(cycle)
}

/// Runs the plan and returns the report.
pub async fn run(plan: Plan, targets: Targets) -> anyhow::Result<Report> {
    let cycle = cycle(&plan, &targets)?;
    let targets = Arc::new(targets);
    let slots = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    // Seconds between two sends; the `i`th request is due at `start + i * interval`.
    let interval = if plan.requests == 0 {
        0.0
    } else {
        plan.duration.as_secs_f64() / plan.requests as f64
    };
    let start = Instant::now();
    let mut sent: BTreeMap<Kind, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<Kind, KindReport> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    for (i, kind) in (0..plan.requests).zip(cycle.iter().copied().cycle()) {
        let due = start + Duration::from_secs_f64(interval * i as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = slots.clone().acquire_owned().await?;
        let n = sent.entry(kind).or_insert(0);
        let nth = *n;
        *n += 1;
        let targets = targets.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let Some(upstream) = targets.get(kind.target()) else {
                return Outcome {
                    kind,
                    latency: Duration::ZERO,
                    result: Err("no upstream".to_owned()),
                };
            };
            let (method, path, body, headers) = kind.request(nth);
            let began = Instant::now();
            let answer = upstream.call(method, &path, body.as_ref(), headers).await;
            Outcome {
                kind,
                latency: began.elapsed(),
                result: answer
                    .map(|a| (a.status.as_u16(), a.served_by))
                    .map_err(|e| root_cause(&e)),
            }
        });
        // Record what finished, so that a long run holds only the requests in flight.
        while let Some(joined) = tasks.try_join_next() {
            record(&mut by_kind, joined?);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        record(&mut by_kind, joined?);
    }
    Ok(Report {
        elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        kinds: by_kind.into_values().collect(),
    })
}

fn record(by_kind: &mut BTreeMap<Kind, KindReport>, outcome: Outcome) {
    let report = by_kind.entry(outcome.kind).or_insert_with(|| KindReport {
        kind: outcome.kind.name(),
        service: match outcome.kind.target() {
            Target::Articles => "articles",
            Target::Comments => "comments",
            Target::Reads => "reads",
        },
        request: outcome.kind.describe(),
        ..KindReport::default()
    });
    report
        .latencies_us
        .push(u64::try_from(outcome.latency.as_micros()).unwrap_or(u64::MAX));
    match outcome.result {
        Ok((status, served_by)) => {
            *report.statuses.entry(status).or_insert(0) += 1;
            let by = served_by.unwrap_or_else(|| "(none)".to_owned());
            *report.served_by.entry(by).or_insert(0) += 1;
        }
        Err(error) => *report.errors.entry(error).or_insert(0) += 1,
    }
}

/// The innermost cause, which is what distinguishes one failure from another ("connection
/// refused", "no answer within 5s").
fn root_cause(error: &anyhow::Error) -> String {
    error.root_cause().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        let uri: http::Uri = "http://127.0.0.1:1".parse().unwrap_or_default();
        Targets {
            articles: Upstream::new("articles", "demo", &uri).ok(),
            comments: Upstream::new("comments", "demo", &uri).ok(),
            reads: None,
        }
    }

    fn plan(only: Option<Kind>) -> Plan {
        Plan {
            requests: 20,
            duration: Duration::ZERO,
            concurrency: 1,
            only,
        }
    }

    #[test]
    fn the_cycle_follows_the_mix_and_skips_absent_services() {
        let kinds = cycle(&plan(None), &targets()).expect("a cycle");
        // The mix without reads: 4 + 2 + 1 + 2 + 1 requests, interleaved.
        assert_eq!(kinds.len(), 10);
        assert!(!kinds.iter().any(|k| k.target() == Target::Reads));
        assert_eq!(kinds.iter().filter(|k| **k == Kind::ArticlesGet).count(), 4);
        assert_eq!(
            &kinds[..5],
            &[
                Kind::ArticlesGet,
                Kind::ArticlesList,
                Kind::ArticlesPost,
                Kind::CommentsList,
                Kind::CommentsPost
            ]
        );
    }

    #[test]
    fn only_sends_one_kind_and_needs_its_service() {
        assert!(cycle(&plan(Some(Kind::ReadsCanary)), &targets()).is_err());
        assert_eq!(
            cycle(&plan(Some(Kind::CommentsPost)), &targets()).expect("a cycle"),
            vec![Kind::CommentsPost]
        );
    }
}

//! `keel-demo-app`: the articles service of keel's local mesh demo, as one binary with one role
//! per instance.
//!
//! - `frontend` serves `GET /` and `GET /articles/<id>` by calling articles;
//! - `articles` serves `GET /articles`, `GET /articles/<id>` (calling comments and reads) and
//!   `POST /articles`;
//! - `comments` and `reads` keep per-instance state in memory;
//! - `load` sends a mix of requests to articles, comments and reads and prints a JSON report.
//!
//! Services call each other by address (`--articles http://<VIP>:80`) with a `Host` naming the
//! service, through the pod's sidecar, exactly as an application that knows nothing of the mesh.
//! Every answer carries `x-served-by: <workload>`. This binary must never know about keel: no
//! mesh headers, no retries, no balancing of its own.

mod articles;
mod comments;
mod frontend;
mod load;
mod reads;
mod server;
mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use http::Uri;

use crate::upstream::Upstream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleName {
    Frontend,
    Articles,
    Comments,
    Reads,
    Load,
}

/// The articles service of keel's demo: one role per instance.
#[derive(Debug, Parser)]
#[command(name = "keel-demo-app", version, about)]
struct Cli {
    /// What this instance is.
    #[arg(long, env = "KEEL_DEMO_ROLE", value_enum)]
    role: RoleName,
    /// Where to listen (every role but load).
    #[arg(long, env = "KEEL_DEMO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The name this instance reports in `x-served-by`.
    #[arg(long, env = "KEEL_DEMO_WORKLOAD", default_value = "local")]
    workload: String,
    /// The namespace of the services called, for their `Host` header
    /// (`<service>.<namespace>.svc.cluster.local`).
    #[arg(long, env = "KEEL_DEMO_NAMESPACE", default_value = "demo")]
    namespace: String,
    /// The articles service, e.g. http://10.96.0.11:80 (frontend, load).
    #[arg(long, env = "KEEL_DEMO_ARTICLES")]
    articles: Option<Uri>,
    /// The comments service, e.g. http://10.96.0.12:80 (articles, load).
    #[arg(long, env = "KEEL_DEMO_COMMENTS")]
    comments: Option<Uri>,
    /// The reads service, e.g. http://10.96.0.13:80 (articles, load).
    #[arg(long, env = "KEEL_DEMO_READS")]
    reads: Option<Uri>,
    /// load: how many requests to send in all.
    #[arg(long, env = "KEEL_DEMO_REQUESTS", default_value_t = 600)]
    requests: u64,
    /// load: how long to spread them over (e.g. 10s, 1m; 0s sends them as fast as allowed).
    #[arg(long, env = "KEEL_DEMO_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// load: the most requests in flight at once.
    #[arg(long, env = "KEEL_DEMO_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// load: send only this kind of request instead of the mix.
    #[arg(long, value_enum)]
    only: Option<load::Kind>,
    /// Log filter, e.g. "info" or "keel_demo_app=debug". Logs go to stderr.
    #[arg(long, env = "KEEL_LOG", default_value = "info")]
    log: String,
}

impl Cli {
    fn upstream(&self, service: &'static str, uri: Option<&Uri>) -> anyhow::Result<Upstream> {
        let uri = uri.with_context(|| {
            format!(
                "--role {:?} needs --{service} (e.g. http://10.96.0.11:80)",
                self.role
            )
        })?;
        Upstream::new(service, &self.namespace, uri)
    }

    fn optional(
        &self,
        service: &'static str,
        uri: Option<&Uri>,
    ) -> anyhow::Result<Option<Upstream>> {
        uri.map(|uri| Upstream::new(service, &self.namespace, uri))
            .transpose()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .init();
    match cli.role {
        RoleName::Frontend => {
            let articles = cli.upstream("articles", cli.articles.as_ref())?;
            server::serve(cli.listen, &cli.workload, frontend::Frontend { articles }).await
        }
        RoleName::Articles => {
            let comments = cli.upstream("comments", cli.comments.as_ref())?;
            let reads = cli.upstream("reads", cli.reads.as_ref())?;
            server::serve(
                cli.listen,
                &cli.workload,
                articles::Articles::new(comments, reads),
            )
            .await
        }
        RoleName::Comments => {
            let seeded = articles::SEEDED.len() as u64;
            server::serve(cli.listen, &cli.workload, comments::Comments::new(seeded)).await
        }
        RoleName::Reads => server::serve(cli.listen, &cli.workload, reads::Reads::default()).await,
        RoleName::Load => {
            let targets = load::Targets {
                articles: cli.optional("articles", cli.articles.as_ref())?,
                comments: cli.optional("comments", cli.comments.as_ref())?,
                reads: cli.optional("reads", cli.reads.as_ref())?,
            };
            let plan = load::Plan {
                requests: cli.requests,
                duration: cli.duration,
                concurrency: cli.concurrency,
                only: cli.only,
            };
            let report = load::run(plan, targets).await?;
            println!(
                "{}",
                serde_json::to_string(&report).context("encoding the report")?
            );
            Ok(())
        }
    }
}

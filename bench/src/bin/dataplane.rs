//! Data-plane benchmark: direct vs keel one hop vs keel sidecar pair, measured in one run (see
//! `keel_bench::dataplane` and bench/README.md, "Data plane").
//!
//! Prints a markdown report (medians with min and max over `--runs`) and, with `--out`, puts it
//! into that file's data-plane section. Needs root; removes everything it created on exit, on
//! error, and on Ctrl-C or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use keel_bench::dataplane::{self, Options};
use keel_bench::results;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Measure what keel's sidecars add to a request, against a direct request")]
struct Args {
    #[command(flatten)]
    options: Options,
}

/// Resolves when the process is asked to stop (Ctrl-C, SIGTERM or SIGHUP).
async fn stop_requested() -> anyhow::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    Ok(tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = terminate.recv() => "terminated",
        _ = hangup.recv() => "hung up",
    })
}

async fn main_async(options: Options) -> anyhow::Result<()> {
    // Dropping the benchmark's future (when a signal wins) removes its network and processes.
    let report = tokio::select! {
        biased;
        why = stop_requested() => anyhow::bail!("{}; everything the benchmark created is removed", why?),
        report = dataplane::run(&options, results::command_line()) => report?,
    };
    print!("{report}");
    if let Some(out) = &options.out {
        dataplane::write_section(out, &report)?;
        eprintln!("Wrote the data-plane section of {}", out.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    // The harness only waits on its children: one thread is plenty and stays out of their way.
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|runtime| runtime.block_on(main_async(args.options)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Open-loop load at a fixed rate, latency measured from each request's intended send time (see
//! `keel_bench::openloop`). Prints one JSON report on standard output; the data-plane benchmark
//! runs it inside a pod's network namespace.
//!
//! ```sh
//! target/release/openloop --url http://127.0.0.1:8080/ --rate 2000 --duration 10s
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keel_bench::openloop::{self, Config, Target};

#[derive(Debug, Parser)]
#[command(about = "Open-loop HTTP/1.1 load at a fixed rate, without coordinated omission")]
struct Args {
    /// An http:// URL whose host is an IP address.
    #[arg(long)]
    url: Target,
    /// Requests per second.
    #[arg(long)]
    rate: u32,
    /// How long latencies are recorded (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long requests are sent before recording starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long one request may take before it counts as an error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config {
        target: args.url,
        rate: args.rate,
        duration: args.duration,
        warmup: args.warmup,
        connections: args.connections,
        timeout: args.timeout,
    };
    // One thread answers every connection, as `wrk -t1` does; the scheduler has its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(openloop::run(&config))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

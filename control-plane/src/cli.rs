//! `keelctl`: validate mesh YAML offline, apply it through a running control plane, and show
//! what the control plane and its proxies are doing.
//!
//! Human output by default, `-o json` for scripts. Exit status: 0 on success, 1 when the
//! configuration is invalid or the request failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::model::{self, ValidationErrors};

#[derive(Debug, Parser)]
#[command(name = "keelctl", version, about = "Operate a keel service mesh")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check mesh YAML files or directories without a control plane.
    Validate {
        /// A file or directory; repeatable. A directory is read as a whole mesh.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Send mesh YAML to the running control plane, which validates and persists it.
    Apply {
        /// A file, or a directory whose YAML files are applied one by one.
        #[arg(short = 'f', long = "filename", required = true)]
        path: PathBuf,
        #[arg(long, env = "KEEL_ADMIN", default_value = "http://127.0.0.1:15014")]
        control_plane: String,
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Run the local mesh: one network namespace per workload with keel-proxy and the demo app,
    /// traffic from the frontend, and a per-route summary. Needs root.
    Demo(Box<crate::demo::DemoArgs>),
    /// Show the control plane's configuration state and its connected proxies.
    Status {
        #[arg(long, env = "KEEL_ADMIN", default_value = "http://127.0.0.1:15014")]
        control_plane: String,
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
}

/// Runs a parsed command line; returns the exit status.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Validate { paths, output } => Ok(validate(&paths, output)),
        Command::Apply {
            path,
            control_plane,
            output,
        } => apply(&path, &control_plane, output).await,
        Command::Status {
            control_plane,
            output,
        } => status(&control_plane, output).await,
        Command::Demo(args) => crate::demo::run(*args).await,
    }
}

fn validate(paths: &[PathBuf], output: Output) -> i32 {
    match model::load_files(paths) {
        Ok(model) => {
            let count = model.services.len()
                + model.workloads.len()
                + model.traffic_policies.len()
                + model.authorization_policies.len();
            match output {
                Output::Human => println!(
                    "valid: {} services, {} workloads, {} traffic policies, {} authorization policies",
                    model.services.len(),
                    model.workloads.len(),
                    model.traffic_policies.len(),
                    model.authorization_policies.len()
                ),
                Output::Json => {
                    println!("{}", serde_json::json!({"valid": true, "resources": count}))
                }
            }
            0
        }
        Err(errors) => {
            print_errors(&errors, output);
            1
        }
    }
}

fn print_errors(errors: &ValidationErrors, output: Output) {
    match output {
        Output::Human => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
        }
        Output::Json => println!("{}", serde_json::json!({"valid": false, "errors": errors})),
    }
}

async fn apply(path: &Path, control_plane: &str, output: Output) -> anyhow::Result<i32> {
    let files = if path.is_dir() {
        model::yaml_files(path).with_context(|| format!("listing {}", path.display()))?
    } else {
        vec![path.to_path_buf()]
    };
    let mut failed = false;
    for file in files {
        let body = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let name = file.to_string_lossy();
        let url = format!(
            "{}/apply?name={}",
            control_plane.trim_end_matches('/'),
            percent_encode(&name)
        );
        let (status, answer) = request(http::Method::POST, &url, body.into()).await?;
        match (status.as_u16(), output) {
            (200, Output::Json) => println!("{}", String::from_utf8_lossy(&answer)),
            (200, Output::Human) => {
                let answer: serde_json::Value = serde_json::from_slice(&answer)
                    .context("the control plane's answer is not JSON")?;
                for r in answer["resources"].as_array().into_iter().flatten() {
                    println!(
                        "{} {} {}",
                        r["kind"].as_str().unwrap_or("?"),
                        r["name"].as_str().unwrap_or("?"),
                        r["action"].as_str().unwrap_or("?")
                    );
                }
            }
            (422, _) => {
                failed = true;
                let errors: ValidationErrors = serde_json::from_slice(&answer)
                    .context("the control plane's error answer is not JSON")?;
                print_errors(&errors, output);
            }
            (code, _) => {
                failed = true;
                eprintln!(
                    "keelctl: applying {name} failed ({code}): {}",
                    String::from_utf8_lossy(&answer).trim()
                );
            }
        }
    }
    Ok(i32::from(failed))
}

async fn status(control_plane: &str, output: Output) -> anyhow::Result<i32> {
    let url = format!("{}/status", control_plane.trim_end_matches('/'));
    let (code, body) = request(http::Method::GET, &url, Bytes::new()).await?;
    if !code.is_success() {
        bail!(
            "{url} answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    if let Output::Json = output {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(0);
    }
    let s: serde_json::Value =
        serde_json::from_slice(&body).context("the control plane's status is not JSON")?;
    print!("{}", render_status(&s));
    Ok(0)
}

/// The human form of `GET /status`.
fn render_status(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "Configuration: version {} published {} from {}",
        s["version"],
        str_of(&s["published"]),
        str_of(&s["source"]["source"])
    );
    let counts: Vec<String> = s["resources"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "Resources: {}", counts.join(", "));
    match s["source"]["rejected"].as_array() {
        Some(errors) => {
            let _ = writeln!(
                out,
                "Last change REJECTED at {} (still serving version {}):",
                str_of(&s["source"]["rejected_at"]),
                s["version"]
            );
            for e in errors {
                let _ = writeln!(
                    out,
                    "  {}:{}:{}: {}: {}",
                    str_of(&e["file"]),
                    e["line"],
                    e["column"],
                    str_of(&e["field"]),
                    str_of(&e["reason"])
                );
            }
        }
        None => {
            let _ = writeln!(out, "Last change: accepted");
        }
    }
    let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nProxies: {}", proxies.len());
    if proxies.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<32} {:<20} {:<22} {:<40} {:>5}  LAST ERROR",
        "PROXY", "LOCALITY", "CONNECTED", "ACKED VERSIONS", "NACKS"
    );
    for p in proxies {
        let acked: Vec<String> = p["types"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v["acked_version"].as_u64() {
                        Some(ver) => format!("{k}={ver}"),
                        None => format!("{k}=pending"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<32} {:<20} {:<22} {:<40} {:>5}  {}",
            str_of(&p["id"]),
            str_of(&p["locality"]),
            str_of(&p["connected_at"]),
            acked.join(","),
            p["nacks_total"],
            p["last_error"].as_str().unwrap_or("")
        );
    }
    out
}

async fn request(
    method: http::Method,
    url: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/yaml")
        .body(Full::new(body))
        .with_context(|| format!("bad control plane address in {url}"))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .with_context(|| format!("{url} did not answer within 30s"))?
        .with_context(|| format!("cannot reach the control plane at {url}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer of {url}"))?
        .to_bytes();
    Ok((status, body))
}

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

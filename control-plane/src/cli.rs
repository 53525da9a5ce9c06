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
    /// The mesh's certificate authority: its roots, and their rotation.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        #[arg(
            long,
            env = "KEEL_ADMIN",
            default_value = "http://127.0.0.1:15014",
            global = true
        )]
        control_plane: String,
    },
    /// Print a workload's bootstrap token (its proof of identity in the local mesh), for
    /// `keel-proxy run --identity-token-file`.
    Token {
        /// The workload's name.
        workload: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long, env = "KEEL_ADMIN", default_value = "http://127.0.0.1:15014")]
        control_plane: String,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// The roots, which one signs, and the root of each proxy's newest certificate.
    Status {
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Print the trust bundle (PEM), for `keel-proxy run --ca-root-file`.
    Bundle,
    /// Add a root that does not sign yet: generated, or imported from PEM files.
    AddRoot {
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Make a root sign new certificates; refused until every proxy holding a certificate is
    /// connected and trusts it.
    UseRoot {
        id: String,
        /// Go ahead even though some proxies cannot be shown to trust it (they will refuse its
        /// certificates until they receive the new bundle).
        #[arg(long)]
        force: bool,
    },
    /// Remove a root; refused while it signs or an unexpired certificate chains to it, whether
    /// its proxy is connected or not.
    RemoveRoot {
        id: String,
        /// Remove it even though unexpired certificates chain to it (peers will refuse them).
        #[arg(long)]
        force: bool,
    },
    /// Rotate to a new root with no failed request: add it, wait until every proxy trusts it,
    /// make it sign, wait until every certificate from the old root(s) was renewed or expired,
    /// remove the old root(s).
    Rotate {
        /// How long to wait for proxies at each step.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// When a step is still refused after --timeout, go ahead anyway (and say who is cut
        /// off), instead of stopping.
        #[arg(long)]
        force: bool,
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
        Command::Ca {
            command,
            control_plane,
        } => ca(command, &control_plane).await,
        Command::Token {
            workload,
            namespace,
            control_plane,
        } => token(&workload, &namespace, &control_plane).await,
    }
}

fn admin_url(control_plane: &str, path: &str) -> String {
    format!("{}{path}", control_plane.trim_end_matches('/'))
}

/// A request whose answer must be a success; returns its body.
async fn expect_ok(method: http::Method, url: &str, body: Bytes) -> anyhow::Result<Bytes> {
    let (code, answer) = request(method, url, body).await?;
    if !code.is_success() {
        bail!("{code}: {}", String::from_utf8_lossy(&answer).trim());
    }
    Ok(answer)
}

async fn token(workload: &str, namespace: &str, control_plane: &str) -> anyhow::Result<i32> {
    let body = serde_json::json!({ "namespace": namespace, "workload": workload });
    let answer = expect_ok(
        http::Method::POST,
        &admin_url(control_plane, "/tokens"),
        body.to_string().into(),
    )
    .await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    println!("{}", answer["token"].as_str().unwrap_or_default());
    Ok(0)
}

async fn ca(command: CaCommand, control_plane: &str) -> anyhow::Result<i32> {
    let url = |path: &str| admin_url(control_plane, path);
    match command {
        CaCommand::Status { output } => {
            let body = expect_ok(http::Method::GET, &url("/ca"), Bytes::new()).await?;
            match output {
                Output::Json => println!("{}", String::from_utf8_lossy(&body)),
                Output::Human => {
                    let status: serde_json::Value = serde_json::from_slice(&body)?;
                    print!("{}", render_ca(&status));
                }
            }
        }
        CaCommand::Bundle => {
            let body = expect_ok(http::Method::GET, &url("/ca/bundle.pem"), Bytes::new()).await?;
            print!("{}", String::from_utf8_lossy(&body));
        }
        CaCommand::AddRoot { cert, key } => {
            let body = match cert.zip(key) {
                Some((cert, key)) => serde_json::json!({
                    "cert_pem": std::fs::read_to_string(&cert)
                        .with_context(|| format!("reading {}", cert.display()))?,
                    "key_pem": std::fs::read_to_string(&key)
                        .with_context(|| format!("reading {}", key.display()))?,
                })
                .to_string(),
                None => String::new(),
            };
            let answer = expect_ok(http::Method::POST, &url("/ca/roots"), body.into()).await?;
            let answer: serde_json::Value = serde_json::from_slice(&answer)?;
            println!(
                "root {} added (trusted, not signing)",
                answer["id"].as_str().unwrap_or("?")
            );
        }
        CaCommand::UseRoot { id, force } => {
            let answer = expect_ok(
                http::Method::POST,
                &url(&format!("/ca/roots/{id}/sign{}", force_query(force))),
                Bytes::new(),
            )
            .await?;
            print_forced(&answer);
            println!("root {id} signs new certificates");
        }
        CaCommand::RemoveRoot { id, force } => {
            let answer = expect_ok(
                http::Method::DELETE,
                &url(&format!("/ca/roots/{id}{}", force_query(force))),
                Bytes::new(),
            )
            .await?;
            print_forced(&answer);
            println!("root {id} removed");
        }
        CaCommand::Rotate { timeout, force } => rotate(control_plane, timeout, force).await?,
    }
    Ok(0)
}

fn force_query(force: bool) -> &'static str {
    if force { "?force=true" } else { "" }
}

/// Says what a forced step went past, from the admin API's answer.
fn print_forced(answer: &[u8]) {
    let answer: serde_json::Value = serde_json::from_slice(answer).unwrap_or_default();
    if let Some(reason) = answer["forced_past"].as_str() {
        println!("  forced past: {reason}");
    }
}

/// Repeats `step` (a request answered 409 while proxies catch up) until it succeeds; after
/// `timeout`, sends it once more with `force=true` when `force`, else gives up.
async fn until_accepted(
    what: &str,
    method: http::Method,
    url: &str,
    timeout: Duration,
    force: bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let (code, answer) = request(method.clone(), url, Bytes::new()).await?;
        if code.is_success() {
            return Ok(());
        }
        let reason = String::from_utf8_lossy(&answer).trim().to_owned();
        if code != http::StatusCode::CONFLICT {
            bail!("{what}: {code}: {reason}");
        }
        if reason != last {
            println!("  waiting: {reason}");
            last = reason;
        }
        if tokio::time::Instant::now() >= deadline {
            if !force {
                bail!(
                    "{what}: still refused after {timeout:?}: {last}\n(wait longer with \
                     --timeout, or go ahead anyway with --force)"
                );
            }
            println!("  still refused after {timeout:?}; going ahead (--force)");
            let answer = expect_ok(method, &format!("{url}?force=true"), Bytes::new())
                .await
                .with_context(|| format!("{what}, forced"))?;
            print_forced(&answer);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn rotate(control_plane: &str, timeout: Duration, force: bool) -> anyhow::Result<()> {
    let url = |path: &str| admin_url(control_plane, path);
    let status = expect_ok(http::Method::GET, &url("/ca"), Bytes::new()).await?;
    let status: serde_json::Value = serde_json::from_slice(&status)?;
    let old: Vec<String> = status["roots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    let answer = expect_ok(http::Method::POST, &url("/ca/roots"), Bytes::new()).await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    let new = answer["id"]
        .as_str()
        .context("the control plane named no new root")?
        .to_owned();
    println!("1/3 root {new} added; waiting for every proxy to trust it");
    until_accepted(
        "making the new root sign",
        http::Method::POST,
        &url(&format!("/ca/roots/{new}/sign")),
        timeout,
        force,
    )
    .await?;
    println!("2/3 root {new} signs; waiting for every proxy to renew");
    for id in old.iter().filter(|id| **id != new) {
        until_accepted(
            &format!("removing root {id}"),
            http::Method::DELETE,
            &url(&format!("/ca/roots/{id}")),
            timeout,
            force,
        )
        .await?;
        println!("3/3 root {id} removed");
    }
    println!("rotated to root {new}");
    Ok(())
}

/// The human form of `GET /ca`.
fn render_ca(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    let _ = writeln!(
        out,
        "Workload certificates live {}s.\n\n{:<18} {:<6} {:<26} {:<36} SUBJECT",
        s["workload_ttl_seconds"], "ROOT", "SIGNS", "EXPIRES", "CERTIFICATES IN USE"
    );
    let roots = s["roots"].as_array().cloned().unwrap_or_default();
    for r in &roots {
        let in_use = match r["certificates"].as_u64() {
            Some(0) | None => "none".to_owned(),
            Some(n) => format!("{n}, the last until {}", str_of(&r["last_expiry"])),
        };
        let _ = writeln!(
            out,
            "{:<18} {:<6} {:<26} {:<36} {}",
            str_of(&r["id"]),
            if r["signing"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            str_of(&r["not_after"]),
            in_use,
            r["subject"].as_str().unwrap_or("")
        );
    }
    for r in roots
        .iter()
        .filter(|r| r["signing"].as_bool() != Some(true))
    {
        let id = str_of(&r["id"]);
        match r["cannot_sign_because"].as_str() {
            Some(reason) => {
                let _ = writeln!(out, "\nRoot {id} cannot sign yet: {reason}");
            }
            None => {
                let _ = writeln!(out, "\nRoot {id} may sign.");
            }
        }
        match r["cannot_remove_because"].as_str() {
            Some(reason) => {
                let _ = writeln!(out, "Root {id} cannot be removed yet: {reason}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "Root {id} may be removed: no unexpired certificate chains to it."
                );
            }
        }
    }
    let issued = s["issued"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nUnexpired certificates: {}", issued.len());
    for cert in issued {
        let node = cert["node"].as_str().unwrap_or_default();
        let holder = if node.is_empty() {
            format!("(serial {})", str_of(&cert["serial"]))
        } else {
            node.to_owned()
        };
        let _ = writeln!(
            out,
            "  {holder:<32} {:<48} root {} until {}{}",
            str_of(&cert["identity"]),
            str_of(&cert["root"]),
            str_of(&cert["not_after"]),
            if cert["connected"].as_bool() == Some(true) {
                ""
            } else {
                " (not connected)"
            }
        );
    }
    out
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

/// Sends every file (one, or all the mesh files under a directory) in one request: the control
/// plane validates them together and applies all or none.
async fn apply(path: &Path, control_plane: &str, output: Output) -> anyhow::Result<i32> {
    let paths = if path.is_dir() {
        model::yaml_files(path).with_context(|| format!("listing {}", path.display()))?
    } else {
        vec![path.to_path_buf()]
    };
    let mut files = Vec::new();
    for file in &paths {
        let yaml =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        files.push(serde_json::json!({ "name": file.to_string_lossy(), "yaml": yaml }));
    }
    let url = format!("{}/apply", control_plane.trim_end_matches('/'));
    let body = serde_json::json!({ "files": files }).to_string();
    let (status, answer) =
        request_as(http::Method::POST, &url, "application/json", body.into()).await?;
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
            let errors: ValidationErrors = serde_json::from_slice(&answer)
                .context("the control plane's error answer is not JSON")?;
            print_errors(&errors, output);
            return Ok(1);
        }
        (code, _) => {
            eprintln!(
                "keelctl: applying {} failed ({code}): {}",
                path.display(),
                String::from_utf8_lossy(&answer).trim()
            );
            return Ok(1);
        }
    }
    Ok(0)
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
    if !proxies.is_empty() {
        render_proxies(&mut out, &proxies);
    }
    let gone = s["recently_disconnected"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !gone.is_empty() {
        let _ = writeln!(out, "\nRecently disconnected: {}", gone.len());
        let _ = writeln!(
            out,
            "{:<32} {:<22} {:>5}  {:<40}  LAST ERROR",
            "PROXY", "DISCONNECTED", "NACKS", "ENDED"
        );
        for p in gone {
            let _ = writeln!(
                out,
                "{:<32} {:<22} {:>5}  {:<40}  {}",
                str_of(&p["id"]),
                str_of(&p["disconnected_at"]),
                p["nacks_total"],
                p["end_reason"].as_str().unwrap_or("closed by the proxy"),
                p["last_error"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// The table of connected proxies.
fn render_proxies(out: &mut String, proxies: &[serde_json::Value]) {
    use std::fmt::Write;
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
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
}

async fn request(
    method: http::Method,
    url: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    request_as(method, url, "application/yaml", body).await
}

async fn request_as(
    method: http::Method,
    url: &str,
    content_type: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, content_type)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_status_says_why_a_root_must_stay() {
        let status = serde_json::json!({
            "workload_ttl_seconds": 86400,
            "roots": [
                {"id": "aaaa", "signing": false, "not_after": "2035-01-01T00:00:00Z",
                 "subject": "CN=old", "certificates": 1, "last_expiry": "2025-01-02T00:00:00Z",
                 "cannot_sign_because": null,
                 "cannot_remove_because": "1 unexpired certificates still chain to root aaaa: b.mt (not connected, until 2025-01-02T00:00:00Z)"},
                {"id": "bbbb", "signing": true, "not_after": "2035-01-01T00:00:00Z",
                 "subject": "CN=new", "certificates": 0, "last_expiry": null,
                 "cannot_sign_because": null, "cannot_remove_because": "it signs new certificates"}
            ],
            "issued": [
                {"node": "b.mt", "identity": "spiffe://x/ns/mt/sa/b", "serial": "01:02",
                 "root": "aaaa", "not_after": "2025-01-02T00:00:00Z", "connected": false}
            ]
        });
        let text = render_ca(&status);
        assert!(
            text.contains("Root aaaa cannot be removed yet: 1 unexpired certificates"),
            "{text}"
        );
        assert!(text.contains("Root aaaa may sign."), "{text}");
        assert!(!text.contains("Root bbbb"), "{text}");
        assert!(
            text.contains("1, the last until 2025-01-02T00:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains("b.mt") && text.contains("(not connected)"),
            "{text}"
        );
    }
}

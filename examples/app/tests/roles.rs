//! The demo app without a mesh: every role as its own process on 127.0.0.1, calling the others
//! directly, as it does through the sidecars in `keelctl demo`.
//!
//! This also makes `cargo test --workspace` build `target/<profile>/keel-demo-app`, which the
//! demo's own test (tests/tests/demo_e2e.rs) runs through `keelctl demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

const APP: &str = env!("CARGO_BIN_EXE_keel-demo-app");

/// A role's process, killed when dropped.
struct Instance {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `role` on a port of the kernel's choosing and waits for its "serving" line, which
/// names the address it bound.
fn start(role: &str, workload: &str, upstreams: &[(&str, SocketAddr)]) -> anyhow::Result<Instance> {
    let mut command = Command::new(APP);
    command
        .args([
            "--role",
            role,
            "--listen",
            "127.0.0.1:0",
            "--workload",
            workload,
        ])
        .env("KEEL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (service, addr) in upstreams {
        command
            .arg(format!("--{service}"))
            .arg(format!("http://{addr}"));
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {APP} --role {role}"))?;
    let stderr = child.stderr.take().context("the role's stderr")?;
    let (found, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("serving") {
                sent = found.send(line).is_ok();
            }
        }
    });
    let line = match lines.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("--role {role} never said it was serving (it exited: {status})");
        }
    };
    let addr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .with_context(|| format!("no listen= in {line:?}"))?
        .parse()
        .with_context(|| format!("the address in {line:?}"))?;
    Ok(Instance { child, addr })
}

/// One HTTP/1.1 GET, answered as (status, `x-served-by`, body).
fn get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String, Value)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of head in {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let served_by = head
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .unwrap_or_default()
        .to_owned();
    let body =
        serde_json::from_str(body).with_context(|| format!("the body of {path}: {body:?}"))?;
    Ok((status, served_by, body))
}

#[test]
fn the_roles_answer_each_other_and_the_load_generator() -> anyhow::Result<()> {
    let comments = start("comments", "comments-1", &[])?;
    let reads = start("reads", "reads-1", &[])?;
    let articles = start(
        "articles",
        "articles-1",
        &[("comments", comments.addr), ("reads", reads.addr)],
    )?;
    let frontend = start("frontend", "frontend-1", &[("articles", articles.addr)])?;

    // One page: frontend -> articles -> comments and reads.
    let (status, served_by, page) = get(frontend.addr, "frontend", "/articles/1")?;
    ensure!(status == 200, "GET /articles/1 answered {status}: {page}");
    ensure!(served_by == "frontend-1", "x-served-by {served_by:?}");
    ensure!(
        page["via"]["articles"] == "articles-1",
        "the page did not come from articles-1: {page}"
    );
    let article = &page["article"];
    ensure!(
        article["via"]["comments"] == "comments-1" && article["via"]["reads"] == "reads-1",
        "the article did not come from comments-1 and reads-1: {article}"
    );
    ensure!(
        article["reads"].as_u64().is_some(),
        "no read count: {article}"
    );
    let (status, _, missing) = get(frontend.addr, "frontend", "/articles/999")?;
    ensure!(
        status == 404,
        "an unknown article answered {status}: {missing}"
    );

    // The load generator's mix against the three services, every answer a success.
    let output = Command::new(APP)
        .args(["--role", "load", "--requests", "120", "--duration", "0s"])
        .arg(format!("--articles=http://{}", articles.addr))
        .arg(format!("--comments=http://{}", comments.addr))
        .arg(format!("--reads=http://{}", reads.addr))
        .env("KEEL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("running --role load")?;
    ensure!(
        output.status.success(),
        "--role load failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_slice(&output.stdout).context("the load generator's JSON report")?;
    let kinds = report["kinds"]
        .as_array()
        .context("no kinds in the report")?;
    ensure!(
        kinds.len() == 7,
        "expected the 7 kinds of the mix: {report}"
    );
    let mut total = 0;
    for kind in kinds {
        let name = &kind["kind"];
        let statuses = kind["statuses"].as_object().context("no statuses")?;
        ensure!(
            kind["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{name} had errors: {kind}"
        );
        for (status, count) in statuses {
            ensure!(status.starts_with('2'), "{name} got {count} x {status}");
            total += count.as_u64().unwrap_or(0);
        }
        let served_by = kind["served_by"].as_object().context("no served_by")?;
        let expected = format!("{}-1", kind["service"].as_str().unwrap_or_default());
        ensure!(
            served_by.keys().all(|by| *by == expected),
            "{name} answered by {served_by:?}, not only {expected}"
        );
    }
    ensure!(
        total == 120,
        "{total} answers out of 120 requests: {report}"
    );
    Ok(())
}

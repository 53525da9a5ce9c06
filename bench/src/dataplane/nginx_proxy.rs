//! nginx as a reference proxy for the one-hop path: its configuration
//! (`bench/dataplane/nginx-proxy.conf`, a template filled in with the pod's addresses) and the
//! count of requests it handled, from its `stub_status` page.
//!
//! It does less than a sidecar (one upstream, no routing, no balancing, no metrics of its own),
//! so its figures are the floor of what a proxy in that path costs on the machine: the kernel's
//! work for a recv and a send on each side of every request, and a parser that is hard to beat.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};

/// The configuration template.
const TEMPLATE: &str = include_str!("../../dataplane/nginx-proxy.conf");

/// Writes the configuration into `prefix` (created, with its `tmp`, and owned by `uid`, as which
/// nginx runs and writes its pid file there): nginx listens on `listen_port` (where the redirect
/// rules send the pod's outbound TCP), answers the benchmark's probes at `admin`, and forwards
/// to `upstream`. Returns the configuration file's path.
pub fn write_config(
    prefix: &Path,
    uid: u32,
    listen_port: u16,
    admin: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let tmp = prefix.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for dir in [prefix, tmp.as_path()] {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))
            .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
    }
    let config = fill(prefix, listen_port, admin, upstream)?;
    let path = prefix.join("nginx.conf");
    fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn fill(
    prefix: &Path,
    listen_port: u16,
    admin: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<String> {
    let prefix = prefix
        .to_str()
        .with_context(|| format!("{} is not UTF-8", prefix.display()))?;
    let config = TEMPLATE
        .replace("{{PREFIX}}", prefix)
        .replace("{{LISTEN_PORT}}", &listen_port.to_string())
        .replace("{{ADMIN_ADDR}}", &admin.to_string())
        .replace("{{UPSTREAM_ADDR}}", &upstream.to_string());
    // Only in the directives: the comments name the placeholders too.
    let unfilled = config
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find(|l| l.contains("{{"));
    ensure!(
        unfilled.is_none(),
        "the nginx proxy template has an unknown placeholder: {}",
        unfilled.unwrap_or_default().trim()
    );
    Ok(config)
}

/// The requests nginx handled, from its `stub_status` page:
///
/// ```text
/// Active connections: 65
/// server accepts handled requests
///  130 130 2901377
/// ```
///
/// It counts the benchmark's own probes too, a handful at most.
pub fn handled_requests(stats: &str) -> anyhow::Result<u64> {
    let mut lines = stats.lines();
    lines
        .find(|l| l.trim() == "server accepts handled requests")
        .context("nginx's stub_status has no \"server accepts handled requests\" line")?;
    let counts = lines
        .next()
        .context("nginx's stub_status ends before its counts")?;
    let requests = counts
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("nginx's stub_status counts {counts:?} have no requests"))?;
    requests
        .parse()
        .with_context(|| format!("nginx's stub_status requests {requests:?} is not a count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_filled_in_everywhere() {
        let config = fill(
            Path::new("/tmp/keel-bench/nginx-proxy"),
            15001,
            "10.91.0.3:15020".parse().unwrap(),
            "10.91.0.4:8080".parse().unwrap(),
        )
        .unwrap();
        assert!(config.contains("listen 15001 reuseport;"));
        assert!(config.contains("listen 10.91.0.3:15020;"));
        assert!(config.contains("server 10.91.0.4:8080;"));
        assert!(config.contains("pid /tmp/keel-bench/nginx-proxy/nginx.pid;"));
    }

    #[test]
    fn reads_the_requests_of_stub_status() {
        let stats = "Active connections: 65 \nserver accepts handled requests\n 130 130 2901377 \n\
                     Reading: 0 Writing: 1 Waiting: 64 \n";
        assert_eq!(handled_requests(stats).unwrap(), 2_901_377);
        let err = handled_requests("Active connections: 1\n").unwrap_err();
        assert!(err.to_string().contains("server accepts handled requests"));
        let err = handled_requests("server accepts handled requests\n 1 1 x\n").unwrap_err();
        assert!(format!("{err:#}").contains("not a count"));
    }
}

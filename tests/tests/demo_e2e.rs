//! `keelctl demo` as users run it: the binary, on examples/mesh.
//!
//! Without root it must refuse, naming what it needs (as root this test drops to uid 65534 with
//! `setpriv` to see that). As root, a short run must succeed, and neither that run nor one
//! interrupted with SIGINT (while it builds its network, or while traffic flows) may leave a
//! `keel-demo-*` namespace, its uplink, its lock, its work directory or a process behind.
//!
//! The demo's names, subnet (10.77.0.0/24) and ports are fixed, so its runs are in one test,
//! one after the other; a demo the user runs at the same time makes this test fail with the
//! demo's own "another keelctl demo is running". The non-root check runs everywhere; the root
//! test prints `SKIP: <reason>` and passes without root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use keel_tests::netns;
use keel_tests::skip_unless_root;

/// The demo's network suffix (see `keel_control_plane::demo`).
const SUFFIX: &str = "demo";
const LOCK_FILE: &str = "/run/keel-demo.pid";

fn keelctl() -> anyhow::Result<PathBuf> {
    netns::workspace_binary("keelctl", "keel-control-plane")
}

fn mesh_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn without_root_the_demo_says_what_it_needs() -> anyhow::Result<()> {
    let keelctl = keelctl()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let output = if root {
        // Staged where any user can run it, whatever the permissions of the build directory.
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let staged = dir.path().join("keelctl");
        if std::fs::hard_link(&keelctl, &staged).is_err() {
            std::fs::copy(&keelctl, &staged)?;
        }
        let output = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&staged)
            .args(["demo", "--config-dir"])
            .arg(mesh_dir())
            .env_remove("KEEL_LOG")
            .stdin(Stdio::null())
            .output()
            .context("running keelctl demo as uid 65534 (setpriv is in util-linux)")?;
        drop(dir);
        output
    } else {
        Command::new(&keelctl)
            .args(["demo", "--config-dir"])
            .arg(mesh_dir())
            .stdin(Stdio::null())
            .output()?
    };
    let stderr = text(&output.stderr);
    ensure!(
        !output.status.success(),
        "keelctl demo succeeded without root: {stderr}"
    );
    for needed in ["needs root", "ip, iptables and setpriv", "not root (euid"] {
        ensure!(
            stderr.contains(needed),
            "keelctl demo without root does not say {needed:?}: {stderr}"
        );
    }
    Ok(())
}

/// What a demo left on this machine: namespaces, the uplink, the lock, work directories, and
/// processes running the binaries it staged.
fn leftovers() -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
    for line in text(&namespaces.stdout).lines() {
        if let Some(name) = line.split_whitespace().next()
            && name.starts_with(&format!("keel-{SUFFIX}-"))
        {
            found.push(format!("namespace {name}"));
        }
    }
    let uplink = format!("keel-up{SUFFIX}");
    if Path::new("/sys/class/net").join(&uplink).exists() {
        found.push(format!("link {uplink}"));
    }
    if Path::new(LOCK_FILE).exists() {
        found.push(LOCK_FILE.to_owned());
    }
    let workdir_prefix = format!("keel-{SUFFIX}-");
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&workdir_prefix)
        {
            found.push(format!("work directory {}", entry.path().display()));
        }
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe
            .to_string_lossy()
            .contains(&format!("/{workdir_prefix}"))
        {
            found.push(format!(
                "process {} ({})",
                entry.file_name().to_string_lossy(),
                exe.display()
            ));
        }
    }
    Ok(found)
}

/// A running `keelctl demo`. Dropped before it exited (a failed test), it is interrupted, then
/// killed, and what it left is removed, so that the next run starts clean.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: PathBuf,
    _logs: tempfile::TempDir,
}

impl Demo {
    fn start(extra: &[&str]) -> anyhow::Result<Demo> {
        let logs = tempfile::tempdir()?;
        let stderr = logs.path().join("stderr");
        let mut child = Command::new(keelctl()?)
            .args(["demo", "--config-dir"])
            .arg(mesh_dir())
            // The standalone control plane's default admin port may be taken.
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(extra)
            .env_remove("KEEL_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("starting keelctl demo")?;
        let stdout = child.stdout.take().context("the demo's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Demo {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            _logs: logs,
        })
    }

    /// What it printed so far, and its stderr.
    fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.seen.join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for a line of its output containing `needle`.
    fn wait_for_line(&mut self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => {
                    let output = self.output();
                    bail!("the demo printed no {needle:?} within {within:?}:\n{output}");
                }
            }
        }
    }

    fn interrupt(&mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory-safety preconditions; the child is ours and not reaped.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGINT to the demo");
        }
        Ok(())
    }

    fn wait(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let output = self.output();
                bail!("the demo did not exit within {within:?}:\n{output}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.interrupt();
            if self.wait(Duration::from_secs(20)).is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if netns::list_networks().is_ok_and(|suffixes| suffixes.iter().any(|s| s == SUFFIX)) {
            let _ = netns::remove_network(SUFFIX);
        }
        let _ = std::fs::remove_file(LOCK_FILE);
    }
}

fn ensure_clean(after: &str) -> anyhow::Result<()> {
    // Namespace removal finishes in the kernel a moment after `ip netns delete` returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = leftovers()?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("{after}, the demo left {left:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_demo_runs_and_leaves_nothing_behind_even_when_interrupted() -> anyhow::Result<()> {
    skip_unless_root!();
    let before = leftovers()?;
    ensure!(
        before.is_empty(),
        "a demo is running or was left behind: {before:?}"
    );

    // A short run: every request succeeds, the summary is printed, everything is removed.
    let mut run = Demo::start(&["--requests", "40", "--duration", "2s"])?;
    let status = run.wait(Duration::from_secs(120))?;
    let output = run.output();
    ensure!(
        status.success(),
        "keelctl demo failed ({status}):\n{output}"
    );
    for expected in [
        "Every sidecar has its configuration",
        "Removing the demo's namespaces",
    ] {
        ensure!(output.contains(expected), "no {expected:?} in:\n{output}");
    }
    drop(run);
    ensure_clean("after a run")?;

    // Interrupted as soon as its network appears: it is still building it, running `ip`
    // commands without yielding to the runtime.
    let mut early = Demo::start(&["--requests", "100000", "--duration", "60s"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers()?
        .iter()
        .any(|l| l.starts_with("namespace keel-demo-"))
    {
        ensure!(
            Instant::now() < deadline,
            "the demo created no pod within 60 s:\n{}",
            early.output()
        );
        ensure!(
            early.child.try_wait()?.is_none(),
            "the demo exited:\n{}",
            early.output()
        );
    }
    early.interrupt()?;
    let status = early.wait(Duration::from_secs(60))?;
    let output = early.output();
    ensure!(
        status.code() == Some(130),
        "interrupted while building its network: {status}\n{output}"
    );
    drop(early);
    ensure_clean("after SIGINT while it built its network")?;

    // Interrupted while traffic flows.
    let mut busy = Demo::start(&["--requests", "100000", "--duration", "60s"])?;
    busy.wait_for_line(
        "Every sidecar has its configuration",
        Duration::from_secs(90),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    busy.interrupt()?;
    let status = busy.wait(Duration::from_secs(60))?;
    let output = busy.output();
    ensure!(
        status.code() == Some(130) && output.contains("stopped"),
        "interrupted mid-run: {status}\n{output}"
    );
    drop(busy);
    ensure_clean("after SIGINT mid-run")?;
    Ok(())
}

//! `bench/RESULTS.md` and what every section of it says about where it was measured.
//!
//! Each benchmark that writes there owns one section between its own begin and end markers
//! ([`Markers`]); [`write_section`] replaces that section in place (or appends it) and leaves
//! the rest of the file as it was, so benchmarks rerun one at a time. [`machine`],
//! [`load_average`], [`revision`] and [`command_line`] are what a section quotes about the run.
//!
//! Nothing here measures anything, and nothing here may invent a figure.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

/// The comment lines that delimit one benchmark's section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Markers {
    pub begin: &'static str,
    pub end: &'static str,
}

/// Puts `section` (which carries its own markers) into the file at `path`: in place of the
/// section between `markers` if there is one, else at the end. Everything else in the file stays
/// as it was; a missing file is created.
pub fn write_section(path: &Path, markers: Markers, section: &str) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = replace_section(&existing, markers, section);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replace_section(existing: &str, markers: Markers, section: &str) -> String {
    let section = section.trim_end();
    if let Some(begin) = existing.find(markers.begin)
        && let Some(end) = existing[begin..].find(markers.end)
    {
        let end = begin + end + markers.end.len();
        return format!("{}{section}{}", &existing[..begin], &existing[end..]);
    }
    let existing = existing.trim_end();
    if existing.is_empty() {
        format!("{section}\n")
    } else {
        format!("{existing}\n\n{section}\n")
    }
}

/// Cores, CPU model and kernel.
pub fn machine() -> String {
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{cores} cores ({model}), Linux {kernel}")
}

/// The 1, 5 and 15 minute load averages now.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// What a command printed on stdout and stderr, or nothing if it could not run.
pub fn output(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text
        })
        .unwrap_or_default()
}

/// keel's revision: the commit of the source tree this benchmark was built from, and whether it
/// had uncommitted changes.
pub fn revision() -> String {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let revision = output(Command::new("git").arg("-C").arg(&source).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]));
    match revision.trim() {
        "" => "unknown".to_owned(),
        rev => {
            let dirty = !output(Command::new("git").arg("-C").arg(&source).args([
                "status",
                "--porcelain",
                "--untracked-files=no",
            ]))
            .trim()
            .is_empty();
            if dirty {
                format!("{rev} with uncommitted changes")
            } else {
                rev.to_owned()
            }
        }
    }
}

/// The command line as run, quoted where a shell would need it.
pub fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./,:=".contains(c));
            if plain {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKERS: Markers = Markers {
        begin: "<!-- x: begin -->",
        end: "<!-- x: end -->",
    };

    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let (begin, end) = (MARKERS.begin, MARKERS.end);
        let first = format!("{begin}\nold\n{end}\n");
        let second = format!("{begin}\nnew\n{end}\n");
        assert_eq!(replace_section("", MARKERS, &first), first);
        let file = format!("# Results\n\n## Control plane\n\nx\n\n{first}\n## Later\n\ny\n");
        let updated = replace_section(&file, MARKERS, &second);
        assert_eq!(
            updated,
            format!("# Results\n\n## Control plane\n\nx\n\n{second}\n## Later\n\ny\n")
        );
        let appended = replace_section("# Results\n\ntext\n", MARKERS, &first);
        assert_eq!(appended, format!("# Results\n\ntext\n\n{first}"));
        // Another benchmark's section is left alone.
        let other = Markers {
            begin: "<!-- y: begin -->",
            end: "<!-- y: end -->",
        };
        let theirs = format!("{}\nkept\n{}\n", other.begin, other.end);
        let both = replace_section(&theirs, MARKERS, &first);
        assert_eq!(
            replace_section(&both, MARKERS, &second),
            format!("{theirs}\n{second}")
        );
    }
}

//! What `/proc` says about a process the benchmark measures: the CPU time it has used (all its
//! threads, user and system) and its memory. Read-only; it never signals or changes a process.

use std::io;
use std::time::Duration;

/// The CPU time (user + system, all threads) process `pid` has used so far, from the `utime`
/// and `stime` fields of `/proc/<pid>/stat`. Its resolution is one clock tick (`USER_HZ`,
/// usually 10 ms).
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {stat:?}"),
        )
    })?;
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is always defined on Linux.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(io::Error::other("sysconf(_SC_CLK_TCK) failed"));
    }
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// `utime + stime` in clock ticks. The command name (field 2) is in parentheses and may contain
/// spaces and parentheses itself, so fields are counted from the last `)`: after it come
/// `state` (field 3) and so on, `utime` being field 14 and `stime` field 15.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A process's resident memory, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most it has ever been resident.
    pub hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` of process `pid`, from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> io::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_memory(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS or VmHWM in /proc/{pid}/status"),
        )
    })
}

fn parse_status_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The process's command name (`/proc/<pid>/comm`, at most 15 bytes).
pub fn command_name(pid: u32) -> io::Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/comm"))?
        .trim_end()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_count_from_the_last_parenthesis() {
        let stat = "4242 (keel (proxy) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 2 0 99 123456 789 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn status_memory_fields() {
        let status = "Name:\tkeel-proxy\nVmHWM:\t   12345 kB\nVmRSS:\t    6789 kB\nThreads:\t2\n";
        assert_eq!(
            parse_status_memory(status),
            Some(Memory {
                rss_kib: 6789,
                hwm_kib: 12345
            })
        );
        assert_eq!(parse_status_memory("Name:\tzombie\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(me).unwrap().rss_kib > 0);
        cpu_time(me).unwrap();
        assert!(!command_name(me).unwrap().is_empty());
    }
}

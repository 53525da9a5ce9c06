//! What `/proc` says about a process the benchmark measures: the CPU time it has used (all its
//! threads, user and system) and its memory. Read-only; it never signals or changes a process.

use std::io;
use std::time::Duration;

/// CPU time, split into time in the program itself (user) and in the kernel on its behalf
/// (system: its syscalls, and the softirq network work the kernel does inside them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::ops::Add for CpuTime {
    type Output = CpuTime;
    fn add(self, other: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// The CPU time (user + system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    Ok(cpu_times(pid)?.total())
}

/// The CPU time process `pid` has used so far (all threads), from the `utime` and `stime`
/// fields of `/proc/<pid>/stat`. Its resolution is one clock tick (`USER_HZ`, usually 10 ms).
pub fn cpu_times(pid: u32) -> io::Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {stat:?}"),
        )
    })?;
    Ok(CpuTime {
        user: from_ticks(utime)?,
        system: from_ticks(stime)?,
    })
}

/// The CPU time this machine's hypervisor has given to other guests while this one had work to
/// run (`steal`, summed over all CPUs, from `/proc/stat`). It grows when the host is busy: a
/// latency figure measured while it grew was disturbed from outside the machine. Zero on a
/// kernel or hypervisor that does not account for it.
pub fn host_steal() -> io::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks = parse_steal_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no steal field on the cpu line of /proc/stat",
        )
    })?;
    from_ticks(ticks)
}

/// Clock ticks (`USER_HZ`) as a duration.
fn from_ticks(ticks: u64) -> io::Result<Duration> {
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is always defined on Linux.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(io::Error::other("sysconf(_SC_CLK_TCK) failed"));
    }
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// `utime` and `stime` in clock ticks. The command name (field 2) is in parentheses and may
/// contain spaces and parentheses itself, so fields are counted from the last `)`: after it
/// come `state` (field 3) and so on, `utime` being field 14 and `stime` field 15.
fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The eighth number on the `cpu` line of `/proc/stat` (user, nice, system, idle, iowait, irq,
/// softirq, steal), in clock ticks.
fn parse_steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(8)?.parse().ok()
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
        assert_eq!(parse_stat_ticks(stat), Some((250, 75)));
        assert_eq!(parse_stat_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn steal_is_the_eighth_figure_of_the_cpu_line() {
        let stat = "cpu  715458 0 220343 6317914 15212 0 100923 13708 0 0\n\
                    cpu0 357729 0 110171 3158957 7606 0 50461 6854 0 0\n";
        assert_eq!(parse_steal_ticks(stat), Some(13708));
        assert_eq!(parse_steal_ticks("cpu  1 2 3 4\n"), None);
        assert_eq!(parse_steal_ticks("intr 12 0\n"), None);
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
        host_steal().unwrap();
        assert!(!command_name(me).unwrap().is_empty());
    }
}

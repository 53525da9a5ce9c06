//! Closed-loop maximum throughput with `wrk` (Debian's package): the command line the benchmarks
//! run and what they read from its report.

use std::path::Path;
use std::time::Duration;

/// How `wrk` is run: `wrk -t<threads> -c<connections> -d<duration> --timeout <timeout>
/// [-s <script>] <url>`.
#[derive(Debug, Clone)]
pub struct Wrk {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    pub timeout: Duration,
    /// Each request a POST with a body of this many bytes (by `Content-Length`); 0: a GET.
    pub body: usize,
}

impl Wrk {
    /// The arguments after `wrk`, for `url`; `script` is where [`Wrk::script`] was written, when
    /// there is one.
    pub fn args(&self, url: &str, script: Option<&Path>) -> Vec<String> {
        let mut args = vec![
            format!("-t{}", self.threads),
            format!("-c{}", self.connections),
            format!("-d{}s", self.duration.as_secs().max(1)),
            "--timeout".to_owned(),
            format!("{}s", self.timeout.as_secs().max(1)),
        ];
        if let Some(script) = script {
            args.extend(["-s".to_owned(), script.display().to_string()]);
        }
        args.push(url.to_owned());
        args
    }

    /// The Lua script that makes every request a POST with [`Wrk::body`] bytes, if they are.
    pub fn script(&self) -> Option<String> {
        (self.body > 0).then(|| {
            format!(
                "wrk.method = \"POST\"\n\
                 wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n\
                 wrk.body = string.rep(\"x\", {})\n",
                self.body
            )
        })
    }
}

/// What one `wrk` run reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkReport {
    /// Completed requests ("N requests in ...").
    pub requests: u64,
    /// "Requests/sec".
    pub requests_per_second: f64,
    /// Connect, read, write and timeout errors together ("Socket errors: ...").
    pub socket_errors: u64,
    /// "Non-2xx or 3xx responses".
    pub bad_status: u64,
}

impl WrkReport {
    /// Requests answered with a good status: what a proxy's 2xx counter must have counted
    /// (the benchmark's upstream answers nothing else).
    pub fn answered_2xx(&self) -> u64 {
        self.requests.saturating_sub(self.bad_status)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected wrk output (no {missing}):\n{output}")]
pub struct ParseError {
    missing: &'static str,
    output: String,
}

/// Reads `wrk`'s standard output (without a Lua script).
pub fn parse(output: &str) -> Result<WrkReport, ParseError> {
    let missing = |what| ParseError {
        missing: what,
        output: output.to_owned(),
    };
    let mut requests = None;
    let mut requests_per_second = None;
    let mut socket_errors = 0;
    let mut bad_status = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            requests_per_second = rate.trim().parse().ok();
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            socket_errors = errors
                .split(',')
                .filter_map(|kind| kind.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bad_status = count
                .trim()
                .parse()
                .map_err(|_| missing("response count"))?;
        } else if let Some((count, _)) = line.split_once(" requests in ") {
            requests = count.trim().parse().ok();
        }
    }
    Ok(WrkReport {
        requests: requests.ok_or_else(|| missing("\"N requests in\" line"))?,
        requests_per_second: requests_per_second.ok_or_else(|| missing("Requests/sec"))?,
        socket_errors,
        bad_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_clean_run() {
        let output = "Running 2s test @ http://127.0.0.1:18080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   203.40us  206.68us   4.99ms   94.05%
    Req/Sec   208.65k    22.21k  222.93k    90.00%
  414395 requests in 2.00s, 66.00MB read
Requests/sec: 207167.77
Transfer/sec:     32.99MB
";
        assert_eq!(
            parse(output).unwrap(),
            WrkReport {
                requests: 414395,
                requests_per_second: 207167.77,
                socket_errors: 0,
                bad_status: 0,
            }
        );
    }

    #[test]
    fn reads_errors() {
        let output = "  1000 requests in 10.00s, 1.00MB read
  Socket errors: connect 2, read 3, write 0, timeout 5
  Non-2xx or 3xx responses: 7
Requests/sec:    100.00
";
        let report = parse(output).unwrap();
        assert_eq!((report.socket_errors, report.bad_status), (10, 7));
        assert_eq!(report.answered_2xx(), 993);
        assert!(parse("unable to connect to 10.0.0.1:80 Connection refused").is_err());
    }

    #[test]
    fn command_line() {
        let mut wrk = Wrk {
            threads: 1,
            connections: 64,
            duration: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            body: 0,
        };
        assert_eq!(
            wrk.args("http://x/", None).join(" "),
            "-t1 -c64 -d10s --timeout 5s http://x/"
        );
        assert_eq!(wrk.script(), None);
        wrk.body = 3;
        assert_eq!(
            wrk.args("http://x/", Some(Path::new("/w/post.lua")))
                .join(" "),
            "-t1 -c64 -d10s --timeout 5s -s /w/post.lua http://x/"
        );
        let script = wrk.script().unwrap();
        assert!(script.contains("wrk.method = \"POST\"\n"), "{script}");
        assert!(script.contains("string.rep(\"x\", 3)"), "{script}");
    }
}

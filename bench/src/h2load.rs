//! Closed-loop maximum throughput over HTTP/2 with `h2load` (Debian's `nghttp2-client`): the
//! command line the benchmarks run and what they read from its report.

use std::time::Duration;

/// How `h2load` is run: `h2load -t<threads> -c<clients> -m<streams> -D<duration> <url>`, HTTP/2
/// over cleartext with prior knowledge.
#[derive(Debug, Clone)]
pub struct H2load {
    pub threads: u32,
    pub clients: u32,
    /// Concurrent streams per client connection.
    pub streams: u32,
    pub duration: Duration,
}

impl H2load {
    /// The arguments after `h2load`, for `url`.
    pub fn args(&self, url: &str) -> Vec<String> {
        vec![
            format!("-t{}", self.threads),
            format!("-c{}", self.clients),
            format!("-m{}", self.streams),
            format!("-D{}", self.duration.as_secs().max(1)),
            url.to_owned(),
        ]
    }

    /// A short label for reports.
    pub fn label(&self) -> String {
        format!(
            "h2load -t{} -c{} -m{} -D{}",
            self.threads,
            self.clients,
            self.streams,
            self.duration.as_secs().max(1)
        )
    }
}

/// What one `h2load` run reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2loadReport {
    /// Requests answered ("N succeeded"), whatever their status.
    pub succeeded: u64,
    /// Of those, the ones answered 2xx ("status codes: N 2xx"): what a proxy's 2xx counter
    /// must have counted.
    pub answered_2xx: u64,
    /// Requests that failed or errored, and answers that were not 2xx.
    pub failed: u64,
    pub requests_per_second: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected h2load output (no {missing}):\n{output}")]
pub struct ParseError {
    missing: &'static str,
    output: String,
}

/// Reads `h2load`'s standard output.
pub fn parse(output: &str) -> Result<H2loadReport, ParseError> {
    let missing = |what| ParseError {
        missing: what,
        output: output.to_owned(),
    };
    let mut rate = None;
    let mut counts = None;
    let mut not_2xx = 0;
    let mut answered_2xx = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 10.00s, 81234.50 req/s, 2.81MB/s"
            rate = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .and_then(|r| r.trim().parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 2 errored, 0 timeout"
            let count = |name: &str| {
                rest.split(", ").find_map(|part| {
                    let (n, what) = part.split_once(' ')?;
                    (what == name).then(|| n.parse::<u64>().ok()).flatten()
                })
            };
            counts = Some((
                count("succeeded"),
                count("failed").unwrap_or(0) + count("errored").unwrap_or(0),
            ));
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"
            let count = |part: &str| part.split_whitespace().next()?.parse::<u64>().ok();
            not_2xx = rest
                .split(", ")
                .filter(|part| !part.ends_with(" 2xx"))
                .filter_map(count)
                .sum();
            answered_2xx = rest
                .split(", ")
                .find(|part| part.ends_with(" 2xx"))
                .and_then(count);
        }
    }
    let (succeeded, failed) = counts.ok_or_else(|| missing("\"requests:\" line"))?;
    let succeeded = succeeded.ok_or_else(|| missing("succeeded count"))?;
    Ok(H2loadReport {
        succeeded,
        answered_2xx: answered_2xx.unwrap_or(succeeded.saturating_sub(not_2xx)),
        failed: failed + not_2xx,
        requests_per_second: rate.ok_or_else(|| missing("req/s"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_run() {
        let output = "starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 10s of main duration for measurements.
Main benchmark duration is started for client #0.

finished in 10.00s, 81234.50 req/s, 2.81MB/s
requests: 812345 total, 812505 started, 812345 done, 812340 succeeded, 5 failed, 5 errored, 0 timeout
status codes: 812337 2xx, 0 3xx, 0 4xx, 3 5xx
traffic: 28.12MB (29485123) total, 1.55MB (1624690) headers (space savings 95.12%), 21.70MB (22754660) data
";
        let report = parse(output).unwrap();
        assert_eq!(report.succeeded, 812340);
        assert_eq!(report.answered_2xx, 812337);
        assert_eq!(report.failed, 13);
        assert_eq!(report.requests_per_second, 81234.50);
        assert!(parse("connect: Connection refused").is_err());
    }

    #[test]
    fn command_line() {
        let h2load = H2load {
            threads: 1,
            clients: 16,
            streams: 10,
            duration: Duration::from_secs(10),
        };
        assert_eq!(
            h2load.args("http://x:81/").join(" "),
            "-t1 -c16 -m10 -D10 http://x:81/"
        );
    }
}

//! The median and the spread of one figure over several runs: what every table of the benchmarks
//! quotes, because a single run on a shared machine says little.

use std::fmt;

/// The median, minimum and maximum of a figure over runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Summary {
    /// Summarizes `values`; `None` when there are none. The median of an even count is the mean
    /// of the two middle values.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        })
    }

    /// Renders as `median (min–max)` with `decimals` digits after the point.
    pub fn display(&self, decimals: usize) -> SummaryDisplay {
        SummaryDisplay {
            summary: *self,
            decimals,
            signed: false,
        }
    }

    /// Like [`Summary::display`], with an explicit `+` on positive values (for differences).
    pub fn display_signed(&self, decimals: usize) -> SummaryDisplay {
        SummaryDisplay {
            summary: *self,
            decimals,
            signed: true,
        }
    }
}

/// See [`Summary::display`].
pub struct SummaryDisplay {
    summary: Summary,
    decimals: usize,
    signed: bool,
}

impl fmt::Display for SummaryDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.decimals;
        let Summary {
            median, min, max, ..
        } = self.summary;
        if self.signed {
            write!(f, "{median:+.d$} ({min:+.d$} – {max:+.d$})")
        } else {
            write!(f, "{median:.d$} ({min:.d$}–{max:.d$})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn renders_median_and_spread() {
        let s = Summary::of(&[0.1234, 0.2, 0.15]).unwrap();
        assert_eq!(s.display(2).to_string(), "0.15 (0.12–0.20)");
        let d = Summary::of(&[-0.01, 0.05, 0.02]).unwrap();
        assert_eq!(d.display_signed(2).to_string(), "+0.02 (-0.01 – +0.05)");
    }
}

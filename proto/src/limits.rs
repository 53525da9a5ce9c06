//! Ceilings on the durations the contract carries, which both sides enforce: the control plane
//! rejects a mesh file past them (with the file, line and column), and a proxy rejects (NACKs) a
//! resource past them, since it must not trust the control plane blindly. A value this large is
//! a typo (`1000h` for `1000ms`), and left alone it would overflow the proxy's clock arithmetic
//! (`Instant + interval`).
//!
//! Envoy and Istio accept any protobuf duration; keel deliberately refuses absurd ones instead.

use std::time::Duration;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// A route's timeout and its per-try timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(DAY);
/// Retry backoff (base and maximum).
pub const RETRY_BACKOFF: Duration = Duration::from_secs(HOUR);
/// Connecting to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10 * MINUTE);
/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(7 * DAY);
/// Outlier detection's evaluation interval.
pub const OUTLIER_INTERVAL: Duration = Duration::from_secs(HOUR);
/// Outlier detection's base and maximum ejection times.
pub const EJECTION_TIME: Duration = Duration::from_secs(DAY);
/// The retry budget's window.
pub const RETRY_BUDGET_TTL: Duration = Duration::from_secs(HOUR);

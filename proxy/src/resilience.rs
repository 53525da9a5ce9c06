//! Retries (with a budget), timeouts and circuit breakers: whether a request may go out to a
//! service, whether it may go out again after a failure, and when.
//!
//! **Circuit breakers** are per service ([`ServiceLimits`]), as Envoy's thresholds are per
//! cluster: connections open to its endpoints, requests waiting for a connection (pending),
//! requests in flight, and retries in flight. A request over a limit is answered at once with
//! 503 and `keel-error: circuit-open` (the limit is named in `keel-circuit-breaker`), never
//! queued. Where Envoy queues an HTTP/1 request that needs a connection beyond
//! `max_connections` (and only rejects once `max_pending_requests` is also full), keel answers it
//! 503 at once: failing fast is the point of a breaker, and keel's pool has no queue.
//!
//! **The retry budget** is Linkerd's: over the last `ttl` (10 s), retries to a service may number
//! `percent` (20%) of its requests plus `min_retries_per_second` (10) per second of the window;
//! `max_retries` also caps retries in flight at once. A retry that does not fit is not made: the
//! caller gets the failure it would have got without retries, and the refusal is counted. When
//! everything fails, retries therefore add at most a fifth (plus the floor) to the load. Envoy's
//! budget bounds *concurrent* retries to 20% of active requests (at least 3) instead; keel takes
//! Linkerd's rate form on purpose, because the moment an endpoint or a zone dies under load is a
//! burst of simultaneous failures that a concurrency bound refuses to retry (with four requests in
//! flight, the fourth is lost), while a rate bound has the whole window's allowance for it.
//!
//! **Retry policy**: a route without one gets [`default_retry_policy`] (Istio's default, in
//! spirit: two retries, on connect failures and 503). What may be retried depends on what is
//! known about the failed attempt:
//! - the request never reached the endpoint's application (connect failure, or the endpoint's
//!   sidecar answered that its app is unreachable): any method, it was not processed;
//! - a reset, a timeout or a retriable status: only idempotent methods (RFC 9110 §9.2.2), since
//!   the application may have acted on it. Envoy retries any method; keel does not, by default
//!   and on purpose; a route opts in with `retry_non_idempotent` (`retryNonIdempotent: true`),
//!   for apps that deduplicate;
//! - a retriable gRPC status (`grpc-status` in the response headers, i.e. a trailers-only
//!   response): any method, since every gRPC call is a POST and listing gRPC codes is an explicit
//!   choice for the route.
//!
//! Retries go to another endpoint when one exists, after a jittered exponential back-off (full
//! jitter: uniform in `[0, min(base * 2^(n-1), max))`, as Envoy). A request body is replayed from
//! a copy kept while it streams to the first attempt ([`Replay`]), up to [`MAX_REPLAY_BYTES`];
//! past that it streams on without a copy and the request is no longer retried.
//!
//! **Timeouts**: the route's timeout bounds the whole request (every attempt and back-off) until
//! the response headers; the per-try timeout bounds one attempt; connect and idle timeouts are
//! applied by the connection pool. Neither the route timeout nor the per-try timeout has a
//! default, as in Istio and Linkerd: both run until the response headers, and a request may
//! rightly wait long for its headers (a long poll or blocking query that answers when something
//! changes, a long unary gRPC call); Envoy's 15 s route default cuts those off, which is why
//! Istio turns it off. The cost: a hanging endpoint is cut off, retried around and ejected only
//! on routes that set a per-try timeout (or a timeout), so set one wherever responses are
//! quick. A retry whose back-off would end at or past the route's
//! deadline is not made, and is refused before it spends any budget: the caller gets the last
//! attempt's own answer (the upstream's response, or the proxy's error for that attempt), not a
//! 504 for a retry that never happened.
//!
//! This module must never queue a request, and never hold a lock across an await.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use rand::Rng;

use crate::config::{CircuitBreaker, RetryBudget, RetryOn, RetryPolicy};
use crate::pool::{self, Admission, Body, BoxError, Permit};

/// The most request body bytes kept to replay on a retry (Linkerd's default).
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Limit {
    /// The circuit-breaker field it comes from, as named in the mesh YAML and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max-connections",
            Limit::PendingRequests => "max-pending-requests",
            Limit::Requests => "max-requests",
            Limit::Retries => "max-retries",
        }
    }
}

/// Why a retry was not made although the policy allowed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDenied {
    /// The retry budget is spent.
    Budget,
    /// `max_retries` retries are already in flight.
    MaxRetries,
    /// The back-off would end at or past the route's deadline.
    Deadline,
}

impl RetryDenied {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryDenied::Budget => "budget",
            RetryDenied::MaxRetries => "max-retries",
            RetryDenied::Deadline => "deadline",
        }
    }
}

/// One service's circuit breakers and retry budget: limits from its traffic policy and the
/// counts they apply to, all atomics.
#[derive(Debug)]
pub struct ServiceLimits {
    max_connections: AtomicU32,
    max_pending: AtomicU32,
    max_requests: AtomicU32,
    max_retries: AtomicU32,
    budget: Budget,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        let limits = ServiceLimits {
            max_connections: AtomicU32::new(0),
            max_pending: AtomicU32::new(0),
            max_requests: AtomicU32::new(0),
            max_retries: AtomicU32::new(0),
            budget: Budget::new(),
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        };
        limits.configure(&CircuitBreaker::default(), &RetryBudget::default());
        limits
    }
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Connections,
    Pending,
    Requests,
    Retries,
}

/// Takes one unit of `counter` if it is below `max`.
fn acquire(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl ServiceLimits {
    /// Applies a traffic policy's limits; counts in flight are kept.
    pub fn configure(&self, breaker: &CircuitBreaker, budget: &RetryBudget) {
        let set = |a: &AtomicU32, v: u32| a.store(v, Ordering::Relaxed);
        set(&self.max_connections, breaker.max_connections);
        set(&self.max_pending, breaker.max_pending_requests);
        set(&self.max_requests, breaker.max_requests);
        set(&self.max_retries, breaker.max_retries);
        self.budget.configure(budget);
    }

    fn counter(&self, which: Counter) -> &AtomicU32 {
        match which {
            Counter::Connections => &self.connections,
            Counter::Pending => &self.pending,
            Counter::Requests => &self.requests,
            Counter::Retries => &self.retries,
        }
    }

    fn permit(self: &Arc<Self>, which: Counter, max: &AtomicU32) -> Option<LimitPermit> {
        acquire(self.counter(which), max.load(Ordering::Relaxed)).then(|| LimitPermit {
            limits: self.clone(),
            which,
        })
    }

    /// Admits a request to the service that arrived at `now`: held until its response has been
    /// sent on. Each admitted request adds to the retry budget.
    pub fn admit_request(self: &Arc<Self>, now: Instant) -> Result<LimitPermit, Limit> {
        let permit = self
            .permit(Counter::Requests, &self.max_requests)
            .ok_or(Limit::Requests)?;
        self.budget.deposit(now);
        Ok(permit)
    }

    /// Admits one retry that would start after `wait`: held until the retried attempt has an
    /// outcome. The route's `deadline` is checked first, so that a retry that could not finish
    /// in time is refused without spending the budget or a `max_retries` slot.
    pub fn admit_retry(
        self: &Arc<Self>,
        wait: Duration,
        deadline: Option<Instant>,
    ) -> Result<LimitPermit, RetryDenied> {
        let now = Instant::now();
        if deadline.is_some_and(|d| now.checked_add(wait).is_none_or(|t| t >= d)) {
            return Err(RetryDenied::Deadline);
        }
        self.admit_retry_at(now)
    }

    fn admit_retry_at(self: &Arc<Self>, now: Instant) -> Result<LimitPermit, RetryDenied> {
        let permit = self
            .permit(Counter::Retries, &self.max_retries)
            .ok_or(RetryDenied::MaxRetries)?;
        if self.budget.withdraw(now) {
            Ok(permit)
        } else {
            Err(RetryDenied::Budget)
        }
    }

    /// Requests, retries, pending requests and connections in flight now.
    pub fn in_flight(&self) -> (u32, u32, u32, u32) {
        (
            self.requests.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        )
    }
}

/// Slots per budget window: deposits expire a tenth of the window at a time.
const BUDGET_SLOTS: usize = 10;

/// Linkerd's retry budget, on atomics: the window (`ttl`) is cut into [`BUDGET_SLOTS`] slots,
/// each counting the requests and retries of its stretch of time; a slot is reused (restarted)
/// when time comes round to it. Two retries racing for the last unit of budget may both pass: a
/// budget is a bound on load, not an exact count. No count is lost, though: each counter keeps
/// the stretch it counts in the same atomic word as its count, so moving it on to a new stretch
/// and counting in it are one step (a separate stretch index, reset after a compare-and-swap,
/// let a deposit land between the swap and the reset and be wiped).
#[derive(Debug)]
struct Budget {
    epoch: Instant,
    percent: AtomicU32,
    per_second: AtomicU32,
    ttl_ms: AtomicU64,
    slots: [BudgetSlot; BUDGET_SLOTS],
}

#[derive(Debug, Default)]
struct BudgetSlot {
    /// Slot words (see [`SlotWord`]) of requests and of retries.
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Bits of a slot word that hold its count; the others hold its stamp, the stretch of time it
/// counts plus one (0: none yet). 24 bits count up to 16.7 million a slot (a tenth of the
/// window), and the count stops there rather than wrap; 40 bits of stamp last 34 years of
/// uptime at the shortest slot (1 ms).
const COUNT_BITS: u32 = 24;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const STAMP_MAX: u64 = u64::MAX >> COUNT_BITS;

/// A stamp and a count in one `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotWord(u64);

impl SlotWord {
    fn stamp_of(index: u64) -> u64 {
        (index + 1).min(STAMP_MAX)
    }

    fn count_in(self, oldest: u64, newest: u64) -> u64 {
        let stamp = self.0 >> COUNT_BITS;
        if (Self::stamp_of(oldest)..=Self::stamp_of(newest)).contains(&stamp) {
            self.0 & COUNT_MAX
        } else {
            0
        }
    }

    /// The word after counting one more in stretch `index`: restarted at 1 if it counted an
    /// older stretch; `None` (nothing to count) if it already counts a newer one, which happens
    /// only to a caller whose clock reading is a whole window old.
    fn bump(self, index: u64) -> Option<SlotWord> {
        let stamp = Self::stamp_of(index);
        let (seen, count) = (self.0 >> COUNT_BITS, self.0 & COUNT_MAX);
        match seen.cmp(&stamp) {
            std::cmp::Ordering::Less => Some(SlotWord((stamp << COUNT_BITS) | 1)),
            std::cmp::Ordering::Equal => {
                Some(SlotWord((stamp << COUNT_BITS) | (count + 1).min(COUNT_MAX)))
            }
            std::cmp::Ordering::Greater => None,
        }
    }
}

/// Counts one in stretch `index` of `counter`, in one atomic step.
fn count_one(counter: &AtomicU64, index: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        SlotWord(w).bump(index).map(|w| w.0)
    });
}

impl Budget {
    fn new() -> Budget {
        let budget = Budget {
            epoch: Instant::now(),
            percent: AtomicU32::new(0),
            per_second: AtomicU32::new(0),
            ttl_ms: AtomicU64::new(1),
            slots: Default::default(),
        };
        budget.configure(&RetryBudget::default());
        budget
    }

    fn configure(&self, budget: &RetryBudget) {
        let ttl_ms = u64::try_from(budget.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(BUDGET_SLOTS as u64);
        self.percent
            .store(u32::from(budget.percent), Ordering::Relaxed);
        self.per_second
            .store(budget.min_retries_per_second, Ordering::Relaxed);
        if self.ttl_ms.swap(ttl_ms, Ordering::Relaxed) != ttl_ms {
            // Slots of another length mean nothing now.
            for slot in &self.slots {
                slot.requests.store(0, Ordering::Release);
                slot.retries.store(0, Ordering::Release);
            }
        }
    }

    /// The stretch of time `now` falls in.
    fn index(&self, now: Instant) -> u64 {
        let slot_ms = (self.ttl_ms.load(Ordering::Relaxed) / BUDGET_SLOTS as u64).max(1);
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
            / slot_ms
    }

    /// The slot that counts stretch `index`.
    fn slot(&self, index: u64) -> &BudgetSlot {
        &self.slots[(index % BUDGET_SLOTS as u64) as usize]
    }

    fn deposit(&self, now: Instant) {
        let index = self.index(now);
        count_one(&self.slot(index).requests, index);
    }

    /// Requests and retries of the window ending at `now`: its stretch and the nine before.
    fn window(&self, now: Instant) -> (u64, u64) {
        let newest = self.index(now);
        let oldest = newest.saturating_sub(BUDGET_SLOTS as u64 - 1);
        self.slots.iter().fold((0, 0), |(r, w), s| {
            let requests = SlotWord(s.requests.load(Ordering::Acquire));
            let retries = SlotWord(s.retries.load(Ordering::Acquire));
            (
                r + requests.count_in(oldest, newest),
                w + retries.count_in(oldest, newest),
            )
        })
    }

    /// The retries the window ending at `now` allows in all, and those it spent.
    fn allowance(&self, now: Instant) -> (u64, u64) {
        let (requests, retries) = self.window(now);
        let percent = u64::from(self.percent.load(Ordering::Relaxed));
        let per_second = u64::from(self.per_second.load(Ordering::Relaxed));
        let floor = per_second * self.ttl_ms.load(Ordering::Relaxed) / 1000;
        (requests * percent / 100 + floor, retries)
    }

    /// Spends one retry if the window allows it.
    fn withdraw(&self, now: Instant) -> bool {
        let (allowed, spent) = self.allowance(now);
        if spent >= allowed {
            return false;
        }
        let index = self.index(now);
        count_one(&self.slot(index).retries, index);
        true
    }
}

/// The pool asks the service's breakers before it opens a connection or makes a request wait
/// for one.
impl Admission for Arc<ServiceLimits> {
    fn pending(&self) -> Result<Permit, &'static str> {
        self.permit(Counter::Pending, &self.max_pending)
            .map(|p| Box::new(p) as Permit)
            .ok_or(Limit::PendingRequests.as_str())
    }

    fn connection(&self) -> Result<Permit, &'static str> {
        self.permit(Counter::Connections, &self.max_connections)
            .map(|p| Box::new(p) as Permit)
            .ok_or(Limit::Connections.as_str())
    }
}

/// One unit of a service limit, given back on drop.
#[derive(Debug)]
pub struct LimitPermit {
    limits: Arc<ServiceLimits>,
    which: Counter,
}

impl LimitPermit {
    /// A connection permit for an opaque TCP connection.
    pub fn connection(limits: &Arc<ServiceLimits>) -> Result<LimitPermit, Limit> {
        limits
            .permit(Counter::Connections, &limits.max_connections)
            .ok_or(Limit::Connections)
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        self.limits
            .counter(self.which)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

// ---------------------------------------------------------------------------------------------
// Retry decisions

/// The policy of routes that have none: two retries, on connect failures (any method), and on
/// resets and 503 (idempotent methods), with Envoy's back-off, and no per-try timeout (see the
/// module docs). `attempts: 0` on a route turns retries off.
pub fn default_retry_policy() -> &'static RetryPolicy {
    static DEFAULT: LazyLock<RetryPolicy> = LazyLock::new(|| RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on: vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::RetriableStatusCodes,
        ],
        retriable_status_codes: vec![503],
        retriable_grpc_codes: Vec::new(),
        backoff_base: RetryPolicy::DEFAULT_BACKOFF_BASE,
        backoff_max: RetryPolicy::DEFAULT_BACKOFF_BASE * 10,
        retry_non_idempotent: false,
    });
    &DEFAULT
}

/// Methods a client may send again without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Failure<'a> {
    /// The request never reached the endpoint's application.
    NotSent,
    /// Sent, then the connection or stream broke before a response.
    Reset,
    /// No response within the per-try timeout.
    Timeout,
    /// A response (its status and headers).
    Response(u16, &'a HeaderMap),
}

/// The condition under which `policy` retries `failure` of a request whose method is (or is not)
/// `idempotent` (a metrics label), or `None`.
pub fn retry_condition(
    policy: &RetryPolicy,
    failure: Failure<'_>,
    idempotent: bool,
) -> Option<&'static str> {
    let idempotent = idempotent || policy.retry_non_idempotent;
    let on = |c: RetryOn| policy.retry_on.contains(&c);
    let any_5xx = on(RetryOn::ServerError) || on(RetryOn::GatewayError);
    match failure {
        Failure::NotSent => (on(RetryOn::ConnectFailure) || any_5xx).then_some("connect-failure"),
        Failure::Reset => (idempotent && (on(RetryOn::Reset) || any_5xx)).then_some("reset"),
        Failure::Timeout => (idempotent && (on(RetryOn::Reset) || any_5xx)).then_some("timeout"),
        Failure::Response(status, headers) => {
            if !policy.retriable_grpc_codes.is_empty()
                && let Some(code) = grpc_status(headers)
                && policy.retriable_grpc_codes.iter().any(|c| c.code() == code)
            {
                return Some("grpc-status");
            }
            let by_status = (on(RetryOn::ServerError) && (500..600).contains(&status))
                || (on(RetryOn::GatewayError) && matches!(status, 502..=504))
                || (on(RetryOn::RetriableStatusCodes)
                    && policy.retriable_status_codes.contains(&status));
            (idempotent && by_status).then_some("status")
        }
    }
}

/// The `grpc-status` of a trailers-only response.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    // A name parsed once: looking a `&str` up parses and validates it on every call.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The wait before retry number `retry` (1 for the first retry): uniform in
/// `[0, min(base * 2^(retry-1), max))`.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
        .min(max);
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..nanos))
}

// ---------------------------------------------------------------------------------------------
// Replayable request bodies

/// A request body as retries see it.
pub enum RequestBody {
    /// Nothing to send: every attempt gets an empty body.
    Empty,
    /// A body streamed to the first attempt while a bounded copy is kept.
    Replay(Replay),
}

impl RequestBody {
    pub fn new(body: Body) -> RequestBody {
        if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Replay(Replay::new(body, MAX_REPLAY_BYTES))
        }
    }

    /// Whether another attempt can be given the whole body.
    pub fn replayable(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Replay(r) => !lock(&r.state).lost,
        }
    }

    /// The body of the next attempt; `None` when what the previous one consumed cannot be sent
    /// again.
    pub fn attempt(&self) -> Option<Body> {
        match self {
            RequestBody::Empty => Some(pool::empty()),
            RequestBody::Replay(r) => r.attempt(),
        }
    }
}

struct ReplayState {
    /// What is left of the original body; `None` once it ended.
    rest: Option<Body>,
    /// Every data frame read so far, while they fit in `cap`.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    cap: usize,
    trailers: Option<HeaderMap>,
    /// More than `cap` bytes were read, or the body failed: it cannot be replayed.
    lost: bool,
    /// Which attempt's body may read; earlier ones fail if polled again.
    generation: u64,
    hint: SizeHint,
}

/// The source of a request's bodies across attempts. The first attempt streams the original
/// body and keeps a copy of what it reads (up to `cap` bytes); later attempts replay the copy,
/// then go on with the original where the earlier attempt stopped.
pub struct Replay {
    state: Arc<Mutex<ReplayState>>,
}

fn lock(m: &Mutex<ReplayState>) -> MutexGuard<'_, ReplayState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Replay {
    pub fn new(body: Body, cap: usize) -> Replay {
        let hint = body.size_hint();
        Replay {
            state: Arc::new(Mutex::new(ReplayState {
                rest: Some(body),
                kept: Vec::new(),
                kept_bytes: 0,
                cap,
                trailers: None,
                lost: false,
                generation: 0,
                hint,
            })),
        }
    }

    /// A body for the next attempt, replaying everything read so far; `None` if that cannot be
    /// done. The previous attempt's body fails from now on, so whoever still polls it (a
    /// connection sending it) resets that stream.
    pub fn attempt(&self) -> Option<Body> {
        let mut state = lock(&self.state);
        if state.lost {
            return None;
        }
        state.generation += 1;
        Some(
            ReplayBody {
                state: self.state.clone(),
                generation: state.generation,
                next: 0,
                trailers_sent: false,
            }
            .boxed_unsync(),
        )
    }
}

struct ReplayBody {
    state: Arc<Mutex<ReplayState>>,
    generation: u64,
    /// The next kept frame to replay.
    next: usize,
    trailers_sent: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was handed to a retry")]
struct Superseded;

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut state = lock(&this.state);
        if state.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if this.next < state.kept.len() && !state.lost {
            let data = state.kept[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(rest) = state.rest.as_mut() else {
            if let (Some(trailers), false) = (&state.trailers, this.trailers_sent) {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.rest = None;
                state.lost = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !state.lost && state.kept_bytes + data.len() <= state.cap {
                        state.kept_bytes += data.len();
                        state.kept.push(data.clone());
                        this.next = state.kept.len();
                    } else if !state.lost {
                        // Too large to replay: stop keeping a copy and free what was kept.
                        state.lost = true;
                        state.kept = Vec::new();
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    state.rest = None;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.state);
        state.generation == self.generation
            && state.rest.is_none()
            && (state.lost || self.next >= state.kept.len())
            && (state.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.state).hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GrpcCode;
    use http_body_util::{BodyExt, StreamBody};

    fn limits(breaker: CircuitBreaker, budget: RetryBudget) -> Arc<ServiceLimits> {
        let l = Arc::new(ServiceLimits::default());
        l.configure(&breaker, &budget);
        l
    }

    #[test]
    fn retry_budget_is_a_share_of_recent_requests_plus_a_floor() {
        let budget = |percent, per_second| RetryBudget {
            percent,
            min_retries_per_second: per_second,
            ttl: Duration::from_secs(10),
        };
        // 20% of 100 requests, no floor: 20 retries, the 21st refused.
        let l = limits(CircuitBreaker::default(), budget(20, 0));
        let t0 = Instant::now();
        for _ in 0..100 {
            drop(l.admit_request(Instant::now()).expect("admit"));
        }
        let retries: Vec<_> = (0..20)
            .map(|_| l.admit_retry_at(t0).expect("retry"))
            .collect();
        assert_eq!(l.admit_retry_at(t0).err(), Some(RetryDenied::Budget));
        // Spent retries stay spent when they finish: the budget is a rate, not a concurrency.
        drop(retries);
        assert_eq!(l.admit_retry_at(t0).err(), Some(RetryDenied::Budget));
        // The deposits expire with the window.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(l.budget.allowance(later), (0, 0));
        // The floor: 10 per second over 10 s, with no request at all.
        let floor = limits(CircuitBreaker::default(), budget(20, 10));
        let granted = (0..150)
            .filter(|_| floor.admit_retry_at(t0).is_ok())
            .count();
        assert_eq!(granted, 100);
        // No percent and no floor: no retries.
        let none = limits(CircuitBreaker::default(), budget(0, 0));
        drop(none.admit_request(Instant::now()).expect("admit"));
        assert!(none.admit_retry(Duration::ZERO, None).is_err());
        // max_retries caps retries in flight whatever the budget.
        let capped = limits(
            CircuitBreaker {
                max_retries: 1,
                ..CircuitBreaker::default()
            },
            RetryBudget::default(),
        );
        let one = capped.admit_retry(Duration::ZERO, None).expect("first");
        assert_eq!(
            capped.admit_retry(Duration::ZERO, None).err(),
            Some(RetryDenied::MaxRetries)
        );
        drop(one);
        assert!(capped.admit_retry(Duration::ZERO, None).is_ok());
        assert_eq!(l.in_flight().0, 0);
    }

    #[test]
    fn a_retry_past_the_deadline_is_refused_before_it_spends_anything() {
        let l = limits(
            CircuitBreaker {
                max_retries: 1,
                ..CircuitBreaker::default()
            },
            RetryBudget {
                percent: 0,
                min_retries_per_second: 1,
                ttl: Duration::from_secs(10),
            },
        );
        let now = Instant::now();
        let wait = Duration::from_millis(200);
        // The back-off would end past the deadline: refused, nothing spent.
        let soon = Some(now + Duration::from_millis(100));
        assert_eq!(l.admit_retry(wait, soon).err(), Some(RetryDenied::Deadline));
        assert_eq!(l.budget.allowance(Instant::now()), (10, 0));
        assert_eq!(l.in_flight().1, 0);
        // With time for it (or no deadline), the same retry is admitted and spends one.
        let later = Some(now + Duration::from_secs(60));
        let permit = l.admit_retry(wait, later).expect("retry");
        assert_eq!(l.budget.allowance(Instant::now()), (10, 1));
        assert_eq!(l.in_flight().1, 1);
        // The max-retries slot is taken: that is now the refusal, even without a deadline.
        assert_eq!(
            l.admit_retry(wait, None).err(),
            Some(RetryDenied::MaxRetries)
        );
        drop(permit);
        assert!(l.admit_retry(wait, None).is_ok());
    }

    #[test]
    fn the_budget_window_slides() {
        let l = limits(
            CircuitBreaker::default(),
            RetryBudget {
                percent: 50,
                min_retries_per_second: 0,
                ttl: Duration::from_secs(10),
            },
        );
        let t0 = l.budget.epoch;
        for _ in 0..10 {
            l.budget.deposit(t0);
        }
        for _ in 0..10 {
            l.budget.deposit(t0 + Duration::from_secs(5));
        }
        // Both halves count at 9 s; only the second at 12 s.
        assert_eq!(l.budget.allowance(t0 + Duration::from_secs(9)), (10, 0));
        assert_eq!(l.budget.allowance(t0 + Duration::from_secs(12)), (5, 0));
        assert!(l.budget.withdraw(t0 + Duration::from_secs(12)));
        assert_eq!(l.budget.allowance(t0 + Duration::from_secs(12)), (5, 1));
    }

    #[test]
    fn a_slot_word_moves_to_a_new_stretch_and_counts_in_one_step() {
        let empty = SlotWord(0);
        let first = empty.bump(3).expect("counts");
        assert_eq!(first.count_in(3, 3), 1);
        let second = first.bump(3).expect("counts");
        assert_eq!(second.count_in(0, 9), 2);
        // A later stretch restarts the count at this deposit, which is kept: the move and the
        // count are the same write.
        let moved = second.bump(13).expect("counts");
        assert_eq!(moved.count_in(4, 13), 1);
        assert_eq!(moved.count_in(0, 12), 0, "stretch 13 is outside 0..=12");
        // A caller whose reading is a window old counts nothing rather than wipe newer counts.
        assert_eq!(moved.bump(3), None);
        // The count stops at its maximum rather than wrap into the stamp.
        let full = SlotWord((SlotWord::stamp_of(5) << COUNT_BITS) | COUNT_MAX);
        assert_eq!(full.bump(5), Some(full));
        assert_eq!(full.count_in(5, 5), COUNT_MAX);
    }

    #[test]
    fn no_deposit_is_lost_when_threads_move_a_slot_to_a_new_stretch() {
        // Threads deposit together, all at once at each slot's start, so that several find the
        // slot still counting the previous window and race to move it on.
        const THREADS: usize = 4;
        const EACH: u64 = 2000;
        let budget = Arc::new(Budget::new());
        budget.configure(&RetryBudget {
            percent: 100,
            min_retries_per_second: 0,
            ttl: Duration::from_secs(10),
        });
        let t0 = budget.epoch;
        // Fill the first window, so that every slot of the second one is reused.
        for s in 0..10 {
            budget.deposit(t0 + Duration::from_secs(s));
        }
        let barrier = Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (budget, barrier) = (budget.clone(), barrier.clone());
                std::thread::spawn(move || {
                    for s in 10..19 {
                        barrier.wait();
                        for _ in 0..EACH {
                            budget.deposit(t0 + Duration::from_secs(s));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        // The window at 18 s holds slots 9 to 18: one old deposit and all of the new ones.
        let (requests, _) = budget.window(t0 + Duration::from_secs(18));
        assert_eq!(requests, 1 + 9 * THREADS as u64 * EACH);
    }

    #[test]
    fn breakers_trip_and_recover() {
        let l = limits(
            CircuitBreaker {
                max_connections: 1,
                max_pending_requests: 1,
                max_requests: 2,
                max_retries: u32::MAX,
            },
            RetryBudget::default(),
        );
        let a = l.admit_request(Instant::now()).expect("first");
        let _b = l.admit_request(Instant::now()).expect("second");
        assert_eq!(l.admit_request(Instant::now()).err(), Some(Limit::Requests));
        drop(a);
        assert!(l.admit_request(Instant::now()).is_ok());
        let conn = l.connection().expect("connection");
        assert_eq!(l.connection().err(), Some("max-connections"));
        assert_eq!(LimitPermit::connection(&l).err(), Some(Limit::Connections));
        drop(conn);
        assert!(l.connection().is_ok());
        let _p = l.pending().expect("pending");
        assert_eq!(l.pending().err(), Some("max-pending-requests"));
    }

    #[test]
    fn what_is_retried() {
        let headers = HeaderMap::new();
        let default = default_retry_policy();
        // Connect failures: any method.
        assert!(retry_condition(default, Failure::NotSent, false).is_some());
        // 503: idempotent only; 500 not at all by default.
        assert!(retry_condition(default, Failure::Response(503, &headers), true).is_some());
        assert!(retry_condition(default, Failure::Response(503, &headers), false).is_none());
        assert!(retry_condition(default, Failure::Response(500, &headers), true).is_none());
        // Resets (idempotent only) by default; timeouts and resets need reset, 5xx or
        // gateway-error.
        assert_eq!(
            retry_condition(default, Failure::Reset, true),
            Some("reset")
        );
        assert!(retry_condition(default, Failure::Reset, false).is_none());
        let mut policy = default.clone();
        policy.retry_on = vec![RetryOn::ConnectFailure];
        assert!(retry_condition(&policy, Failure::Reset, true).is_none());
        assert!(retry_condition(&policy, Failure::Timeout, true).is_none());
        policy.retry_on = vec![RetryOn::GatewayError];
        assert_eq!(
            retry_condition(&policy, Failure::Reset, true),
            Some("reset")
        );
        assert_eq!(
            retry_condition(&policy, Failure::Timeout, true),
            Some("timeout")
        );
        assert!(retry_condition(&policy, Failure::Timeout, false).is_none());
        assert!(retry_condition(&policy, Failure::Response(502, &headers), true).is_some());
        assert!(retry_condition(&policy, Failure::Response(500, &headers), true).is_none());
        // gRPC codes from a trailers-only response, for any method.
        policy.retriable_grpc_codes = vec![GrpcCode::Unavailable];
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().expect("value"));
        assert_eq!(
            retry_condition(&policy, Failure::Response(200, &grpc), false),
            Some("grpc-status")
        );
        grpc.insert("grpc-status", "3".parse().expect("value"));
        assert!(retry_condition(&policy, Failure::Response(200, &grpc), false).is_none());
        assert!(is_idempotent(&Method::PUT) && !is_idempotent(&Method::POST));
        // A route that opts in retries a non-idempotent request on everything it lists.
        let mut any_method = default.clone();
        any_method.retry_non_idempotent = true;
        assert_eq!(
            retry_condition(&any_method, Failure::Reset, false),
            Some("reset")
        );
        assert_eq!(
            retry_condition(&any_method, Failure::Timeout, false),
            Some("timeout")
        );
        assert_eq!(
            retry_condition(&any_method, Failure::Response(503, &headers), false),
            Some("status")
        );
        assert!(retry_condition(&any_method, Failure::Response(500, &headers), false).is_none());
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        for _ in 0..200 {
            assert!(backoff(1, base, max) < base);
            assert!(backoff(3, base, max) < base * 4);
            assert!(backoff(30, base, max) < max);
        }
        assert_eq!(backoff(1, Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    async fn read(body: Body) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_body_is_replayed_for_a_retry() {
        let replay = Replay::new(chunks(&["hello ", "keel"]), 64);
        let first = replay.attempt().expect("first");
        assert_eq!(read(first).await.expect("first body"), b"hello keel");
        let second = replay.attempt().expect("second");
        assert_eq!(read(second).await.expect("second body"), b"hello keel");
    }

    #[tokio::test]
    async fn a_retry_picks_up_where_a_partial_attempt_stopped() {
        let replay = Replay::new(chunks(&["one ", "two ", "three"]), 64);
        let mut first = replay.attempt().expect("first");
        let frame = first.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "one ");
        let second = replay.attempt().expect("second");
        // The first attempt's body is superseded.
        assert!(first.frame().await.expect("frame").is_err());
        assert_eq!(read(second).await.expect("second body"), b"one two three");
    }

    #[tokio::test]
    async fn a_body_beyond_the_cap_streams_but_cannot_be_replayed() {
        let replay = Replay::new(chunks(&["0123456789", "abcdefghij"]), 15);
        let first = replay.attempt().expect("first");
        assert_eq!(read(first).await.expect("body"), b"0123456789abcdefghij");
        assert!(replay.attempt().is_none());
        // An attempt that read nothing leaves the body replayable whatever its size.
        let untouched = Replay::new(chunks(&["0123456789", "abcdefghij"]), 5);
        drop(untouched.attempt());
        let again = untouched.attempt().expect("replayable");
        assert_eq!(read(again).await.expect("body"), b"0123456789abcdefghij");
    }
}

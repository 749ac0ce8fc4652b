//! Per-upstream health: a circuit breaker. Enough consecutive failures open the circuit, so a
//! dead upstream costs nothing while it is skipped; once the open period ends one probe request
//! is let through, and its outcome closes the circuit or reopens it for longer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{after, Reason};
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

struct State {
    failures: u32,
    open_until: Option<Instant>,
    /// The next open period (escalates on failed probes).
    backoff: Duration,
    /// When the single probe of a half-open circuit was let through.
    probe_started: Option<Instant>,
}

/// The circuit breaker of one upstream; publishes `ferry_upstream_up` for it.
pub(super) struct Breaker {
    name: String,
    failure_threshold: u32,
    backoff: Duration,
    max_backoff: Duration,
    /// The longest a probe can take to get headers: a probe that never reported back (its
    /// request was cancelled) lapses after this.
    probe_lapse: Duration,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    /// A closed circuit for the upstream `name`.
    pub(super) fn new(name: &str, cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Breaker {
        metrics.upstream_up.with_label_values(&[name]).set(1);
        Breaker {
            name: name.to_owned(),
            failure_threshold: cfg.failure_threshold,
            backoff: cfg.backoff,
            max_backoff: cfg.max_backoff,
            probe_lapse: cfg.connect_timeout + cfg.first_byte_timeout,
            state: Mutex::new(State::closed(cfg.backoff)),
            metrics,
        }
    }

    /// Whether a request may be sent now: closed circuit, or the single probe of a half-open one.
    pub(super) fn admit(&self) -> bool {
        let Ok(mut h) = self.state.lock() else { return true };
        let now = Instant::now();
        match h.open_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) => {
                // One probe at a time. A probe whose request was cancelled (a hedge that lost, a
                // client that left) never reports back, so it lapses after the longest it could
                // take to get headers.
                if h.probe_started.is_some_and(|s| now.duration_since(s) < self.probe_lapse) {
                    return false;
                }
                h.probe_started = Some(now);
                true
            }
        }
    }

    /// Records a healthy answer: closes the circuit.
    pub(super) fn report_success(&self) {
        if let Ok(mut h) = self.state.lock() {
            if h.open_until.is_some() {
                tracing::info!(upstream = %self.name, "upstream recovered; circuit closed");
            }
            *h = State::closed(self.backoff);
        }
        self.metrics.upstream_up.with_label_values(&[&self.name]).set(1);
    }

    /// Records a failure. Enough consecutive ones open the circuit for `backoff`; a failed probe
    /// reopens it for twice as long (capped). Failures of requests that were already in flight
    /// when it opened change nothing, so one hiccup does not bench an upstream for minutes.
    pub(super) fn report_failure(&self, reason: &Reason) {
        if !reason.is_failure() {
            return;
        }
        let Ok(mut h) = self.state.lock() else { return };
        h.failures = h.failures.saturating_add(1);
        let was_probe = h.probe_started.take().is_some();
        // A 429's Retry-After, bounded: an upstream must not be able to bench itself forever.
        let asked = match reason {
            Reason::RateLimited(Some(d)) => (*d).min(self.max_backoff),
            _ => Duration::ZERO,
        };
        // Corrupt bytes are not a blip, and a 429 asks us to stay away: open at once.
        let severe = matches!(reason, Reason::DigestMismatch | Reason::RateLimited(_));
        let open_for = if was_probe {
            h.backoff = (h.backoff.saturating_mul(2)).min(self.max_backoff);
            h.backoff.max(asked)
        } else if h.open_until.is_none() && (h.failures >= self.failure_threshold || severe) {
            h.backoff.max(asked)
        } else if h.open_until.is_some() && asked > Duration::ZERO {
            // Already open: only a longer Retry-After extends it.
            let until = after(asked);
            if h.open_until.is_some_and(|t| t < until) {
                h.open_until = Some(until);
            }
            return;
        } else {
            return;
        };
        h.open_until = Some(after(open_for));
        tracing::warn!(upstream = %self.name, %reason, open_for = ?open_for, "upstream circuit opened");
        self.metrics.upstream_up.with_label_values(&[&self.name]).set(0);
    }
}

impl State {
    fn closed(backoff: Duration) -> State {
        State { failures: 0, open_until: None, backoff, probe_started: None }
    }
}

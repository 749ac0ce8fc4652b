//! A registry's ordered upstreams and failover across them.
//!
//! Failover is decided and counted here only. [`Pool::send`] moves on from upstreams that fail
//! a request (errors, refusals, timeouts), hedging when configured; [`Attempts`] is the cursor a
//! piece of work holds across several requests, for failures only the caller can see (an answer
//! whose body turned out wrong or broke) and for resuming a blob on another upstream.

use std::sync::Arc;
use std::time::Duration;

use super::{Answer, Exhausted, Reason, Upstream, UpstreamRequest};
use crate::config::RegistryConfig;
use crate::distribution::{ErrorCode, ProtocolError};
use crate::metrics::Metrics;

/// The ordered upstreams of one registry.
pub struct Pool {
    registry: String,
    upstreams: Vec<Arc<Upstream>>,
    hedge_delay: Option<Duration>,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// Builds the clients for a configured registry.
    pub fn new(registry: &str, cfg: &RegistryConfig, metrics: Arc<Metrics>) -> Result<Pool, super::BuildError> {
        let upstreams = cfg
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                Upstream::new(&format!("registries.{registry}.upstreams[{i}]"), u, metrics.clone()).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Pool { registry: registry.to_owned(), upstreams, hedge_delay: cfg.hedge_delay, metrics })
    }

    /// The upstream named `name` (its URL), if it belongs to this registry.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// How many upstreams the registry has.
    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    /// Whether the registry has no upstreams (config validation prevents it).
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The registry's canonical name.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The failover cursor for one piece of work (see [`Attempts`]).
    pub fn attempts<'a>(&'a self, req: UpstreamRequest<'a>) -> Attempts<'a> {
        // Each upstream twice (a resume may return to the same one), plus one: bounded
        // whatever the upstreams do.
        let left = 2 * self.len() + 1;
        Attempts { pool: self, req, skip: Vec::new(), tried: Vec::new(), left, exhausted: false }
    }

    /// Tries each upstream allowed `req.capability`, in order (those in `skip` last), skipping
    /// open circuits, until one answers with a success status.
    async fn send(&self, req: &UpstreamRequest<'_>, skip: &[String]) -> Result<Answer, Exhausted> {
        let mut tried = Vec::new();
        let eligible = self.upstreams.iter().filter(|u| u.can(req.capability));
        let (fresh, failed): (Vec<_>, Vec<_>) = eligible.partition(|u| !skip.iter().any(|s| s == u.name()));
        let mut pending: std::vec::IntoIter<&Arc<Upstream>> =
            fresh.into_iter().chain(failed).collect::<Vec<_>>().into_iter();
        let hedge = self.hedge_delay;
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut more = true;
        match next_admitted(&mut pending, &mut tried) {
            Some(first) => inflight.push(attempt(first, req)),
            None => more = false,
        }
        while !inflight.is_empty() {
            let hedge_timer = async {
                match hedge {
                    Some(d) if more => tokio::time::sleep(d).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((up, result)) = futures_util::StreamExt::next(&mut inflight) => match result {
                    Ok(response) => {
                        up.report_success();
                        // Dropping `inflight` cancels any hedged request still waiting.
                        return Ok(Answer { upstream: up, response });
                    }
                    Err(reason) => {
                        self.moved_on(&up, &reason, true);
                        tried.push((up.name().to_owned(), reason));
                        match next_admitted(&mut pending, &mut tried) {
                            Some(next) => inflight.push(attempt(next, req)),
                            None => more = false,
                        }
                    }
                },
                () = hedge_timer => match next_admitted(&mut pending, &mut tried) {
                    Some(next) => {
                        tracing::debug!(registry = %self.registry, upstream = %next.name(), "hedging: asking the next upstream too");
                        inflight.push(attempt(next, req));
                    }
                    None => more = false,
                },
            }
        }
        Err(Exhausted { tried })
    }

    /// Records that work moved on from `up`: its health hears of it (a 404 is a healthy
    /// answer), and with `counted`, `ferry_upstream_failovers_total` counts it.
    fn moved_on(&self, up: &Upstream, reason: &Reason, counted: bool) {
        if *reason == Reason::NotFound {
            up.report_success();
        } else {
            up.report_failure(reason);
        }
        tracing::debug!(registry = %self.registry, upstream = %up.name(), %reason, "moving on to the next upstream");
        if counted {
            self.metrics.upstream_failovers.with_label_values(&[&self.registry, up.name(), reason.label()]).inc();
        }
    }
}

/// One piece of work's way through a registry's upstreams: each [`next`](Attempts::next) asks
/// the pool (failing over on request errors), and when the caller finds an answer unusable it
/// says so with [`failed`](Attempts::failed) or [`rejected`](Attempts::rejected), which puts
/// that upstream last for the next attempt. Bounded: each upstream twice, plus one.
pub struct Attempts<'a> {
    pool: &'a Pool,
    req: UpstreamRequest<'a>,
    /// Upstreams (by name) that already failed this work: asked last, not first.
    skip: Vec<String>,
    /// Why each upstream that was given up on failed, in order.
    tried: Vec<(String, Reason)>,
    left: usize,
    /// The pool had no upstream left to ask: its reasons are in `tried`.
    exhausted: bool,
}

impl Attempts<'_> {
    /// Asks the next attempt for the bytes from `offset` on (`Range`), to resume a body that
    /// broke there; 0 asks for the whole.
    pub fn resume_from(&mut self, offset: u64) {
        self.req.range_from = (offset > 0).then_some(offset);
    }

    /// The next successful answer, or `None` when no upstream gave one or the attempts are
    /// spent (then [`into_error`](Attempts::into_error) says why).
    pub async fn next(&mut self) -> Option<Answer> {
        if self.exhausted || self.left == 0 {
            return None;
        }
        self.left -= 1;
        match self.pool.send(&self.req, &self.skip).await {
            Ok(answer) => Some(answer),
            Err(e) => {
                self.tried.extend(e.tried);
                self.exhausted = true;
                None
            }
        }
    }

    /// `up`'s answer broke (its body stream failed): a failover, reported to its health and
    /// counted in `ferry_upstream_failovers_total`.
    pub fn failed(&mut self, up: &Upstream, reason: Reason) {
        self.pool.moved_on(up, &reason, true);
        self.give_up_on(up, reason);
    }

    /// `up` answered, but with content this work cannot use (a body that does not match, a
    /// range that does not continue): reported to its health, but not counted as a failover,
    /// which counts requests and streams that failed.
    pub fn rejected(&mut self, up: &Upstream, reason: Reason) {
        self.pool.moved_on(up, &reason, false);
        self.give_up_on(up, reason);
    }

    fn give_up_on(&mut self, up: &Upstream, reason: Reason) {
        self.skip.push(up.name().to_owned());
        self.tried.push((up.name().to_owned(), reason));
    }

    /// The upstreams given up on so far, and why, in order.
    pub fn tried(&self) -> &[(String, Reason)] {
        &self.tried
    }

    /// The client-facing error once the attempts ended without a usable answer (see
    /// [`Exhausted::into_error`]).
    pub fn into_error(self, not_found: ErrorCode, what: &str) -> ProtocolError {
        Exhausted { tried: self.tried }.into_error(not_found, what)
    }
}

/// The next upstream whose circuit admits a request now. Admission happens only when an
/// upstream is really about to be asked: admitting a half-open circuit makes that request its
/// one probe. Skipped ones are recorded.
fn next_admitted(
    pending: &mut std::vec::IntoIter<&Arc<Upstream>>,
    tried: &mut Vec<(String, Reason)>,
) -> Option<Arc<Upstream>> {
    for up in pending.by_ref() {
        if up.admit() {
            return Some(up.clone());
        }
        tried.push((up.name().to_owned(), Reason::CircuitOpen));
    }
    None
}

async fn attempt(up: Arc<Upstream>, req: &UpstreamRequest<'_>) -> (Arc<Upstream>, Result<reqwest::Response, Reason>) {
    let r = up.send(req).await;
    (up, r)
}

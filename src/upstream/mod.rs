//! Upstream registries: one HTTP client per upstream, the Bearer/Basic auth dance with a token
//! cache, per-upstream health (a circuit breaker), and ordered failover across a registry's
//! upstreams.
//!
//! * `pool`: a registry's upstreams, failover, and the [`Attempts`] cursor of one piece of work.
//! * `client`: one [`Upstream`]: sending a request, counting its answers.
//! * `auth`: challenges, the token dance and the token cache.
//! * `health`: the circuit breaker.
//! * `reason`: why an upstream failed ([`Reason`]), and the client-facing error when all did.
//! * `body`: reading answer bodies.
//!
//! Client credentials are never forwarded: every request here is built from scratch with
//! Ferry's own configuration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use crate::config::Capability;
use crate::distribution::RepoName;

mod auth;
mod body;
mod client;
mod health;
mod pool;
mod reason;

pub use body::{body_span, read_bounded};
pub use client::{BuildError, Upstream};
pub use pool::{Attempts, Pool};
pub use reason::{error_chain, Exhausted, Reason};

/// One request to send to a registry's upstreams.
pub struct UpstreamRequest<'a> {
    /// GET or HEAD.
    pub method: Method,
    /// Repository on the upstream (already mapped, e.g. `library/alpine`).
    pub repo: &'a RepoName,
    /// Path below the repository: `manifests/<ref>`, `blobs/<digest>`, `tags/list`.
    pub path: String,
    /// `Accept` header values to send.
    pub accept: Vec<String>,
    /// Ask for the bytes from this offset on (resuming a broken blob stream).
    pub range_from: Option<u64>,
    /// What the upstream must be allowed to do.
    pub capability: Capability,
}

impl<'a> UpstreamRequest<'a> {
    /// `method` for `path` below `repo`, of the upstreams allowed `capability`, with no `Accept`
    /// and for the whole body.
    pub fn new(method: Method, repo: &'a RepoName, path: String, capability: Capability) -> Self {
        UpstreamRequest { method, repo, path, accept: Vec::new(), range_from: None, capability }
    }

    /// The same request sending these `Accept` values.
    pub fn with_accept(self, accept: Vec<String>) -> Self {
        UpstreamRequest { accept, ..self }
    }
}

/// A successful answer and the upstream that gave it.
pub struct Answer {
    /// Who answered (for health reports and logs).
    pub upstream: Arc<Upstream>,
    /// The response, headers read, body not yet.
    pub response: reqwest::Response,
}

/// `now + d`, saturating instead of panicking on an absurd duration (upstream-controlled
/// `Retry-After` or token lifetimes must never crash a task).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(86_400))).unwrap_or(now)
}

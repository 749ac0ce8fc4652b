//! Why an upstream gave no usable answer, and the error a client sees when none did.

use std::fmt;
use std::time::Duration;

use crate::distribution::{ErrorCode, ProtocolError};

/// Why one upstream did not give a usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Skipped: its circuit is open after recent failures.
    CircuitOpen,
    /// TCP/TLS/DNS failure.
    Connect(String),
    /// No response headers within `first_byte_timeout` (or `connect_timeout`).
    Timeout(&'static str),
    /// The request failed in another transport way.
    Transport(String),
    /// It answered 404: mirrors are partial, so the next one is asked.
    NotFound,
    /// 401/403 even after authenticating, or the token endpoint refused.
    Auth(String),
    /// 429, with the upstream's `Retry-After` if it sent one.
    RateLimited(Option<Duration>),
    /// Another unusable status (5xx, unexpected 4xx).
    Status(u16),
    /// A body stream broke (reset, stall, early close).
    Body(String),
    /// The bytes did not hash to the digest asked for.
    DigestMismatch,
    /// A manifest that is not one: not JSON, or a `mediaType` other than its `Content-Type`.
    InvalidManifest(String),
}

impl Reason {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::CircuitOpen => "circuit_open",
            Reason::Connect(_) => "connect",
            Reason::Timeout(_) => "timeout",
            Reason::Transport(_) => "transport",
            Reason::NotFound => "not_found",
            Reason::Auth(_) => "auth",
            Reason::RateLimited(_) => "rate_limited",
            Reason::Status(s) if *s >= 500 => "5xx",
            Reason::Status(_) => "4xx",
            Reason::Body(_) => "body",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::InvalidManifest(_) => "invalid_manifest",
        }
    }

    /// Whether this counts against the upstream's health (a 404 is a healthy answer).
    pub(super) fn is_failure(&self) -> bool {
        !matches!(self, Reason::NotFound | Reason::CircuitOpen)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::CircuitOpen => f.write_str("skipped: circuit open after recent failures"),
            Reason::Connect(e) => write!(f, "connection failed: {e}"),
            Reason::Timeout(what) => write!(f, "timed out waiting for {what}"),
            Reason::Transport(e) => write!(f, "request failed: {e}"),
            Reason::NotFound => f.write_str("not found"),
            Reason::Auth(e) => write!(f, "authentication failed: {e}"),
            Reason::RateLimited(Some(d)) => write!(f, "rate limited (429), retry after {}s", d.as_secs()),
            Reason::RateLimited(None) => f.write_str("rate limited (429)"),
            Reason::Status(s) => write!(f, "answered HTTP {s}"),
            Reason::Body(e) => write!(f, "body stream broke: {e}"),
            Reason::DigestMismatch => f.write_str("content did not match its digest"),
            Reason::InvalidManifest(why) => write!(f, "invalid manifest: {why}"),
        }
    }
}

/// Every upstream of a registry failed; says which and why.
#[derive(Clone, Debug, Default)]
pub struct Exhausted {
    /// `(upstream name, why)` in the order tried.
    pub tried: Vec<(String, Reason)>,
}

impl Exhausted {
    /// The client-facing error: `not_found` when every upstream said not-found, otherwise
    /// `UNAVAILABLE` with the list of upstreams and reasons (names only, never secrets).
    pub fn into_error(self, not_found: ErrorCode, what: &str) -> ProtocolError {
        let all_not_found = !self.tried.is_empty() && self.tried.iter().all(|(_, r)| *r == Reason::NotFound);
        let detail = serde_json::Value::Array(
            self.tried.iter().map(|(u, r)| serde_json::json!({ "upstream": u, "reason": r.to_string() })).collect(),
        );
        if all_not_found {
            ProtocolError::new(not_found, format!("{what} not found on any upstream")).with_detail(detail)
        } else {
            let summary: Vec<String> = self.tried.iter().map(|(u, r)| format!("{u}: {r}")).collect();
            ProtocolError::new(
                ErrorCode::Unavailable,
                format!("no upstream could serve {what} ({})", summary.join("; ")),
            )
            .with_detail(detail)
        }
    }
}

/// The error and its causes on one line, without the URL (it is already named as the upstream).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        let s = s.split(" for url (").next().unwrap_or(&s).to_owned();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausted_errors() {
        let e = Exhausted { tried: vec![("http://a".into(), Reason::NotFound), ("http://b".into(), Reason::NotFound)] };
        assert_eq!(e.into_error(ErrorCode::ManifestUnknown, "x").code, ErrorCode::ManifestUnknown);
        let e =
            Exhausted { tried: vec![("http://a".into(), Reason::NotFound), ("http://b".into(), Reason::Status(500))] };
        let err = e.into_error(ErrorCode::ManifestUnknown, "x");
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(err.message.contains("http://b: answered HTTP 500"), "{}", err.message);
    }
}

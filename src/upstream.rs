//! Upstream registries: one HTTP client per upstream, the Bearer/Basic auth dance with a token
//! cache, per-upstream health (a circuit breaker), and ordered failover across a registry's
//! upstreams.
//!
//! Client credentials are never forwarded: every request here is built from scratch with
//! Ferry's own configuration.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use reqwest::header::{ACCEPT, AUTHORIZATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};

use crate::config::{Capability, RegistryConfig, UpstreamConfig};
use crate::distribution::{ErrorCode, ProtocolError, RepoName};
use crate::metrics::Metrics;

/// Largest token endpoint answer read (tokens are a few KiB).
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Cached tokens per upstream, at most (one per repository scope).
const MAX_TOKENS: usize = 4096;

/// Reads a small response body (a token, a manifest), refusing more than `limit` bytes.
pub async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Reason> {
    use futures_util::StreamExt;
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Reason::Body(error_chain(&e)))?;
        if buf.len() + chunk.len() > limit {
            return Err(Reason::Body(format!("answer larger than {limit} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

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
        }
    }

    /// Whether this counts against the upstream's health (a 404 is a healthy answer).
    fn is_failure(&self) -> bool {
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
    /// Upstreams (by name) that already failed this piece of work: asked last, not first.
    pub skip: Vec<String>,
}

/// A successful answer and the upstream that gave it.
pub struct Answer {
    /// Who answered (for health reports and logs).
    pub upstream: Arc<Upstream>,
    /// The response, headers read, body not yet.
    pub response: reqwest::Response,
}

struct Token {
    header: String,
    expires: Instant,
}

struct Health {
    failures: u32,
    open_until: Option<Instant>,
    /// The next open period (escalates on failed probes).
    backoff: Duration,
    /// When the single probe of a half-open circuit was let through.
    probe_started: Option<Instant>,
}

/// `now + d`, saturating instead of panicking on an absurd duration (upstream-controlled
/// `Retry-After` or token lifetimes must never crash a task).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(86_400))).unwrap_or(now)
}

/// One upstream endpoint of a registry.
pub struct Upstream {
    name: String,
    base: String,
    cfg: UpstreamConfig,
    credentials: Option<(String, String)>,
    client: reqwest::Client,
    tokens: Mutex<HashMap<String, Token>>,
    basic: std::sync::atomic::AtomicBool,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A problem building an upstream at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The password file could not be read.
    #[error("{at}.password_file: {err}")]
    PasswordFile {
        /// Key path.
        at: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The CA file could not be read or parsed.
    #[error("{at}.ca_file: {err}")]
    CaFile {
        /// Key path.
        at: String,
        /// Cause.
        err: String,
    },
    /// The HTTP client could not be built.
    #[error("{at}: cannot build HTTP client: {err}")]
    Client {
        /// Key path.
        at: String,
        /// Cause.
        err: reqwest::Error,
    },
}

impl Upstream {
    fn new(at: &str, cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, BuildError> {
        let password = cfg.resolve_password().map_err(|err| BuildError::PasswordFile { at: at.to_owned(), err })?;
        let credentials = cfg.username.clone().zip(password);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.idle_timeout)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            // Proxies from the environment would silently reroute a gateway's traffic.
            .no_proxy();
        if let Some(ca) = &cfg.ca_file {
            let ca_err = |err: String| BuildError::CaFile { at: at.to_owned(), err };
            let pem = std::fs::read(ca).map_err(|e| ca_err(format!("{}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
            builder = builder.tls_certs_merge(certs);
        }
        if cfg.insecure_skip_verify {
            tracing::warn!(
                upstream = %cfg.url,
                "INSECURE: insecure_skip_verify is set; this upstream's TLS certificate is NOT verified, \
                 anyone on the path can serve you any image (digests still protect content fetched by digest)"
            );
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let client = builder.build().map_err(|err| BuildError::Client { at: at.to_owned(), err })?;
        let base = cfg.url.trim_end_matches('/').to_owned();
        metrics.upstream_up.with_label_values(&[&base]).set(1);
        Ok(Upstream {
            name: base.clone(),
            base,
            cfg: cfg.clone(),
            credentials,
            client,
            tokens: Mutex::new(HashMap::new()),
            basic: Default::default(),
            health: Mutex::new(Health { failures: 0, open_until: None, backoff: cfg.backoff, probe_started: None }),
            metrics,
        })
    }

    /// The upstream's name in logs, errors and metric labels: its URL (credentials are never
    /// part of it; config validation rejects URLs with user info).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a request may be sent now: closed circuit, or the single probe of a half-open one.
    fn admit(&self) -> bool {
        let Ok(mut h) = self.health.lock() else { return true };
        let now = Instant::now();
        match h.open_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) => {
                // One probe at a time. A probe whose request was cancelled (a hedge that lost, a
                // client that left) never reports back, so it lapses after the longest it could
                // take to get headers.
                let limit = self.cfg.connect_timeout + self.cfg.first_byte_timeout;
                if h.probe_started.is_some_and(|s| now.duration_since(s) < limit) {
                    return false;
                }
                h.probe_started = Some(now);
                true
            }
        }
    }

    /// Records a healthy answer: closes the circuit.
    pub fn report_success(&self) {
        if let Ok(mut h) = self.health.lock() {
            if h.open_until.is_some() {
                tracing::info!(upstream = %self.name, "upstream recovered; circuit closed");
            }
            *h = Health { failures: 0, open_until: None, backoff: self.cfg.backoff, probe_started: None };
        }
        self.metrics.upstream_up.with_label_values(&[&self.name]).set(1);
    }

    /// Records a failure. Enough consecutive ones open the circuit for `backoff`; a failed probe
    /// reopens it for twice as long (capped). Failures of requests that were already in flight
    /// when it opened change nothing, so one hiccup does not bench an upstream for minutes.
    pub fn report_failure(&self, reason: &Reason) {
        if !reason.is_failure() {
            return;
        }
        let Ok(mut h) = self.health.lock() else { return };
        h.failures = h.failures.saturating_add(1);
        let was_probe = h.probe_started.take().is_some();
        // A 429's Retry-After, bounded: an upstream must not be able to bench itself forever.
        let asked = match reason {
            Reason::RateLimited(Some(d)) => (*d).min(self.cfg.max_backoff),
            _ => Duration::ZERO,
        };
        // Corrupt bytes are not a blip, and a 429 asks us to stay away: open at once.
        let severe = matches!(reason, Reason::DigestMismatch | Reason::RateLimited(_));
        let open_for = if was_probe {
            h.backoff = (h.backoff.saturating_mul(2)).min(self.cfg.max_backoff);
            h.backoff.max(asked)
        } else if h.open_until.is_none() && (h.failures >= self.cfg.failure_threshold || severe) {
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

    /// Adds what this upstream is known to want: Basic credentials, or a cached Bearer token.
    fn with_auth(&self, rb: reqwest::RequestBuilder, scope: &str) -> reqwest::RequestBuilder {
        if self.basic.load(std::sync::atomic::Ordering::Relaxed) {
            return self.with_basic(rb);
        }
        let token = self
            .tokens
            .lock()
            .ok()
            .and_then(|tokens| tokens.get(scope).filter(|t| t.expires > Instant::now()).map(|t| t.header.clone()));
        match token {
            Some(t) => rb.header(AUTHORIZATION, t),
            None => rb,
        }
    }

    fn with_basic(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credentials {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    /// Answers a 401 challenge: fetches a Bearer token (anonymous or with credentials) or
    /// switches to Basic. The result is cached per scope until shortly before it expires.
    async fn authenticate(&self, challenge: &str, scope: &str) -> Result<(), Reason> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            if self.credentials.is_none() {
                return Err(Reason::Auth("upstream wants Basic credentials and none are configured".into()));
            }
            self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Reason::Auth(format!("unsupported auth scheme {scheme:?}")));
        }
        let realm = params.get("realm").ok_or_else(|| Reason::Auth("Bearer challenge without realm".into()))?;
        let mut url = reqwest::Url::parse(realm).map_err(|_| Reason::Auth("Bearer realm is not a URL".into()))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", params.get("scope").map(String::as_str).unwrap_or(scope));
        }
        let req = self.with_basic(self.client.get(url));
        let resp = tokio::time::timeout(self.cfg.first_byte_timeout, req.send())
            .await
            .map_err(|_| Reason::Timeout("the token endpoint"))?
            .map_err(|e| Reason::Auth(format!("token endpoint: {}", e.without_url())))?;
        if !resp.status().is_success() {
            return Err(Reason::Auth(format!("token endpoint answered HTTP {}", resp.status().as_u16())));
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = tokio::time::timeout(self.cfg.idle_timeout, read_bounded(resp, MAX_TOKEN_BODY))
            .await
            .map_err(|_| Reason::Timeout("the token body"))??;
        let body: TokenBody =
            serde_json::from_slice(&body).map_err(|_| Reason::Auth("token endpoint answered no JSON token".into()))?;
        let token =
            body.token.or(body.access_token).ok_or_else(|| Reason::Auth("token endpoint answered no token".into()))?;
        // Distribution's spec default is 60 s; renew a little early so a token never lapses mid-pull.
        // Bounded: the lifetime comes from the token server.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(10, 86_400));
        let expires = after(lifetime - (lifetime / 10).min(Duration::from_secs(30)));
        if let Ok(mut t) = self.tokens.lock() {
            // One token per repository scope, and clients choose repositories: keep the map
            // bounded (an evicted token is simply fetched again).
            if t.len() >= MAX_TOKENS {
                let now = Instant::now();
                t.retain(|_, v| v.expires > now);
                if t.len() >= MAX_TOKENS {
                    t.clear();
                }
            }
            t.insert(scope.to_owned(), Token { header: format!("Bearer {token}"), expires });
        }
        Ok(())
    }

    /// Sends one request to this upstream, authenticating on a 401 (once).
    async fn send(&self, req: &UpstreamRequest<'_>) -> Result<reqwest::Response, Reason> {
        let url = format!("{}/v2/{}/{}", self.base, req.repo, req.path);
        let scope = format!("repository:{}:pull", req.repo);
        for attempt in 0..2 {
            let mut rb = self.client.request(req.method.clone(), &url);
            for a in &req.accept {
                rb = rb.header(ACCEPT, a);
            }
            if let Some(from) = req.range_from {
                rb = rb.header(RANGE, format!("bytes={from}-"));
            }
            rb = self.with_auth(rb, &scope);
            let started = Instant::now();
            let sent = tokio::time::timeout(self.cfg.first_byte_timeout, rb.send()).await;
            let elapsed = started.elapsed().as_secs_f64();
            self.metrics.upstream_duration.with_label_values(&[&self.name]).observe(elapsed);
            let resp = match sent {
                Err(_) => {
                    self.count("timeout");
                    return Err(Reason::Timeout("response headers"));
                }
                Ok(Err(e)) => {
                    self.count("error");
                    return Err(classify(&e));
                }
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            self.count(status.as_str());
            self.record_ratelimit(resp.headers());
            match status {
                s if s.is_success() => return Ok(resp),
                StatusCode::UNAUTHORIZED if attempt == 0 => {
                    let challenge =
                        resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    self.authenticate(&challenge, &scope).await?;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let why = if self.credentials.is_some() {
                        "the configured credentials were refused"
                    } else {
                        "anonymous access was refused; configure username and password"
                    };
                    return Err(Reason::Auth(format!("HTTP {}: {why}", status.as_u16())));
                }
                StatusCode::NOT_FOUND => return Err(Reason::NotFound),
                StatusCode::TOO_MANY_REQUESTS => {
                    let after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    return Err(Reason::RateLimited(after));
                }
                s => return Err(Reason::Status(s.as_u16())),
            }
        }
        Err(Reason::Auth("still unauthorized after authenticating".into()))
    }

    fn count(&self, status: &str) {
        self.metrics.upstream_requests.with_label_values(&[&self.name, status]).inc();
    }

    fn record_ratelimit(&self, headers: &HeaderMap) {
        let remaining = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.trim().parse::<i64>().ok());
        if let Some(r) = remaining {
            self.metrics.upstream_ratelimit_remaining.with_label_values(&[&self.name]).set(r);
        }
    }
}

fn classify(e: &reqwest::Error) -> Reason {
    let msg = error_chain(e);
    if e.is_connect() {
        Reason::Connect(msg)
    } else if e.is_timeout() {
        Reason::Timeout("the connection")
    } else {
        Reason::Transport(msg)
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

/// Parses `Bearer realm="..",service="..",scope=".."` into the scheme and its parameters.
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_owned(), params)
}

/// The ordered upstreams of one registry.
pub struct Pool {
    registry: String,
    upstreams: Vec<Arc<Upstream>>,
    hedge_delay: Option<Duration>,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// Builds the clients for a configured registry.
    pub fn new(registry: &str, cfg: &RegistryConfig, metrics: Arc<Metrics>) -> Result<Pool, BuildError> {
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
        self.upstreams.iter().find(|u| u.name == name)
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

    /// Tries each upstream allowed `req.capability`, in order, skipping open circuits, until one
    /// answers with a success status.
    pub async fn send(&self, req: &UpstreamRequest<'_>) -> Result<Answer, Exhausted> {
        let mut tried = Vec::new();
        let eligible = self.upstreams.iter().filter(|u| u.cfg.can(req.capability));
        let (fresh, failed): (Vec<_>, Vec<_>) = eligible.partition(|u| !req.skip.contains(&u.name));
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
                        self.record_failure(&up, &reason);
                        tried.push((up.name.clone(), reason));
                        match next_admitted(&mut pending, &mut tried) {
                            Some(next) => inflight.push(attempt(next, req)),
                            None => more = false,
                        }
                    }
                },
                () = hedge_timer => match next_admitted(&mut pending, &mut tried) {
                    Some(next) => {
                        tracing::debug!(registry = %self.registry, upstream = %next.name, "hedging: asking the next upstream too");
                        inflight.push(attempt(next, req));
                    }
                    None => more = false,
                },
            }
        }
        Err(Exhausted { tried })
    }

    fn record_failure(&self, up: &Upstream, reason: &Reason) {
        if *reason == Reason::NotFound {
            up.report_success();
        } else {
            up.report_failure(reason);
        }
        tracing::debug!(registry = %self.registry, upstream = %up.name, %reason, "moving on to the next upstream");
        self.metrics.upstream_failovers.with_label_values(&[&self.registry, &up.name, reason.label()]).inc();
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
        tried.push((up.name.clone(), Reason::CircuitOpen));
    }
    None
}

async fn attempt(up: Arc<Upstream>, req: &UpstreamRequest<'_>) -> (Arc<Upstream>, Result<reqwest::Response, Reason>) {
    let r = up.send(req).await;
    (up, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/alpine:pull");
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "basic-realm");
    }

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

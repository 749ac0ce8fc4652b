//! One upstream endpoint: its HTTP client, how one request is sent to it (authenticating on a
//! 401), and what its answers are counted as.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use reqwest::header::{ACCEPT, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};

use super::auth::Auth;
use super::health::Breaker;
use super::{error_chain, Reason, UpstreamRequest};
use crate::config::{Capability, UpstreamConfig};
use crate::metrics::Metrics;

/// One upstream endpoint of a registry.
pub struct Upstream {
    name: String,
    base: String,
    cfg: UpstreamConfig,
    client: reqwest::Client,
    auth: Auth,
    health: Breaker,
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
    /// The client for the upstream configured at key path `at` (named in build errors).
    pub(super) fn new(at: &str, cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, BuildError> {
        let password = cfg.resolve_password().map_err(|err| BuildError::PasswordFile { at: at.to_owned(), err })?;
        let credentials = cfg.username.clone().zip(password);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.idle_timeout)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            // Proxies from the environment would silently reroute a gateway's traffic.
            .no_proxy()
            // A redirect must not tell the next host which upstream (and path) sent it there.
            .referer(false);
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
        let name = cfg.display_name();
        Ok(Upstream {
            health: Breaker::new(&name, cfg, metrics.clone()),
            name,
            base,
            cfg: cfg.clone(),
            client,
            auth: Auth::new(credentials),
            metrics,
        })
    }

    /// The upstream's name in logs, errors and metric labels: its configured `name`, or its
    /// host[:port] — never its URL, so answers to clients do not reveal where Ferry fetches.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this upstream may be asked for `cap`.
    pub(super) fn can(&self, cap: Capability) -> bool {
        self.cfg.can(cap)
    }

    /// Whether its circuit lets a request through now (see [`Breaker::admit`]).
    pub(super) fn admit(&self) -> bool {
        self.health.admit()
    }

    /// Records a healthy answer: closes the circuit.
    pub fn report_success(&self) {
        self.health.report_success()
    }

    /// Records a failure against the upstream's health; enough of them open its circuit.
    pub fn report_failure(&self, reason: &Reason) {
        self.health.report_failure(reason)
    }

    /// Sends one request to this upstream, authenticating on a 401 (once).
    pub(super) async fn send(&self, req: &UpstreamRequest<'_>) -> Result<reqwest::Response, Reason> {
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
            rb = self.auth.apply(rb, &scope);
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
                    self.auth.authenticate(&self.client, &self.cfg, &challenge, &scope).await?;
                }
                s => return Err(self.refusal(s, resp.headers())),
            }
        }
        Err(Reason::Auth("still unauthorized after authenticating".into()))
    }

    /// Why an answer with an unusable status `s` is refused.
    fn refusal(&self, s: StatusCode, headers: &HeaderMap) -> Reason {
        match s {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let why = if self.auth.has_credentials() {
                    "the configured credentials were refused"
                } else {
                    "anonymous access was refused; configure username and password"
                };
                Reason::Auth(format!("HTTP {}: {why}", s.as_u16()))
            }
            StatusCode::NOT_FOUND => Reason::NotFound,
            StatusCode::TOO_MANY_REQUESTS => {
                let after = headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Reason::RateLimited(after)
            }
            s => Reason::Status(s.as_u16()),
        }
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

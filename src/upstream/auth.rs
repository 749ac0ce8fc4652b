//! Authenticating to an upstream: Basic credentials, or the Bearer token dance (answer a 401's
//! challenge at the token endpoint it names) with a per-scope token cache.
//!
//! Client credentials are never forwarded: only Ferry's own configured ones are ever sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::AUTHORIZATION;

use super::{after, read_bounded, Reason};
use crate::config::UpstreamConfig;

/// Largest token endpoint answer read (tokens are a few KiB).
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Cached tokens per upstream, at most (one per repository scope).
const MAX_TOKENS: usize = 4096;

struct Token {
    header: String,
    expires: Instant,
}

/// What one upstream wants to see: its configured credentials, and what it asked for so far.
pub(super) struct Auth {
    credentials: Option<(String, String)>,
    /// Bearer tokens by scope (`repository:<repo>:pull`).
    tokens: Mutex<HashMap<String, Token>>,
    /// The upstream challenged with Basic: send credentials up front from now on.
    basic: AtomicBool,
    /// A foreign token realm was reported once (it repeats on every token fetch).
    warned_foreign: AtomicBool,
}

impl Auth {
    /// Nothing learnt yet; `credentials` are `(user, password)` if configured.
    pub(super) fn new(credentials: Option<(String, String)>) -> Auth {
        Auth {
            credentials,
            tokens: Mutex::new(HashMap::new()),
            basic: AtomicBool::new(false),
            warned_foreign: AtomicBool::new(false),
        }
    }

    /// Whether credentials are configured (the wording of a refusal depends on it).
    pub(super) fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Adds what this upstream is known to want: Basic credentials, or a cached Bearer token.
    pub(super) fn apply(&self, rb: reqwest::RequestBuilder, scope: &str) -> reqwest::RequestBuilder {
        if self.basic.load(Ordering::Relaxed) {
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
    pub(super) async fn authenticate(
        &self,
        client: &reqwest::Client,
        cfg: &UpstreamConfig,
        challenge: &str,
        scope: &str,
    ) -> Result<(), Reason> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            if self.credentials.is_none() {
                return Err(Reason::Auth("upstream wants Basic credentials and none are configured".into()));
            }
            self.basic.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Reason::Auth(format!("unsupported auth scheme {scheme:?}")));
        }
        let url = token_url(&params, scope)?;
        let upstream = reqwest::Url::parse(&cfg.url).map_err(|_| Reason::Auth("upstream URL".into()))?;
        let req = match realm_policy(&upstream, &url, &cfg.token_realms)? {
            Realm::Own => self.with_basic(client.get(url)),
            Realm::Foreign => {
                if self.credentials.is_some() && !self.warned_foreign.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        upstream = %cfg.display_name(),
                        realm = url.host_str().unwrap_or(""),
                        "token endpoint is not on the upstream's domain: asking it anonymously, \
                         credentials withheld (list it in token_realms if it is the upstream's)"
                    );
                }
                client.get(url)
            }
        };
        let resp = tokio::time::timeout(cfg.first_byte_timeout, req.send())
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
        let body = tokio::time::timeout(cfg.idle_timeout, read_bounded(resp, MAX_TOKEN_BODY))
            .await
            .map_err(|_| Reason::Timeout("the token body"))??;
        let body: TokenBody =
            serde_json::from_slice(&body).map_err(|_| Reason::Auth("token endpoint answered no JSON token".into()))?;
        let token =
            body.token.or(body.access_token).ok_or_else(|| Reason::Auth("token endpoint answered no token".into()))?;
        self.remember(scope, &token, body.expires_in);
        Ok(())
    }

    /// Caches a token for `scope`, renewing a little early so a token never lapses mid-pull.
    fn remember(&self, scope: &str, token: &str, expires_in: Option<u64>) {
        // Distribution's spec default is 60 s. Bounded: the lifetime comes from the token server.
        let lifetime = Duration::from_secs(expires_in.unwrap_or(60).clamp(10, 86_400));
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
    }
}

/// The token endpoint's URL for a Bearer challenge: its realm, with its service and the scope
/// it asked for (or ours, when it named none).
fn token_url(params: &HashMap<String, String>, scope: &str) -> Result<reqwest::Url, Reason> {
    let realm = params.get("realm").ok_or_else(|| Reason::Auth("Bearer challenge without realm".into()))?;
    let mut url = reqwest::Url::parse(realm).map_err(|_| Reason::Auth("Bearer realm is not a URL".into()))?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = params.get("service") {
            q.append_pair("service", service);
        }
        q.append_pair("scope", params.get("scope").map(String::as_str).unwrap_or(scope));
    }
    Ok(url)
}

/// Whose a token endpoint is.
#[derive(Debug, PartialEq, Eq)]
enum Realm {
    /// The upstream's own: its host, its parent domain, or listed in `token_realms`.
    Own,
    /// Someone else's: asked without Ferry's credentials.
    Foreign,
}

/// What a challenge may make Ferry dial. An upstream (or anyone between Ferry and it) names
/// the token endpoint, so: credentials go only to the upstream's own host, its parent domain
/// (`registry-1.docker.io` → `auth.docker.io`, `registry.cn-hangzhou.aliyuncs.com` →
/// `dockerauth.cn-hangzhou.aliyuncs.com`) or a host in `token_realms`; an https upstream never
/// sends Ferry to plain http; and a realm on a loopback, link-local or unspecified address is
/// dialled only when the upstream itself is on one (no pivot into the gateway's own network).
fn realm_policy(upstream: &reqwest::Url, realm: &reqwest::Url, allowed: &[String]) -> Result<Realm, Reason> {
    let refuse = |why: &str| Err(Reason::Auth(format!("token endpoint refused: {why}")));
    match (upstream.scheme(), realm.scheme()) {
        ("https", "https") | ("http", "http" | "https") => {}
        ("https", "http") => return refuse("an https upstream named a plain http token endpoint"),
        _ => return refuse("not an http(s) URL"),
    }
    let (Some(up), Some(host)) = (upstream.host(), realm.host()) else { return refuse("no host") };
    if internal(&host) && !internal(&up) {
        return refuse("it is on a loopback or link-local address and the upstream is not");
    }
    let (up, host) = (host_text(&up), host_text(&host));
    if up == host || allowed.iter().any(|a| a.eq_ignore_ascii_case(&host)) {
        return Ok(Realm::Own);
    }
    // The parent domain: the upstream's host without its first label, if that still has a dot
    // (never a bare public suffix such as `com`) and the upstream is a name, not an address.
    let is_name = matches!(upstream.host(), Some(url::Host::Domain(_)));
    let parent = up.split_once('.').map(|(_, p)| p).filter(|p| is_name && p.contains('.'));
    match parent {
        Some(p) if host == p || host.ends_with(&format!(".{p}")) => Ok(Realm::Own),
        _ => Ok(Realm::Foreign),
    }
}

fn host_text(h: &url::Host<&str>) -> String {
    h.to_string().to_ascii_lowercase()
}

/// Loopback, link-local or unspecified: the gateway's own surroundings.
fn internal(h: &url::Host<&str>) -> bool {
    match h {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback() || ip.is_link_local() || ip.is_unspecified(),
        url::Host::Ipv6(ip) => ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80,
    }
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
    fn realms() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let policy = |up: &str, realm: &str| realm_policy(&u(up), &u(realm), &["auth.corp.example".into()]);
        assert_eq!(policy("https://registry-1.docker.io", "https://auth.docker.io/token"), Ok(Realm::Own));
        assert_eq!(
            policy("https://registry.cn-hangzhou.aliyuncs.com", "https://dockerauth.cn-hangzhou.aliyuncs.com/auth"),
            Ok(Realm::Own)
        );
        assert_eq!(policy("https://ghcr.io", "https://ghcr.io/token"), Ok(Realm::Own));
        assert_eq!(policy("https://mirror.example", "https://auth.corp.example/t"), Ok(Realm::Own));
        assert_eq!(policy("http://127.0.0.1:5000", "http://127.0.0.1:6000/token"), Ok(Realm::Own));
        assert_eq!(policy("https://registry-1.docker.io", "https://evil.example/token"), Ok(Realm::Foreign));
        assert_eq!(policy("https://a.com", "https://b.com/token"), Ok(Realm::Foreign), "com is no parent");
        assert!(policy("https://registry-1.docker.io", "http://auth.docker.io/token").is_err(), "no downgrade");
        assert!(policy("https://registry-1.docker.io", "http://127.0.0.1:8080/token").is_err());
        assert!(policy("https://registry-1.docker.io", "https://169.254.169.254/latest").is_err());
        assert!(policy("https://registry-1.docker.io", "https://[::1]/t").is_err());
        assert!(policy("https://registry-1.docker.io", "https://localhost/t").is_err());
        assert!(policy("https://registry-1.docker.io", "file:///etc/passwd").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_challenge_parses_without_panic(h in "\\PC{0,200}") {
            let (scheme, params) = parse_challenge(&h);
            proptest::prop_assert!(!scheme.contains(' '));
            proptest::prop_assert!(params.keys().all(|k| k == &k.to_ascii_lowercase()));
        }

        #[test]
        fn quoted_parameters_round_trip(realm in "https://[a-z]{1,10}\\.example/[a-z/]{0,10}", service in "[a-z.]{1,20}") {
            let (s, p) = parse_challenge(&format!("Bearer realm=\"{realm}\",service=\"{service}\""));
            proptest::prop_assert_eq!(s, "Bearer");
            proptest::prop_assert_eq!(&p["realm"], &realm);
            proptest::prop_assert_eq!(&p["service"], &service);
        }

        #[test]
        fn realm_policy_never_panics(up in "\\PC{0,40}", realm in "\\PC{0,40}") {
            if let (Ok(u), Ok(r)) = (reqwest::Url::parse(&up), reqwest::Url::parse(&realm)) {
                let _ = realm_policy(&u, &r, &[]);
            }
        }
    }
}

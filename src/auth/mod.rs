//! Client credentials and who may do what where.
//!
//! Clients authenticate with HTTP Basic against an htpasswd file of bcrypt entries
//! (`htpasswd -B`), which is what `docker login`, `skopeo --creds`, `podman login` and
//! containerd's hosts.toml all speak. bcrypt is slow on purpose, so a verdict is cached for a
//! short while under a keyed digest of the credentials: a pull of 50 blobs pays one bcrypt, not
//! 50, and the cache never holds anything an attacker could brute-force faster than bcrypt.
//!
//! Authorisation is a small rules table per namespace (`pull` < `push` < `delete`), the shape of
//! Harbor's project roles and Distribution's token actions. It knows nothing of storage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::config::{under, Access, AccessRule, HostedConfig};
use crate::distribution::{ErrorCode, ProtocolError};

mod token;
pub use token::{requested_scopes, Actions, Claims, Grant};

/// The Basic challenge (`hosted.challenge: basic`, and the token endpoint's own).
pub const CHALLENGE: &str = "Basic realm=\"ferry\"";

/// Where Ferry issues bearer tokens (`hosted.challenge: bearer`).
pub const TOKEN_PATH: &str = "/auth/token";

/// The `service` named in Ferry's challenges and tokens.
pub const TOKEN_SERVICE: &str = "ferry";

/// How long an issued token lives. Clients fetch a new one on expiry; a user removed from the
/// htpasswd file keeps access at most this long.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

type HmacSha256 = hmac::Hmac<Sha256>;

/// Failed logins are logged at most once a second, with a count of those left out: a
/// password-guessing flood must not become a log flood.
static FAILED_LOGINS: crate::throttle::Throttle = crate::throttle::Throttle::new(Duration::from_secs(1));

/// bcrypt verifications running at once, at most.
const BCRYPT_CONCURRENCY: usize = 2;

/// How long a bcrypt verdict is trusted. Short: a password changed in the file (after a
/// restart) or a revoked user stops working quickly, while one pull's requests share a verdict.
const VERDICT_TTL: Duration = Duration::from_secs(60);

/// Bound on cached verdicts (memory stays small whatever clients send).
const VERDICT_CAPACITY: u64 = 10_000;

/// Verified for unknown users, so that "no such user" costs the same time as "wrong password"
/// and response times do not reveal which users exist (cost 5, htpasswd's default).
const DUMMY_HASH: &str = "$2y$05$jABAdBGdC7hB5VVSj3Hw8.WN5cyoYs1UxNxZSOGb9Lr3dhqYwWu0a";

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No credentials were sent.
    Anonymous,
    /// A user whose password verified (HTTP Basic): the rules alone decide.
    User(String),
    /// A bearer token Ferry issued: the rules of the user it names, narrowed to its grants.
    Token(Arc<Claims>),
}

impl Identity {
    /// The user name, or `-` for anonymous (for logs).
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "-",
            Identity::User(u) => u,
            Identity::Token(c) => c.user.as_deref().unwrap_or("-"),
        }
    }

    /// Whom the rules see: the token's user, or anonymous.
    fn principal(&self) -> Identity {
        match self {
            Identity::Token(c) => c.user.clone().map_or(Identity::Anonymous, Identity::User),
            other => other.clone(),
        }
    }
}

/// A problem loading the htpasswd file (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("hosted.htpasswd {path}: {err}")]
    Read {
        /// The configured file.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// A line is not `user:bcrypt-hash`.
    #[error("hosted.htpasswd line {line}: {why}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the hash itself).
        why: &'static str,
    },
}

/// Credentials and rules for one server.
pub struct Auth {
    users: HashMap<String, String>,
    rules: Vec<AccessRule>,
    /// Hosted namespaces: scopes for other names are proxied pulls.
    namespaces: Vec<String>,
    anonymous_pull: bool,
    proxied_requires_auth: bool,
    /// `hosted.admins`.
    admins: Vec<String>,
    /// Per-process secret keying the verdict cache (see the module comment).
    key: [u8; 32],
    /// Secret signing bearer tokens: per process (tokens die with it; clients simply fetch new
    /// ones), or the cluster's, shared by every replica.
    token_key: [u8; 32],
    verdicts: moka::future::Cache<[u8; 32], bool>,
    /// bcrypt runs at most this many at once: a flood of wrong passwords (each a fresh cache
    /// miss) queues instead of taking every core from the pulls.
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
}

impl Auth {
    /// Loads the htpasswd file named by `config`; `None` when there is none (nothing is hosted
    /// and proxied namespaces are anonymous).
    pub fn from_config(config: &HostedConfig) -> Result<Option<Auth>, AuthError> {
        let Some(path) = &config.htpasswd else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|err| AuthError::Read { path: path.clone(), err })?;
        Auth::new(&text, config).map(Some)
    }

    /// Builds from htpasswd text.
    pub fn new(htpasswd: &str, config: &HostedConfig) -> Result<Auth, AuthError> {
        let mut users = HashMap::new();
        for (i, line) in htpasswd.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) =
                line.split_once(':').ok_or(AuthError::Parse { line: i + 1, why: "expected user:hash" })?;
            if user.is_empty() {
                return Err(AuthError::Parse { line: i + 1, why: "empty user name" });
            }
            if !["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p)) {
                return Err(AuthError::Parse {
                    line: i + 1,
                    why: "only bcrypt entries are supported (create them with htpasswd -B)",
                });
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let token_key: [u8; 32] =
            Sha256::new().chain_update(key).chain_update(b"ferry bearer tokens").finalize().into();
        Ok(Auth {
            users,
            rules: config.rules.clone(),
            namespaces: config.namespaces.clone(),
            anonymous_pull: config.anonymous_pull,
            proxied_requires_auth: config.proxied_requires_auth,
            admins: config.admins.clone(),
            key,
            token_key,
            bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(BCRYPT_CONCURRENCY)),
            verdicts: moka::future::Cache::builder().max_capacity(VERDICT_CAPACITY).time_to_live(VERDICT_TTL).build(),
        })
    }

    /// Signs bearer tokens with `key` instead of a per-process one: replicas of a cluster,
    /// sharing the key, accept each other's tokens.
    pub fn with_token_key(mut self, key: [u8; 32]) -> Auth {
        self.token_key = key;
        self
    }

    /// Who sent `headers`: anonymous without `Authorization`, a user whose Basic credentials
    /// verify, otherwise `401` (wrong credentials are never downgraded to anonymous).
    pub async fn authenticate(&self, headers: &http::HeaderMap, client: SocketAddr) -> Result<Identity, ProtocolError> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else { return Ok(Identity::Anonymous) };
        if let Some(token) = value.to_str().ok().and_then(bearer) {
            return self.verify_token(token).ok_or_else(|| unauthorized("invalid or expired token"));
        }
        let Some((user, password)) = value.to_str().ok().and_then(parse_basic) else {
            if let Some(suppressed) = FAILED_LOGINS.allow() {
                tracing::warn!(target: "ferry::auth", %client, suppressed, "failed login: malformed Authorization header");
            }
            return Err(unauthorized("malformed credentials: use HTTP Basic authentication"));
        };
        if user.is_empty() && password.is_empty() {
            // containers/image answers a Basic challenge with empty credentials when it has none.
            return Ok(Identity::Anonymous);
        }
        let tag = self.tag(&user, &password);
        let hash = self.users.get(&user).cloned();
        let known = hash.is_some();
        let slots = self.bcrypt_slots.clone();
        let ok = self
            .verdicts
            .get_with(tag, async move {
                // Concurrent requests with the same credentials share this one verification.
                let Ok(_slot) = slots.acquire_owned().await else { return false };
                let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
                let verified = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                    .await
                    .unwrap_or(false);
                verified && known
            })
            .await;
        if ok {
            Ok(Identity::User(user))
        } else {
            // The user name is client input: Debug-format it so it cannot forge log lines.
            if let Some(suppressed) = FAILED_LOGINS.allow() {
                tracing::warn!(target: "ferry::auth", user = ?user, %client, suppressed, "failed login");
            }
            Err(unauthorized("invalid user name or password"))
        }
    }

    /// A bearer token for `who` granting `requested` intersected with what the rules allow
    /// (as Docker Hub's and Distribution's token servers do): hosted names by the rules, other
    /// names a pull when proxied namespaces are open to `who`. Returns the token and its
    /// claims (the response lists what was granted).
    pub fn issue_token(&self, who: &Identity, requested: &[Grant]) -> (String, Claims) {
        let who = who.principal();
        let grants = requested
            .iter()
            .filter_map(|g| {
                let allowed = if self.is_hosted_name(&g.name) {
                    self.rules_access(&who, &g.name)
                } else {
                    self.check_proxied(&who).is_ok().then_some(Access::Pull)
                };
                let actions = g.actions.within(allowed);
                actions.level().map(|_| Grant { name: g.name.clone(), actions })
            })
            .collect();
        let user = match &who {
            Identity::User(u) => Some(u.clone()),
            _ => None,
        };
        let claims = Claims { user, expires: now_secs().saturating_add(TOKEN_TTL.as_secs()), grants };
        (token::encode(&claims, |p| self.token_mac(p)), claims)
    }

    fn is_hosted_name(&self, name: &str) -> bool {
        self.namespaces.iter().any(|ns| under(name, ns))
    }

    fn token_mac(&self, payload: &[u8]) -> Vec<u8> {
        use hmac::{KeyInit, Mac};
        match HmacSha256::new_from_slice(&self.token_key) {
            Ok(mut mac) => {
                mac.update(payload);
                mac.finalize().into_bytes().to_vec()
            }
            // HMAC takes keys of any length; keep an impossible failure harmless.
            Err(_) => Vec::new(),
        }
    }

    /// The claims of a token we issued, if its signature verifies (constant time) and it is
    /// unexpired.
    fn verify_token(&self, token: &str) -> Option<Identity> {
        use hmac::{KeyInit, Mac};
        let verify = |payload: &[u8], sig: &[u8]| {
            let Ok(mut mac) = HmacSha256::new_from_slice(&self.token_key) else { return false };
            mac.update(payload);
            mac.verify_slice(sig).is_ok()
        };
        token::decode(token, now_secs(), verify).map(|c| Identity::Token(Arc::new(c)))
    }

    /// The keyed digest a verdict is cached under.
    fn tag(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// The most `who` may do in hosted repository `repo` (`None`: nothing): for a token, what
    /// its user may do there narrowed to what the token grants.
    pub fn access(&self, who: &Identity, repo: &str) -> Option<Access> {
        match who {
            Identity::Token(claims) => {
                let granted = claims.on(repo)?.level()?;
                self.rules_access(&who.principal(), repo).map(|a| a.min(granted))
            }
            _ => self.rules_access(who, repo),
        }
    }

    fn rules_access(&self, who: &Identity, repo: &str) -> Option<Access> {
        let anonymous = self.anonymous_pull.then_some(Access::Pull);
        let Identity::User(user) = who else { return anonymous };
        if self.rules.is_empty() {
            // No table: every htpasswd user owns every hosted namespace (Distribution's model).
            return Some(Access::Delete);
        }
        // With a table, access comes only from it (Harbor's model: projects are private).
        self.rules
            .iter()
            .filter(|r| under(repo, &r.namespace) && r.users.iter().any(|u| u == "*" || u == user))
            .map(|r| r.access)
            .max()
            .max(anonymous)
    }

    /// `Ok` if `who` may do `need` in `repo`; `401` (with the challenge) for anonymous clients,
    /// `403 DENIED` for users without the right.
    pub fn check(&self, who: &Identity, repo: &str, need: Access) -> Result<(), ProtocolError> {
        if self.access(who, repo).is_some_and(|a| a >= need) {
            return Ok(());
        }
        let verb = match need {
            Access::Pull => "pull from",
            Access::Push => "push to",
            Access::Delete => "delete in",
        };
        let rules_allow = self.rules_access(&who.principal(), repo).is_some_and(|a| a >= need);
        match who.principal() {
            // A token short of the right where the rules would allow it: 401, so the client asks
            // for a token with that scope (Docker and containerd re-authenticate on a 401, never
            // on a 403).
            _ if rules_allow => Err(unauthorized(format!("the token does not grant the right to {verb} {repo}"))),
            Identity::User(u) => {
                Err(ProtocolError::new(ErrorCode::Denied, format!("user {u:?} may not {verb} {repo}")))
            }
            _ => Err(unauthorized(format!("authentication required to {verb} {repo}"))),
        }
    }

    /// `Ok` unless proxied namespaces require credentials and `who` is anonymous (a token
    /// counts as its user).
    pub fn check_proxied(&self, who: &Identity) -> Result<(), ProtocolError> {
        match (self.proxied_requires_auth, who.principal()) {
            (true, Identity::Anonymous) => Err(unauthorized("authentication required")),
            _ => Ok(()),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    /// `Ok` if `who` is one of `hosted.admins`, by password: a bearer token's scope is a
    /// repository's, never the admin endpoints'.
    pub fn check_admin(&self, who: &Identity) -> Result<(), ProtocolError> {
        match who {
            Identity::User(u) if self.admins.iter().any(|a| a == u) => Ok(()),
            Identity::User(u) => {
                Err(ProtocolError::new(ErrorCode::Denied, format!("user {u:?} is not one of hosted.admins")))
            }
            _ => Err(unauthorized("the admin endpoints need the Basic credentials of one of hosted.admins")),
        }
    }
}

/// A `401 UNAUTHORIZED` error (the server adds the `WWW-Authenticate` challenge).
pub fn unauthorized(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::Unauthorized, message)
}

/// The token of a `Bearer <token>` value; the scheme is case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// `Basic base64(user:password)` → `(user, password)`.
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // htpasswd -Bbn alice secret / htpasswd -Bbn bob hunter2 (cost 5).
    const FILE: &str = "alice:$2y$05$rB0A8pwuI5dQP1F6hxDATOfN4HTSaK3V.jz.7l8IUi9wbgeoW9C0i\n\
                        # comment\n\
                        bob:$2y$05$vb0tXRV2pZNleVvDvh.hS.OXdKBX7VEjdID6A9htW76TIlI5cYWH.\n";

    fn config(rules: &str) -> HostedConfig {
        let yaml = format!("hosted:\n  namespaces: [internal, team-a]\n  htpasswd: /x\n  rules: {rules}\n");
        crate::config::Config::from_yaml(&yaml).unwrap().hosted
    }

    fn basic(user: &str, pass: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        h.insert(http::header::AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn htpasswd_parsing() {
        assert!(Auth::new(FILE, &config("[]")).is_ok());
        let e = Auth::new("carol:{SHA}abc\n", &config("[]")).err().unwrap();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(Auth::new("nocolon\n", &config("[]")).is_err());
    }

    #[tokio::test]
    async fn credentials() {
        let auth = Auth::new(FILE, &config("[]")).unwrap();
        let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(auth.authenticate(&http::HeaderMap::new(), client).await.unwrap(), Identity::Anonymous);
        assert_eq!(auth.authenticate(&basic("alice", "secret"), client).await.unwrap(), Identity::User("alice".into()));
        // Cached: same verdict again.
        assert_eq!(auth.authenticate(&basic("alice", "secret"), client).await.unwrap(), Identity::User("alice".into()));
        for (u, p) in [("alice", "wrong"), ("nobody", "secret"), ("bob", "secret"), ("alice", "")] {
            assert_eq!(auth.authenticate(&basic(u, p), client).await.unwrap_err().code, ErrorCode::Unauthorized);
        }
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(auth.authenticate(&h, client).await.unwrap_err().code, ErrorCode::Unauthorized);
    }

    #[test]
    fn rules() {
        let alice = Identity::User("alice".into());
        let bob = Identity::User("bob".into());
        let open = Auth::new(FILE, &config("[]")).unwrap();
        assert_eq!(open.access(&bob, "team-a/x"), Some(Access::Delete));
        assert_eq!(
            open.check(&Identity::Anonymous, "internal/x", Access::Pull).unwrap_err().code,
            ErrorCode::Unauthorized
        );

        let table = Auth::new(
            FILE,
            &config("[{namespace: team-a, users: [alice], access: push}, {namespace: internal, users: ['*'], access: pull}]"),
        )
        .unwrap();
        assert_eq!(table.access(&alice, "team-a/app"), Some(Access::Push));
        assert_eq!(table.access(&bob, "team-a/app"), None);
        assert_eq!(table.access(&bob, "internal/app"), Some(Access::Pull));
        assert_eq!(table.check(&bob, "internal/app", Access::Push).unwrap_err().code, ErrorCode::Denied);
        assert_eq!(table.check(&alice, "team-a/app", Access::Delete).unwrap_err().code, ErrorCode::Denied);
        assert!(table.check(&alice, "team-a/app", Access::Pull).is_ok());
    }

    #[tokio::test]
    async fn tokens_grant_only_their_scope() {
        let auth = Auth::new(FILE, &config("[]")).unwrap();
        let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let alice = Identity::User("alice".into());
        let asked = requested_scopes(Some(
            "scope=repository:team-a/x:pull&scope=repository:internal/y:pull,push,delete&scope=repository:library/alpine:pull",
        ));
        let (token, claims) = auth.issue_token(&alice, &asked);
        assert_eq!(claims.grants.len(), 3);
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, format!("{scheme} {token}").parse().unwrap());
            let who = auth.authenticate(&h, client).await.unwrap();
            assert_eq!(auth.access(&who, "team-a/x"), Some(Access::Pull), "a pull token grants pull only");
            assert_eq!(auth.check(&who, "team-a/x", Access::Push).unwrap_err().code, ErrorCode::Unauthorized);
            assert_eq!(auth.access(&who, "team-a/other"), None, "nor any other repository");
            assert_eq!(auth.access(&who, "internal/y"), Some(Access::Delete));
            assert_eq!(who.name(), "alice");
        }
        // Anonymous tokens grant proxied pulls, never hosted content.
        let (_, anon) = auth.issue_token(&Identity::Anonymous, &asked);
        assert_eq!(anon.grants.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["library/alpine"]);
        // A forged grant does not verify.
        let (payload, sig) = token.split_once('.').unwrap();
        let mut forged = payload.to_owned();
        forged.push('A');
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, format!("Bearer {forged}.{sig}").parse().unwrap());
        assert!(auth.authenticate(&h, client).await.is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_htpasswd_text_loads_or_is_refused_without_panic(text in "\\PC{0,300}") {
            let _ = Auth::new(&text, &config("[]"));
        }

        #[test]
        fn any_authorization_header_is_answered_without_panic(v in "[ -~]{0,120}") {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let auth = Auth::new(FILE, &config("[]")).unwrap();
            let mut h = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.insert(http::header::AUTHORIZATION, v);
            }
            let _ = rt.block_on(auth.authenticate(&h, "127.0.0.1:1".parse().unwrap()));
        }
    }
}

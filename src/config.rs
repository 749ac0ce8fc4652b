//! The YAML configuration: schema, embedded defaults, and validation whose every error names
//! the key path it is about (e.g. `registries.docker.io.upstreams[1].url`).
//!
//! Unknown keys are errors: a typo in an operator's file must not silently fall back to a
//! default. The YAML is parsed by `serde-saphyr` (a maintained, panic-free parser with size
//! budgets; `serde_yaml` is archived) into a generic value first, so that
//! `serde_path_to_error` can report the path of a type error or an unknown key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// A configuration problem, with the key path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted key path (`registries.docker.io.upstreams[0].url`), or the file for I/O errors.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

/// The whole configuration. Every key has a default; `Config::default()` is what
/// `ferry serve` runs on without a file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the registry API listens on.
    pub listen: String,
    /// Where content lives.
    pub storage: StorageConfig,
    /// Metadata tier and freshness.
    pub cache: CacheConfig,
    /// Mirrored registries by canonical name (`docker.io`, `ghcr.io`, ...).
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Registry used when a request names none (Docker's `registry-mirrors`).
    pub default_registry: String,
    /// Logging.
    pub log: LogConfig,
    /// Private namespaces that accept pushes (served, never proxied).
    pub hosted: HostedConfig,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with these PEM files; plain HTTP without.
    pub tls: Option<TlsConfig>,
    /// After SIGTERM/SIGINT, how long in-flight responses may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A second, operations-only listener.
    pub metrics: MetricsConfig,
}

/// `metrics:` — where else `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also serve the operations endpoints (only those) on this address, e.g. to keep them
    /// off the port clients use. They stay on the API port too.
    pub listen: Option<String>,
}

/// `tls:` — the listener's certificate. Both files are re-read on SIGHUP.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        let mut registries = BTreeMap::new();
        registries.insert(
            "docker.io".to_owned(),
            RegistryConfig {
                upstreams: vec![UpstreamConfig {
                    url: "https://registry-1.docker.io".to_owned(),
                    ..UpstreamConfig::default()
                }],
                hedge_delay: None,
            },
        );
        Config {
            listen: "0.0.0.0:5000".to_owned(),
            storage: StorageConfig::default(),
            cache: CacheConfig::default(),
            registries,
            default_registry: "docker.io".to_owned(),
            log: LogConfig::default(),
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            metrics: MetricsConfig::default(),
            hosted: HostedConfig::default(),
        }
    }
}

/// `storage:` — the content-addressed store.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding blobs, manifests and temp files (one filesystem, so renames are atomic).
    pub root: PathBuf,
    /// Upper bound for cached blobs; least-recently-used ones are evicted beyond it. Unbounded
    /// when absent. Pushed (hosted) content is never evicted.
    pub max_size: Option<ByteSize>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { root: PathBuf::from("./ferry-data"), max_size: None }
    }
}

/// `cache:` — the in-memory metadata tier and tag freshness.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a tag→digest answer is trusted before one `HEAD` revalidates it.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How old a tag answer may be and still be served when no upstream answers.
    #[serde(with = "humantime_serde")]
    pub serve_stale: Duration,
    /// Memory for cached manifest bodies (the fast tier; disk keeps the record).
    pub memory: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(300),
            serve_stale: Duration::from_secs(7 * 24 * 3600),
            memory: ByteSize::mib(64),
        }
    }
}

/// One mirrored registry.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Upstreams, tried in this order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Hedging: when the upstream being asked has not answered headers within this delay,
    /// the next one is asked too; the first good answer wins, the others are cancelled.
    /// Absent: strictly one upstream at a time.
    #[serde(with = "humantime_serde")]
    pub hedge_delay: Option<Duration>,
}

/// What an upstream may be asked for, as in containerd's `hosts.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// May serve content by digest.
    Pull,
    /// May say what a tag means (tag → digest).
    Resolve,
}

/// One upstream registry endpoint.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL, `https://` or `http://`, without `/v2`.
    pub url: String,
    /// User for Basic auth or the token endpoint.
    pub username: Option<String>,
    /// Password or access token (never logged; redacted by `check-config`).
    #[serde(serialize_with = "redact")]
    pub password: Option<String>,
    /// File whose first line is the password (keeps secrets out of the config file).
    pub password_file: Option<PathBuf>,
    /// `pull`, `resolve` or both.
    pub capabilities: Vec<Capability>,
    /// TCP + TLS connect limit.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit from sending a request to receiving response headers.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Limit on silence while reading a body (a stalled socket).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Consecutive failures that open the circuit (the upstream is then skipped at no cost).
    pub failure_threshold: u32,
    /// First open period; doubles on each failed probe up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest open period.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Extra PEM CA certificates to trust for this upstream (a private registry's CA).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from this upstream. Dangerous; logged loudly at start-up.
    pub insecure_skip_verify: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            username: None,
            password: None,
            password_file: None,
            capabilities: vec![Capability::Pull, Capability::Resolve],
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            failure_threshold: 2,
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            ca_file: None,
            insecure_skip_verify: false,
        }
    }
}

impl UpstreamConfig {
    /// Whether this upstream may be asked for `cap`.
    pub fn can(&self, cap: Capability) -> bool {
        self.capabilities.contains(&cap)
    }
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `log:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `ferry=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".to_owned(), format: LogFormat::Text }
    }
}

/// `hosted:` — private namespaces where `docker push` works.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostedConfig {
    /// Repository prefixes served as a registry (`internal` covers `internal` and `internal/...`).
    pub namespaces: Vec<String>,
    /// htpasswd file with bcrypt entries (`htpasswd -B`): the users of hosted namespaces.
    pub htpasswd: Option<PathBuf>,
    /// May clients without credentials pull hosted images?
    pub anonymous_pull: bool,
    /// Allow `DELETE` of manifests and blobs (space is reclaimed by `ferry gc`).
    pub delete: bool,
    /// Who may do what where. Empty: every htpasswd user may pull, push and delete everywhere.
    pub rules: Vec<AccessRule>,
    /// Require htpasswd credentials for proxied namespaces too (gateways beyond a trusted network).
    pub proxied_requires_auth: bool,
    /// Upload sessions idle longer than this are purged with their data.
    #[serde(with = "humantime_serde")]
    pub upload_max_age: Duration,
    /// How clients are challenged: `bearer` (default; Ferry's token endpoint, as Docker Hub and
    /// Harbor do, so Docker can still pull proxied images anonymously) or `basic` (plain
    /// Basic auth; Docker clients must then `docker login` even to pull through the mirror).
    pub challenge: ChallengeKind,
    /// The token endpoint's URL as clients reach it (behind a reverse proxy); default: built
    /// from each request's Host and Ferry's scheme.
    pub token_realm: Option<String>,
}

/// How unauthenticated clients are challenged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeKind {
    /// `Bearer realm=<token endpoint>`: anonymous tokens for anonymous clients.
    #[default]
    Bearer,
    /// `Basic realm="ferry"`.
    Basic,
}

impl Default for HostedConfig {
    fn default() -> Self {
        HostedConfig {
            namespaces: Vec::new(),
            htpasswd: None,
            anonymous_pull: false,
            delete: false,
            rules: Vec::new(),
            proxied_requires_auth: false,
            upload_max_age: Duration::from_secs(24 * 3600),
            challenge: ChallengeKind::Bearer,
            token_realm: None,
        }
    }
}

/// What a rule grants, each level including the ones before it (Harbor's guest, developer and
/// maintainer roles; Distribution's `pull`, `push`, `delete` actions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read manifests, blobs, tags, referrers.
    Pull,
    /// Pull, plus upload blobs and put manifests (tags move).
    Push,
    /// Push, plus delete manifests, tags and blobs (when `hosted.delete` is on).
    Delete,
}

/// One row of the rules table: `{namespace: team-a, users: [alice], access: push}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A hosted namespace or a repository path under one (`team-a`, `team-a/app`).
    pub namespace: String,
    /// htpasswd users, or `"*"` for every authenticated user.
    pub users: Vec<String>,
    /// `pull`, `push` or `delete`.
    pub access: Access,
}

impl HostedConfig {
    /// The configured namespace `repo` falls under, if any (matching whole path components).
    pub fn namespace_of(&self, repo: &str) -> Option<&str> {
        self.namespaces.iter().map(String::as_str).find(|ns| under(repo, ns))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, ns) in self.namespaces.iter().enumerate() {
            let at = format!("hosted.namespaces[{i}]");
            if crate::distribution::RepoName::parse(ns).is_err() {
                return Err(ConfigError::new(
                    at,
                    format!("{ns:?} is not a repository path such as internal or team-a"),
                ));
            }
            if self.namespaces[..i].iter().any(|o| under(ns, o) || under(o, ns)) {
                return Err(ConfigError::new(at, format!("{ns:?} overlaps another namespace")));
            }
        }
        if !self.namespaces.is_empty() && self.htpasswd.is_none() {
            return Err(ConfigError::new("hosted.htpasswd", "hosted namespaces need an htpasswd file (htpasswd -B)"));
        }
        if self.proxied_requires_auth && self.htpasswd.is_none() {
            return Err(ConfigError::new("hosted.htpasswd", "proxied_requires_auth needs an htpasswd file"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("hosted.rules[{i}]");
            if self.namespace_of(&rule.namespace).is_none() {
                return Err(ConfigError::new(
                    format!("{at}.namespace"),
                    format!("{:?} is not under any of hosted.namespaces", rule.namespace),
                ));
            }
            if rule.users.is_empty() {
                return Err(ConfigError::new(format!("{at}.users"), "name at least one user, or \"*\""));
            }
        }
        if self.upload_max_age.is_zero() {
            return Err(ConfigError::new("hosted.upload_max_age", "must be more than zero"));
        }
        Ok(())
    }
}

/// Whether repository path `repo` is `prefix` or lies under it, by whole components.
pub fn under(repo: &str, prefix: &str) -> bool {
    repo == prefix || repo.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

impl Config {
    /// Reads, parses and validates a YAML file, applying environment overrides for secrets.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))?;
        let mut config = Config::parse(&text)?;
        config.apply_env(|k| std::env::var(k).ok());
        config.validate()?;
        Ok(config)
    }

    /// Credentials from the environment, so secrets stay out of config files and ConfigMaps:
    /// `FERRY_<REGISTRY>_<N>_USERNAME` and `FERRY_<REGISTRY>_<N>_PASSWORD` for upstream N
    /// (from 0) of a registry, the name upper-cased with every other character as `_`
    /// (`FERRY_DOCKER_IO_0_PASSWORD`).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        for (name, reg) in self.registries.iter_mut() {
            let reg_key: String =
                name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
            for (i, up) in reg.upstreams.iter_mut().enumerate() {
                if let Some(u) = var(&format!("FERRY_{reg_key}_{i}_USERNAME")) {
                    up.username = Some(u);
                }
                if let Some(p) = var(&format!("FERRY_{reg_key}_{i}_PASSWORD")) {
                    up.password = Some(p);
                    up.password_file = None;
                }
            }
        }
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config = Config::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::new("(yaml)", e.to_string()))?;
        let value = match value {
            // An empty file means "all defaults".
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v,
        };
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(if path == "." { "(root)".to_owned() } else { path }, e.into_inner().to_string())
        })?;
        Ok(config)
    }

    /// The listen address, parsed (validated at load).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| {
            ConfigError::new("listen", format!("{:?} is not an address like 0.0.0.0:5000: {e}", self.listen))
        })
    }

    /// The operations-only listen address, if configured (validated at load).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match &self.metrics.listen {
            None => Ok(None),
            Some(l) => l.parse().map(Some).map_err(|e| {
                ConfigError::new("metrics.listen", format!("{l:?} is not an address like 127.0.0.1:9090: {e}"))
            }),
        }
    }

    /// Semantic checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.metrics_addr()?;
        if self.storage.root.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.root", "must not be empty"));
        }
        if self.registries.is_empty() {
            return Err(ConfigError::new("registries", "at least one registry is needed"));
        }
        if !self.registries.contains_key(&self.default_registry) {
            return Err(ConfigError::new(
                "default_registry",
                format!(
                    "{:?} is not one of the configured registries ({})",
                    self.default_registry,
                    self.registries.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for (name, reg) in &self.registries {
            let at = format!("registries.{name}");
            if !valid_registry_host(name) {
                return Err(ConfigError::new(
                    at,
                    "a registry name is a host name with an optional port, such as docker.io or registry.local:5000",
                ));
            }
            if reg.upstreams.is_empty() {
                return Err(ConfigError::new(format!("{at}.upstreams"), "at least one upstream is needed"));
            }
            for (i, up) in reg.upstreams.iter().enumerate() {
                up.validate(&format!("{at}.upstreams[{i}]"))?;
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(ConfigError::new(key, format!("{}: {e}", path.display())));
                }
            }
        }
        self.hosted.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!("{:?} is not a log filter such as info or ferry=debug", self.log.level),
            ));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| ConfigError::new(format!("{at}.url"), format!("{:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::new(format!("{at}.url"), "must be an http:// or https:// URL with a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::new(format!("{at}.url"), "put credentials in username/password, not in the URL"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::new(format!("{at}.url"), "must not have a query or fragment"));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(ConfigError::new(format!("{at}.password_file"), "give password or password_file, not both"));
        }
        if self.username.is_some() != (self.password.is_some() || self.password_file.is_some()) {
            return Err(ConfigError::new(
                format!("{at}.username"),
                "username and password (or password_file) go together",
            ));
        }
        if self.failure_threshold == 0 {
            return Err(ConfigError::new(format!("{at}.failure_threshold"), "must be at least 1"));
        }
        if self.max_backoff < self.backoff {
            return Err(ConfigError::new(format!("{at}.max_backoff"), "must not be less than backoff"));
        }
        if self.capabilities.is_empty() {
            return Err(ConfigError::new(format!("{at}.capabilities"), "give pull, resolve or both"));
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("first_byte_timeout", self.first_byte_timeout),
            ("idle_timeout", self.idle_timeout),
            ("backoff", self.backoff),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(format!("{at}.{key}"), "must be more than zero"));
            }
        }
        Ok(())
    }

    /// The password, from `password` or the first line of `password_file`.
    pub fn resolve_password(&self) -> std::io::Result<Option<String>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        match &self.password_file {
            Some(f) => Ok(Some(std::fs::read_to_string(f)?.lines().next().unwrap_or("").to_owned())),
            None => Ok(None),
        }
    }
}

fn valid_registry_host(name: &str) -> bool {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    let host_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.listen, "0.0.0.0:5000");
        assert_eq!(c.default_registry, "docker.io");
        assert_eq!(c.registries["docker.io"].upstreams[0].url, "https://registry-1.docker.io");
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = Config::from_yaml(
            "registries:\n  docker.io:\n    upstreams:\n      - url: http://a\n      - url: ftp://b\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "registries.docker.io.upstreams[1].url");
        let e = Config::from_yaml("storage:\n  rooot: /x\n").unwrap_err();
        assert!(e.path.starts_with("storage"), "{e}");
        assert!(e.message.contains("rooot"), "{e}");
        let e = Config::from_yaml("cache:\n  tag_ttl: soon\n").unwrap_err();
        assert_eq!(e.path, "cache.tag_ttl");
        let e = Config::from_yaml("default_registry: ghcr.io\n").unwrap_err();
        assert_eq!(e.path, "default_registry");
        let e = Config::from_yaml("listen: nowhere\n").unwrap_err();
        assert_eq!(e.path, "listen");
    }

    #[test]
    fn shipped_config_files_are_valid() {
        for (name, text) in [
            ("config.example.yml", include_str!("../config.example.yml")),
            ("deploy/config.yml", include_str!("../deploy/config.yml")),
        ] {
            if let Err(e) = Config::from_yaml(text) {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let mut c = Config::from_yaml(
            "registries:\n  docker.io:\n    upstreams:\n      - url: http://a\n      - url: http://b\n",
        )
        .unwrap();
        c.apply_env(|k| match k {
            "FERRY_DOCKER_IO_1_USERNAME" => Some("bot".into()),
            "FERRY_DOCKER_IO_1_PASSWORD" => Some("s3cret".into()),
            _ => None,
        });
        let ups = &c.registries["docker.io"].upstreams;
        assert_eq!((ups[0].username.as_deref(), ups[0].password.as_deref()), (None, None));
        assert_eq!((ups[1].username.as_deref(), ups[1].password.as_deref()), (Some("bot"), Some("s3cret")));
        c.validate().unwrap();
    }

    #[test]
    fn hosted_section() {
        let c = Config::from_yaml(
            "hosted:\n  namespaces: [internal, team-a]\n  htpasswd: /x\n  rules: [{namespace: team-a, users: [alice], access: push}]\n",
        )
        .unwrap();
        assert_eq!(c.hosted.namespace_of("team-a/x/y"), Some("team-a"));
        assert_eq!(c.hosted.namespace_of("internal"), Some("internal"));
        assert_eq!(c.hosted.namespace_of("internalx/y"), None);
        assert_eq!(c.hosted.rules[0].access, Access::Push);
        let e = Config::from_yaml("hosted:\n  namespaces: [internal]\n").unwrap_err();
        assert_eq!(e.path, "hosted.htpasswd");
        let e = Config::from_yaml("hosted:\n  namespaces: [a, a/b]\n  htpasswd: /x\n").unwrap_err();
        assert_eq!(e.path, "hosted.namespaces[1]");
        let e = Config::from_yaml("hosted:\n  namespaces: [Bad]\n  htpasswd: /x\n").unwrap_err();
        assert_eq!(e.path, "hosted.namespaces[0]");
        let e = Config::from_yaml(
            "hosted:\n  namespaces: [a]\n  htpasswd: /x\n  rules: [{namespace: b, users: [u], access: pull}]\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "hosted.rules[0].namespace");
        let e = Config::from_yaml("hosted:\n  rules: [{namespace: a, users: [u], access: admin}]\n").unwrap_err();
        assert!(e.path.starts_with("hosted.rules[0]"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::from_yaml(
            "registries:\n  r.io:\n    upstreams:\n      - {url: 'http://a', username: u, password: hunter2}\ndefault_registry: r.io\n",
        )
        .unwrap();
        let out = serde_json::to_string(&c).unwrap();
        assert!(!out.contains("hunter2"));
        assert!(out.contains("<redacted>"));
    }
}

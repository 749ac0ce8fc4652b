//! `registries:` — the mirrored registries and the upstream endpoints each is fetched from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

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
    /// Repositories that may be pulled through this registry (globs on the repository as the
    /// upstream knows it: `library/*`); empty: every repository.
    pub allow: Vec<String>,
    /// Repositories that may not be, whatever `allow` says (`*/cryptominer*`).
    pub deny: Vec<String>,
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
    /// How errors, logs and metric labels name this upstream (default: the URL's host[:port]).
    /// Clients see only this, never the URL.
    pub name: Option<String>,
    /// Token endpoints (hosts) this upstream's credentials may be sent to besides its own host
    /// and parent domain (`registry-1.docker.io` → `auth.docker.io` needs no entry).
    pub token_realms: Vec<String>,
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
            name: None,
            token_realms: Vec::new(),
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

    /// The name errors, logs and metrics use: `name`, or the URL's host[:port].
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match reqwest::Url::parse(&self.url) {
            Ok(u) => match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                _ => self.url.clone(),
            },
            Err(_) => self.url.clone(),
        }
    }

    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if let Some(n) = &self.name {
            let ok = !n.is_empty()
                && n.len() <= 64
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
            if !ok {
                return Err(ConfigError::new(format!("{at}.name"), "1 to 64 of [A-Za-z0-9._:-]"));
            }
        }
        for (i, realm) in self.token_realms.iter().enumerate() {
            if !valid_registry_host(realm) {
                return Err(ConfigError::new(
                    format!("{at}.token_realms[{i}]"),
                    "a host name, such as auth.example.com",
                ));
            }
        }
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

impl RegistryConfig {
    /// `allow` and `deny`, compiled: each glob with its key (`allow[0]`), for the refusal
    /// message. Fails on a malformed glob, naming its key (under `registries.<name>` once
    /// [`Self::validate`] adds the prefix).
    pub fn repository_globs(&self) -> Result<NamedGlobs, ConfigError> {
        let compile = |list: &str, globs: &[String]| -> Result<Vec<(String, glob::Pattern)>, ConfigError> {
            globs
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let key = format!("{list}[{i}]");
                    match glob::Pattern::new(g) {
                        Ok(p) if !g.is_empty() => Ok((format!("{key} = {g}"), p)),
                        Ok(_) => Err(ConfigError::new(key, "must not be empty")),
                        Err(e) => Err(ConfigError::new(key, format!("{g:?} is not a glob: {} at {}", e.msg, e.pos))),
                    }
                })
                .collect()
        };
        Ok(NamedGlobs { allow: compile("allow", &self.allow)?, deny: compile("deny", &self.deny)? })
    }

    /// Checks the registry named `name` (a key of `registries:`) and its upstreams.
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let at = format!("registries.{name}");
        if !valid_registry_host(name) {
            return Err(ConfigError::new(
                at,
                "a registry name is a host name with an optional port, such as docker.io or registry.local:5000",
            ));
        }
        if self.upstreams.is_empty() {
            return Err(ConfigError::new(format!("{at}.upstreams"), "at least one upstream is needed"));
        }
        self.repository_globs().map_err(|e| ConfigError::new(format!("{at}.{}", e.path), e.message))?;
        let mut names = std::collections::BTreeSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            up.validate(&format!("{at}.upstreams[{i}]"))?;
            if !names.insert(up.display_name()) {
                return Err(ConfigError::new(
                    format!("{at}.upstreams[{i}].name"),
                    format!(
                        "{:?} names another upstream of this registry too; give each a distinct name",
                        up.display_name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A registry's `allow` and `deny` globs, each named by its key and pattern.
#[derive(Debug, Default)]
pub struct NamedGlobs {
    /// `allow[i] = pattern` and the compiled glob.
    pub allow: Vec<(String, glob::Pattern)>,
    /// `deny[i] = pattern` and the compiled glob.
    pub deny: Vec<(String, glob::Pattern)>,
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
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
    use super::super::tests::error_at;
    use super::super::Config;

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
    fn secrets_are_redacted() {
        let c = Config::from_yaml(
            "registries:\n  r.io:\n    upstreams:\n      - {url: 'http://a', username: u, password: hunter2}\ndefault_registry: r.io\n",
        )
        .unwrap();
        let out = serde_json::to_string(&c).unwrap();
        assert!(!out.contains("hunter2"));
        assert!(out.contains("<redacted>"));
    }

    #[test]
    fn upstreams_are_named_by_host_unless_named() {
        let c = Config::from_yaml(
            "registries:\n  docker.io:\n    upstreams:\n      - url: https://mirror.example:8443/x\n      - {url: 'https://registry-1.docker.io', name: hub}\n",
        )
        .unwrap();
        let ups = &c.registries["docker.io"].upstreams;
        assert_eq!((ups[0].display_name().as_str(), ups[1].display_name().as_str()), ("mirror.example:8443", "hub"));
        let e = error_at("registries:\n  docker.io:\n    upstreams:\n      - url: http://a\n      - url: https://a\n");
        assert_eq!(e.path, "registries.docker.io.upstreams[1].name");
        let e = error_at("registries:\n  docker.io:\n    upstreams:\n      - {url: 'http://a', name: 'a b'}\n");
        assert_eq!(e.path, "registries.docker.io.upstreams[0].name");
    }

    #[test]
    fn upstream_errors_name_the_key_path() {
        let e = error_at("registries:\n  docker.io:\n    upstreams:\n      - url: http://a\n      - url: ftp://b\n");
        assert_eq!(e.path, "registries.docker.io.upstreams[1].url");
    }
}

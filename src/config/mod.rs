//! The YAML configuration: schema, embedded defaults, and validation whose every error names
//! the key path it is about (e.g. `registries.docker.io.upstreams[1].url`).
//!
//! Unknown keys are errors: a typo in an operator's file must not silently fall back to a
//! default. The YAML is parsed by `serde-saphyr` (a maintained, panic-free parser with size
//! budgets; `serde_yaml` is archived) into a generic value first, so that
//! `serde_path_to_error` can report the path of a type error or an unknown key.
//!
//! One file per section; every type is re-exported here, so users name `crate::config::X`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cache;
mod cluster;
mod hosted;
mod limits;
mod log;
mod storage;
mod upstream;

pub use cache::{CacheConfig, TagPolicy};
pub use cluster::ClusterConfig;
pub use hosted::{under, Access, AccessRule, ChallengeKind, HostedConfig};
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use storage::{S3Config, StorageConfig};
pub use upstream::{Capability, NamedGlobs, RegistryConfig, UpstreamConfig};

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
    /// What clients may hold: connections, idle time, buffered bytes, blob size, uploads.
    pub limits: LimitsConfig,
    /// Replicas sharing one bucket and one Redis; absent: a single replica.
    pub cluster: Option<ClusterConfig>,
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
                ..RegistryConfig::default()
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
            limits: LimitsConfig::default(),
            cluster: None,
        }
    }
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
    /// (`FERRY_DOCKER_IO_0_PASSWORD`). And `FERRY_CLUSTER_ADVERTISE` replaces
    /// `cluster.advertise` (a pod's own address, from the downward API), validated like it.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let (Some(cluster), Some(advertise)) = (self.cluster.as_mut(), var("FERRY_CLUSTER_ADVERTISE")) {
            cluster.advertise = advertise;
        }
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
        self.storage.validate()?;
        self.cache.validate()?;
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
            reg.validate(name)?;
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(ConfigError::new(key, format!("{}: {e}", path.display())));
                }
            }
        }
        self.hosted.validate()?;
        self.limits.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate(self.storage.s3.is_some())?;
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!("{:?} is not a log filter such as info or ferry=debug", self.log.level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The error `yaml` is rejected with (it must be rejected).
    pub(crate) fn error_at(yaml: &str) -> ConfigError {
        match Config::from_yaml(yaml) {
            Ok(_) => panic!("accepted: {yaml}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.listen, "0.0.0.0:5000");
        assert_eq!(c.default_registry, "docker.io");
        assert_eq!(c.registries["docker.io"].upstreams[0].url, "https://registry-1.docker.io");
    }

    #[test]
    fn errors_name_the_key_path() {
        let e = error_at("storage:\n  rooot: /x\n");
        assert!(e.path.starts_with("storage"), "{e}");
        assert!(e.message.contains("rooot"), "{e}");
        assert_eq!(error_at("cache:\n  tag_ttl: soon\n").path, "cache.tag_ttl");
        assert_eq!(error_at("default_registry: ghcr.io\n").path, "default_registry");
        assert_eq!(error_at("listen: nowhere\n").path, "listen");
    }

    #[test]
    fn a_bucket_config_is_checked_before_start() {
        let s3 = |extra: &str| format!("storage:\n  s3:\n    bucket: ferry\n{extra}");
        let ok = Config::from_yaml(&s3("    prefix: \"mirror/x/\"\n    path_style: true\n")).unwrap();
        let bucket = ok.storage.s3.as_ref().unwrap();
        assert_eq!((bucket.region.as_str(), bucket.upload_concurrency), ("us-east-1", 8), "defaults");
        assert_eq!(error_at(&s3("    prefix: mirror\n")).path, "storage.s3.prefix");
        assert_eq!(error_at(&s3("    prefix: \"a/../\"\n")).path, "storage.s3.prefix");
        assert_eq!(error_at(&s3("    prefix: \"/abs/\"\n")).path, "storage.s3.prefix");
        assert_eq!(error_at(&s3("    endpoint: \"ftp://x\"\n")).path, "storage.s3.endpoint");
        assert_eq!(error_at(&s3("    access_key_id: AKIA\n")).path, "storage.s3.access_key_id");
        let missing = s3("    access_key_id: AKIA\n    secret_access_key_file: /nonexistent/ferry-s3\n");
        assert_eq!(error_at(&missing).path, "storage.s3.secret_access_key_file");
        assert_eq!(error_at(&s3("    upload_part_size: 1MiB\n")).path, "storage.s3.upload_part_size");
        assert_eq!(error_at(&s3("    redirect_expiry: 30d\n")).path, "storage.s3.redirect_expiry");
        assert_eq!(error_at("storage:\n  hot_tier: 1GiB\n").path, "storage.hot_tier", "a hot tier needs a bucket");
    }

    #[test]
    fn shipped_config_files_are_valid() {
        for (name, text) in [
            ("config.example.yml", include_str!("../../config.example.yml")),
            ("deploy/config.yml", include_str!("../../deploy/config.yml")),
        ] {
            if let Err(e) = Config::from_yaml(text) {
                panic!("{name}: {e}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_config_text_loads_or_names_what_is_wrong(text in "\\PC{0,400}") {
            if let Err(e) = Config::from_yaml(&text) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn config_shaped_text_never_panics(
            key in "(listen|storage|cache|registries|limits|hosted|log)",
            sub in "[a-z_]{1,20}",
            value in "[ -~]{0,30}",
        ) {
            let _ = Config::from_yaml(&format!("{key}:\n  {sub}: {value}\n"));
        }
    }
}

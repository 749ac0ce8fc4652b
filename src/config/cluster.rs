//! `cluster:` — replicas that act as one mirror: one Redis for leases and shared state, one
//! bucket (`storage.s3`) for content, and a shared secret between the replicas.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Fewest bytes a cluster secret may have: it signs tokens and replica-to-replica requests.
pub const MIN_SECRET_BYTES: usize = 16;

/// `cluster:` — absent: a single replica, everything in process.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port/db` (its password is redacted by `check-config`).
    #[serde(serialize_with = "redact_password")]
    pub redis: String,
    /// How the other replicas reach this one (`http://10.0.0.5:5000`).
    pub advertise: String,
    /// The same file on every replica: signs Ferry's bearer tokens and replica-to-replica
    /// requests. At least 16 bytes (`head -c 32 /dev/urandom | base64`).
    pub secret_file: PathBuf,
    /// How long a fetch lease outlives its owner's last renewal: a replica that dies mid-fetch
    /// is taken over after at most this long.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Longest wait for one Redis command (or connection); past it the replica works alone
    /// until Redis answers again.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub redis_timeout: Duration,
}

/// The URL with its password (if any) replaced, or a placeholder when it does not parse.
fn redact_password<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    match url::Url::parse(v) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            s.serialize_str(u.as_str())
        }
        Ok(u) => s.serialize_str(u.as_str()),
        Err(_) => s.serialize_str("<redacted>"),
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_redis_timeout() -> Duration {
    Duration::from_secs(1)
}

impl ClusterConfig {
    /// Checks the URLs, the lease and the secret file (it must exist and be long enough).
    pub(super) fn validate(&self, on_bucket: bool) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError::new(format!("cluster.{key}"), why));
        if !on_bucket {
            return bad("redis", "replicas must share one bucket: set storage.s3".into());
        }
        match url::Url::parse(&self.redis) {
            Ok(u) if matches!(u.scheme(), "redis" | "redis+unix" | "unix") => {}
            // Never echo the URL: it may carry the Redis password.
            _ => return bad("redis", "is not a redis:// URL".into()),
        }
        match url::Url::parse(&self.advertise) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.path() == "/" => {}
            _ => {
                return bad(
                    "advertise",
                    format!("{:?} is not an http(s) URL like http://10.0.0.5:5000", self.advertise),
                )
            }
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(600) {
            return bad("lease_ttl", "must be between 1s and 10m".into());
        }
        if self.redis_timeout < Duration::from_millis(10) || self.redis_timeout > Duration::from_secs(60) {
            return bad("redis_timeout", "must be between 10ms and 1m".into());
        }
        match std::fs::read(&self.secret_file) {
            Ok(s) if s.trim_ascii().len() >= MIN_SECRET_BYTES => Ok(()),
            Ok(_) => bad("secret_file", format!("must hold at least {MIN_SECRET_BYTES} bytes")),
            Err(e) => bad("secret_file", format!("{}: {e}", self.secret_file.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::error_at;
    use super::super::Config;

    /// A config with a bucket and a cluster section whose secret file holds `secret`, plus
    /// `extra` lines under `cluster:`.
    fn yaml(secret: &str, extra: &str) -> (String, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), secret).unwrap();
        let text = format!(
            "storage:\n  s3:\n    bucket: ferry\ncluster:\n  redis: \"redis://:hunter2@127.0.0.1:6379/0\"\n  \
             advertise: \"http://10.0.0.5:5000\"\n  secret_file: {:?}\n{extra}",
            file.path()
        );
        (text, file)
    }

    #[test]
    fn a_cluster_needs_a_bucket_a_redis_url_and_a_long_enough_secret() {
        let secret = "a secret of more than sixteen bytes";
        let (ok, _f) = yaml(secret, "");
        let config = Config::from_yaml(&ok).unwrap();
        let shown = serde_json::to_string(&config).unwrap();
        assert!(shown.contains("redis://:redacted@127.0.0.1:6379/0") && !shown.contains("hunter2"), "{shown}");
        let c = config.cluster.unwrap();
        assert_eq!((c.lease_ttl.as_secs(), c.redis_timeout.as_millis()), (10, 1000), "defaults");

        let (alone, _f) = yaml(secret, "");
        let no_bucket = alone.replace("storage:\n  s3:\n    bucket: ferry\n", "");
        assert_eq!(error_at(&no_bucket).path, "cluster.redis", "replicas share a bucket");
        let (short, _f) = yaml("too short", "");
        assert_eq!(error_at(&short).path, "cluster.secret_file");
        let (ttl, _f) = yaml(secret, "  lease_ttl: 100ms\n");
        assert_eq!(error_at(&ttl).path, "cluster.lease_ttl");
        let (advertise, _f) = yaml(secret, "");
        let advertise = advertise.replace("http://10.0.0.5:5000", "10.0.0.5:5000/x");
        assert_eq!(error_at(&advertise).path, "cluster.advertise");

        let (env, _f) = yaml(secret, "");
        let mut from_env = Config::parse(&env).unwrap();
        from_env.apply_env(|k| (k == "FERRY_CLUSTER_ADVERTISE").then(|| "http://10.1.2.3:5000".to_owned()));
        from_env.validate().unwrap();
        assert_eq!(from_env.cluster.unwrap().advertise, "http://10.1.2.3:5000", "the pod's address wins");
        let mut bad_env = Config::parse(&env).unwrap();
        bad_env.apply_env(|k| (k == "FERRY_CLUSTER_ADVERTISE").then(|| "10.1.2.3".to_owned()));
        assert_eq!(bad_env.validate().unwrap_err().path, "cluster.advertise", "validated like the key");

        let (bad_url, _f) = yaml(secret, "");
        let e = error_at(&bad_url.replace("redis://", "http://"));
        assert_eq!(e.path, "cluster.redis");
        assert!(!e.to_string().contains("hunter2"), "the Redis password is never echoed: {e}");
    }
}

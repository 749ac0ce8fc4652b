//! `storage:` — where content lives: a directory or an S3-compatible bucket.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `storage:` — the content-addressed store.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding blobs, manifests and temp files (one filesystem, so renames are atomic).
    pub root: PathBuf,
    /// Upper bound for cached blobs; least-recently-used ones are evicted beyond it. Unbounded
    /// when absent. Pushed (hosted) content is never evicted.
    pub max_size: Option<ByteSize>,
    /// Serve cached blobs from a memory map of the file (one copy less per byte). Has no
    /// effect with `tls` (TLS encrypts in user space, where a map adds nothing and an outside
    /// truncation of a blob file would fault); turn it off on network filesystems.
    pub mmap_hits: bool,
    /// Blobs and records on S3-compatible object storage (absent: everything under `root`).
    /// `root` then holds only staging files (and the hot tier).
    pub s3: Option<S3Config>,
    /// With `s3`: the size of a local copy of recently used blobs under `root`, so hot blobs
    /// are served from disk instead of the bucket. Absent: every hit reads the bucket.
    pub hot_tier: Option<ByteSize>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { root: PathBuf::from("./ferry-data"), max_size: None, mmap_hits: true, s3: None, hot_tier: None }
    }
}

impl StorageConfig {
    /// Checks that types alone cannot express (the S3 secret file is read at start-up).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.root.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.root", "must not be empty"));
        }
        match &self.s3 {
            Some(s3) => s3.validate(),
            None if self.hot_tier.is_some() => {
                Err(ConfigError::new("storage.hot_tier", "only applies with storage.s3 (root is the store itself)"))
            }
            None => Ok(()),
        }
    }
}

/// `storage.s3:` — an S3-compatible bucket (AWS S3, Aliyun OSS, Tencent COS, Ceph RGW, MinIO…).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket; it must exist.
    pub bucket: String,
    /// Any S3-compatible URL (`http://127.0.0.1:9000`). Absent: AWS for `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The bucket's region (most self-hosted servers accept any).
    #[serde(default = "default_region")]
    pub region: String,
    /// Every key lives under it (empty, or ending in `/`), so several Ferrys can share a bucket.
    #[serde(default)]
    pub prefix: String,
    /// `endpoint/bucket/key` URLs instead of `bucket.endpoint/key` (most self-hosted servers).
    #[serde(default)]
    pub path_style: bool,
    /// Access key; absent: the standard `AWS_*` environment (or instance metadata).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// File holding the secret key (read at start-up; never logged).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Answer cached blob GETs with a 307 to a presigned URL: the bytes leave the bucket
    /// directly, not through Ferry.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned URL stays valid.
    #[serde(default = "default_redirect_expiry", with = "humantime_serde")]
    pub redirect_expiry: Duration,
    /// Size of each multipart upload part (S3 needs at least 5 MiB).
    #[serde(default = "default_part_size")]
    pub upload_part_size: ByteSize,
    /// Parts uploaded at once, every blob together: uploads hold at most `upload_part_size`
    /// times this in memory.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// Retries of a failed bucket request (5xx, throttling, a lost connection) before the
    /// operation fails; a failed read then falls back to the upstreams.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Most time spent retrying one request.
    #[serde(default = "default_retry_timeout", with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// Time to connect to the bucket's endpoint.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence while reading an answer. There is no overall deadline: a hit streams a
    /// large blob to a slow client for as long as it keeps reading.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_retries() -> usize {
    3
}

fn default_retry_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_redirect_expiry() -> Duration {
    Duration::from_secs(20 * 60)
}

fn default_part_size() -> ByteSize {
    ByteSize::mib(8)
}

fn default_upload_concurrency() -> usize {
    8
}

impl S3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError::new(format!("storage.s3.{key}"), why));
        if self.bucket.is_empty() || self.bucket.contains('/') {
            return bad("bucket", format!("{:?} is not a bucket name", self.bucket));
        }
        if let Some(endpoint) = &self.endpoint {
            match url::Url::parse(endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad("endpoint", format!("{endpoint:?} is not an http(s) URL")),
            }
        }
        let p = &self.prefix;
        if !p.is_empty()
            && (!p.ends_with('/')
                || p.starts_with('/')
                || p[..p.len() - 1].split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        {
            return bad("prefix", format!("{p:?} must be empty or path components ending in / (like \"mirror/\")"));
        }
        if self.access_key_id.is_some() != self.secret_access_key_file.is_some() {
            return bad("access_key_id", "access_key_id and secret_access_key_file go together".to_owned());
        }
        if let Some(path) = &self.secret_access_key_file {
            if let Err(e) = std::fs::metadata(path) {
                return bad("secret_access_key_file", format!("{}: {e}", path.display()));
            }
        }
        let part = self.upload_part_size.as_u64();
        if !(5 << 20..=512 << 20).contains(&part) {
            return bad("upload_part_size", "must be between 5MiB (S3's minimum) and 512MiB".to_owned());
        }
        if !(1..=256).contains(&self.upload_concurrency) {
            return bad("upload_concurrency", "must be between 1 and 256".to_owned());
        }
        for (key, t) in [("connect_timeout", self.connect_timeout), ("read_timeout", self.read_timeout)] {
            if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
                return bad(key, "must be between 100ms and 1h".to_owned());
            }
        }
        if self.max_retries > 20 || self.retry_timeout > Duration::from_secs(600) {
            return bad("max_retries", "at most 20 retries and a retry_timeout of at most 10m".to_owned());
        }
        if self.redirect_expiry < Duration::from_secs(60) || self.redirect_expiry > Duration::from_secs(7 * 24 * 3600) {
            return bad("redirect_expiry", "must be between 1m and 7d (S3's limit for presigned URLs)".to_owned());
        }
        Ok(())
    }
}

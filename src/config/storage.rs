//! `storage:` and `cache:` — where content lives and how long what it says is trusted.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

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
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { root: PathBuf::from("./ferry-data"), max_size: None, mmap_hits: true }
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

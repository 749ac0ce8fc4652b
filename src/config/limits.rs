//! `limits:` — what one client, or all of them together, may hold. Each bound closes a way an
//! anonymous client or a user with push rights could exhaust the gateway (see README
//! "Security"); the defaults are sized for a gateway with `LimitNOFILE=65536` and a few GiB of
//! memory.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `limits:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections served at once; beyond it `accept` waits (no spin, no log storm).
    pub max_connections: usize,
    /// A connection with no request in flight this long is closed, whether it sent bytes or not.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A response frame the client has not read for this long closes its connection (an
    /// HTTP/2 stream with a zero window, a socket nobody reads). A client slower than
    /// 1 MiB per this interval counts as stalled.
    #[serde(with = "humantime_serde")]
    pub send_stall_timeout: Duration,
    /// Response bytes handed to connections and not yet taken by their clients, in total.
    pub max_buffered: ByteSize,
    /// Largest blob fetched from an upstream (a body that goes on past it is cut off and
    /// the upstream counted as faulty); also bounded by the declared size when known.
    pub max_blob_size: ByteSize,
    /// Upload sessions one user may have open at once.
    pub max_upload_sessions_per_user: usize,
    /// Received bytes one blob fetch keeps in memory for the clients reading it, so that they
    /// send the frames the fetch received instead of reading them back from disk. A client
    /// further behind reads the staging file; nothing waits for it.
    pub fetch_ring: ByteSize,
    /// What all blob fetches keep in memory for their readers together (`fetch_ring` each, at
    /// most). Bytes not yet on disk are kept regardless: at most 4 MiB per fetch.
    pub fetch_ring_total: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            client_idle_timeout: Duration::from_secs(60),
            send_stall_timeout: Duration::from_secs(120),
            max_buffered: ByteSize::mib(256),
            max_blob_size: ByteSize::gib(64),
            max_upload_sessions_per_user: 64,
            fetch_ring: ByteSize::mib(8),
            fetch_ring_total: ByteSize::mib(256),
        }
    }
}

impl LimitsConfig {
    /// Every bound must allow something.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = |key: &str| Err(ConfigError::new(format!("limits.{key}"), "must be greater than zero"));
        match self {
            l if l.max_connections == 0 => zero("max_connections"),
            l if l.client_idle_timeout.is_zero() => zero("client_idle_timeout"),
            l if l.send_stall_timeout.is_zero() => zero("send_stall_timeout"),
            l if l.max_buffered.as_u64() < 2 * 1024 * 1024 => {
                Err(ConfigError::new("limits.max_buffered", "must be at least 2MiB (two read chunks)"))
            }
            l if l.max_blob_size.as_u64() == 0 => zero("max_blob_size"),
            l if l.max_upload_sessions_per_user == 0 => zero("max_upload_sessions_per_user"),
            l if l.fetch_ring_total < l.fetch_ring => {
                Err(ConfigError::new("limits.fetch_ring_total", "must be at least limits.fetch_ring"))
            }
            _ => Ok(()),
        }
    }
}

//! Replicas that act as one mirror (`cluster:`): Redis holds who is fetching what, so N replicas
//! behind a balancer make one upstream fetch per blob and one upstream request per tag per TTL;
//! the shared secret lets one replica's bearer tokens open the same doors on every other, and
//! signs the replica-to-replica requests that stream a fetch in progress from its owner.
//!
//! * [`lease`]: the fetch and flight leases (set-if-absent with expiry, renewed while the work
//!   runs, released when it ends).
//! * [`peer`]: signing and checking replica-to-replica requests, and asking an owner for the
//!   bytes of its fetch.
//! * [`lru`]: the one recency order of cached blobs and the eviction lease, for a size cap
//!   that holds for the whole bucket.
//! * [`invalidate`]: invalidations (forgotten tags) that reach every replica at once.
//! * [`uploads`]: upload sessions shared by the replicas (the record in Redis; the chunks are
//!   in the bucket, see `hosted::shared_uploads`).
//!
//! Redis is an accelerator, never a dependency: when it does not answer within
//! `cluster.redis_timeout`, the replica works alone (local coalescing only), counts it, says
//! so once in the log and in `ferry_cluster_degraded`, and rejoins by itself when Redis answers
//! a probe again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest as _, Sha256};

use crate::config::ClusterConfig;
use crate::metrics::Metrics;

pub mod invalidate;
pub mod lease;
pub mod lru;
pub mod peer;
pub mod uploads;

pub use lease::{Claim, Lease};

/// How often a replica that lost Redis asks whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A start-up failure of the cluster section.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The secret file could not be read.
    #[error("cluster.secret_file: {0}")]
    Secret(std::io::Error),
    /// The Redis URL or client could not be set up (the URL is never shown: it may hold a
    /// password).
    #[error("cluster.redis: {0}")]
    Redis(String),
}

/// This replica's membership in a cluster.
pub struct Cluster {
    redis: ConnectionManager,
    /// For the subscription to invalidations (a connection of its own).
    client: redis::Client,
    /// How the other replicas reach this one.
    advertise: String,
    /// This process's nonce: its leases hold `<nonce>.<claim> <advertise>`, so a restarted
    /// replica is someone else.
    me: String,
    /// The leases this process holds, shared by its claims (see [`lease::Lease`]).
    held: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<lease::Held>>>,
    /// Claims run one at a time in this process (see [`Cluster::claim`]).
    claiming: tokio::sync::Mutex<()>,
    /// Numbers this process's claims.
    claims: std::sync::atomic::AtomicU64,
    /// Keys derived from the shared secret, one per use.
    token_key: [u8; 32],
    peer_key: [u8; 32],
    lease_ttl: Duration,
    timeout: Duration,
    /// Redis did not answer the last command: skip it until a probe succeeds.
    degraded: AtomicBool,
    metrics: Arc<Metrics>,
    peers: reqwest::Client,
}

impl Cluster {
    /// Joins the cluster `config` describes. Redis is connected lazily: a replica starts (and
    /// serves, alone) while Redis is down. Must run inside a Tokio runtime (the probe task).
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Arc<Cluster>, ClusterError> {
        let raw = std::fs::read(&config.secret_file).map_err(ClusterError::Secret)?;
        let secret = raw.trim_ascii();
        let derive =
            |purpose: &[u8]| -> [u8; 32] { Sha256::new().chain_update(secret).chain_update(purpose).finalize().into() };
        let client =
            redis::Client::open(config.redis.as_str()).map_err(|e| ClusterError::Redis(format!("{:?}", e.kind())))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.redis_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            // Reconnecting is the probe's job: a command never waits for retries.
            .set_number_of_retries(0);
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| ClusterError::Redis(format!("{:?}", e.kind())))?;
        let peers = peer::client(config.lease_ttl).map_err(|e| ClusterError::Redis(e.to_string()))?;
        let advertise = config.advertise.trim_end_matches('/').to_owned();
        let cluster = Arc::new(Cluster {
            redis,
            client,
            me: uuid::Uuid::new_v4().simple().to_string(),
            held: Default::default(),
            claiming: tokio::sync::Mutex::new(()),
            claims: Default::default(),
            advertise,
            token_key: derive(b"ferry bearer tokens"),
            peer_key: derive(b"ferry replica requests"),
            lease_ttl: config.lease_ttl,
            timeout: config.redis_timeout,
            degraded: AtomicBool::new(false),
            metrics,
            peers,
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(cluster) = weak.upgrade() else { return };
                if cluster.is_degraded() {
                    cluster.probe().await;
                }
            }
        });
        Ok(cluster)
    }

    /// The key Ferry's bearer tokens are signed with: the same on every replica.
    pub fn token_key(&self) -> [u8; 32] {
        self.token_key
    }

    /// How the other replicas reach this one.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Whether Redis is unreachable right now (the replica works alone).
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Runs one Redis command, bounded by `redis_timeout`; `None` when Redis cannot answer
    /// (counted, and the replica works alone until a probe succeeds).
    async fn command<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.is_degraded() {
            return None;
        }
        match tokio::time::timeout(self.timeout, f(self.redis.clone())).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.lost(&e.to_string());
                None
            }
            Err(_) => {
                self.lost("no answer within cluster.redis_timeout");
                None
            }
        }
    }

    fn lost(&self, why: &str) {
        self.metrics.cluster_redis_errors.inc();
        if !self.degraded.swap(true, Ordering::Relaxed) {
            self.metrics.cluster_degraded.set(1);
            tracing::warn!(error = why, "Redis does not answer: this replica works alone until it does");
        }
    }

    /// Asks Redis whether it is back; rejoins if so.
    async fn probe(&self) {
        let mut conn = self.redis.clone();
        let ping = redis::cmd("PING");
        if let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut conn)).await {
            self.degraded.store(false, Ordering::Relaxed);
            self.metrics.cluster_degraded.set(0);
            tracing::info!("Redis answers again: this replica rejoined the cluster");
        }
    }
}

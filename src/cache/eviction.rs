//! Keeps cached blobs under `storage.max_size` by evicting the least recently used.
//!
//! Why the `lru` crate and not moka's weigher: moka's admission policy (W-TinyLFU) may refuse a
//! freshly inserted entry, which here would mean deleting the blob a client just pulled; and its
//! `u32` weights need unit tricks above 4 GiB. A plain recency list with exact byte accounting
//! around it says precisely what is on disk and evicts strictly oldest-first.
//!
//! The inventory is rebuilt at start-up by a background scan (oldest modification first), so a
//! store with 100,000 blobs does not delay the listener. Removing a file that a client is
//! reading does not cut the client off: the open descriptor keeps the bytes alive.
//!
//! On a replica of a cluster the cap holds for the bucket: the order and the total are
//! Redis's ([`crate::cluster::lru`]), one replica at a time evicts, and touches are sent in a
//! batch each second. The local order is kept as well: with Redis unreachable the replica
//! evicts by its own view, as a single one does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lru::LruCache;

use crate::cluster::{lru::EVICT_KEY, Claim, Cluster};
use crate::distribution::Digest;
use crate::metrics::Metrics;
use crate::storage::Storage;

struct Inventory {
    lru: LruCache<Digest, u64>,
    total: u64,
    /// Bytes staged by fetches in progress: they count against the bound too, so a fetch
    /// (or a hostile endless body) cannot fill the disk past `max_size` before its verdict.
    staging: u64,
}

/// The byte-bounded recency list of cached blobs.
pub struct Evictor {
    max: Option<u64>,
    inventory: Mutex<Inventory>,
    storage: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    /// The cluster whose bucket the cap is for, if any (and only with a cap).
    cluster: Option<Arc<Cluster>>,
    /// Blobs used since the last batch of touches sent to the cluster (bounded).
    touched: Mutex<HashSet<Digest>>,
    /// The cluster's total as last read (at most a second old): most checks need no Redis.
    cluster_total: AtomicU64,
}

/// Most touches held for the next batch; more in one second are dropped (the blob was used
/// very recently by then anyway, or is touched again).
const MAX_TOUCHED: usize = 65_536;

/// How often touches go to the cluster and its total is read back.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

impl Evictor {
    /// An evictor for `storage` bounded by `max` bytes (unbounded: only accounting), for the
    /// whole of `cluster`'s bucket when there is one. Must run inside a Tokio runtime when it
    /// has a cluster (the task that sends touches).
    pub fn new(
        max: Option<u64>,
        storage: Arc<dyn Storage>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Evictor> {
        let evictor = Arc::new(Evictor {
            max,
            inventory: Mutex::new(Inventory { lru: LruCache::unbounded(), total: 0, staging: 0 }),
            storage,
            metrics,
            cluster: cluster.filter(|_| max.is_some()),
            touched: Mutex::new(HashSet::new()),
            cluster_total: AtomicU64::new(0),
        });
        if evictor.cluster.is_some() {
            tokio::spawn(send_touches_forever(Arc::downgrade(&evictor)));
        }
        evictor
    }

    /// Loads the blobs already on disk (call once, in the background, at start-up).
    pub async fn scan(&self) {
        let blobs = match self.storage.list_blobs().await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot list cached blobs; eviction starts from an empty inventory");
                return;
            }
        };
        // Pushed (hosted) content is not cache: it is neither counted nor ever evicted.
        let hosted = match crate::storage::marks::hosted_digests(&*self.storage).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot list hosted content; blobs already on disk are not counted against max_size until restart");
                return;
            }
        };
        let mut blobs: Vec<_> = blobs.into_iter().filter(|b| !hosted.contains(b.digest.hex())).collect();
        // Newest first: each one is pushed to the least-recent end, so the oldest ends up
        // evicted first. Blobs committed while the scan ran are already listed (as the most
        // recent) and are left where they are.
        blobs.sort_by_key(|b| std::cmp::Reverse(b.modified));
        let count = blobs.len();
        let for_cluster: Vec<_> = match self.cluster {
            Some(_) => blobs.iter().map(|b| (b.digest.clone(), b.size, epoch_millis(b.modified))).collect(),
            None => Vec::new(),
        };
        if let Ok(mut inv) = self.inventory.lock() {
            for b in blobs {
                if !inv.lru.contains(&b.digest) {
                    inv.lru.push(b.digest.clone(), b.size);
                    inv.lru.demote(&b.digest);
                    inv.total += b.size;
                }
            }
            self.publish(&inv);
        }
        tracing::info!(blobs = count, "cache inventory loaded");
        if let Some(cluster) = &self.cluster {
            // Every replica adds what it found; what the order holds already keeps its place.
            if let Some(total) = cluster.lru_add(&for_cluster).await {
                self.cluster_total.store(total, Ordering::Relaxed);
            }
        }
        self.enforce().await;
    }

    /// Marks a blob as just used.
    pub fn touch(&self, digest: &Digest) {
        if let Ok(mut inv) = self.inventory.lock() {
            inv.lru.promote(digest);
        }
        if self.cluster.is_some() {
            if let Ok(mut touched) = self.touched.lock() {
                if touched.len() < MAX_TOUCHED {
                    touched.insert(digest.clone());
                }
            }
        }
    }

    /// Records a newly committed blob and evicts what no longer fits.
    pub async fn added(&self, digest: &Digest, size: u64) {
        if let Ok(mut inv) = self.inventory.lock() {
            if inv.lru.put(digest.clone(), size).is_none() {
                inv.total += size;
            }
            self.publish(&inv);
        }
        if let Some(cluster) = &self.cluster {
            let now = crate::cluster::lru::now_millis();
            if let Some(total) = cluster.lru_add(&[(digest.clone(), size, now)]).await {
                self.cluster_total.store(total, Ordering::Relaxed);
            }
        }
        self.enforce().await;
    }

    /// A fetch in progress staged `len` more bytes: makes room for them.
    pub async fn staging(&self, len: u64) {
        if let Ok(mut inv) = self.inventory.lock() {
            inv.staging += len;
        }
        self.enforce().await;
    }

    /// A fetch ended (committed or not): its `len` staged bytes no longer count as staging.
    pub fn staged_done(&self, len: u64) {
        if let Ok(mut inv) = self.inventory.lock() {
            inv.staging = inv.staging.saturating_sub(len);
        }
    }

    /// Bytes and blobs accounted for.
    pub fn usage(&self) -> (u64, usize) {
        self.inventory.lock().map(|inv| (inv.total, inv.lru.len())).unwrap_or((0, 0))
    }

    async fn enforce(&self) {
        let Some(max) = self.max else { return };
        if let Some(cluster) = &self.cluster {
            if !cluster.is_degraded() && self.enforce_cluster(cluster, max).await {
                return;
            }
        }
        loop {
            let victim = {
                let Ok(mut inv) = self.inventory.lock() else { return };
                if inv.total + inv.staging <= max {
                    return;
                }
                match inv.lru.pop_lru() {
                    Some((d, size)) => {
                        inv.total -= size;
                        self.publish(&inv);
                        (d, size)
                    }
                    None => return,
                }
            };
            self.evict(&victim.0, victim.1).await;
        }
    }

    /// Keeps the cluster's bucket under `max`, when this replica holds the eviction lease (one
    /// replica evicts at a time; another holding it does the work). `false` when Redis cannot
    /// answer: the caller evicts by its own view.
    async fn enforce_cluster(&self, cluster: &Arc<Cluster>, max: u64) -> bool {
        let staging = || self.inventory.lock().map(|inv| inv.staging).unwrap_or(0);
        if self.cluster_total.load(Ordering::Relaxed) + staging() <= max {
            return true;
        }
        let _lease = match cluster.claim(EVICT_KEY.to_owned()).await {
            Claim::Owner(lease) => lease,
            Claim::Held(_) => return true,
            Claim::Alone => return false,
        };
        loop {
            let Some(total) = cluster.lru_total().await else { return false };
            self.cluster_total.store(total, Ordering::Relaxed);
            self.metrics.cache_size_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
            if total + staging() <= max {
                return true;
            }
            // Popped atomically: no other replica can pick the same blob.
            let Some(popped) = cluster.lru_pop().await else { return false };
            let Some((digest, size)) = popped else { return true };
            if let Ok(mut inv) = self.inventory.lock() {
                if let Some(local) = inv.lru.pop(&digest) {
                    inv.total -= local;
                    self.publish(&inv);
                }
            }
            // Said to pushes while it runs: one that marks the digest now waits for the
            // verdict, then stores its own copy if these bytes went.
            let _evicting = cluster.evicting(&digest).await;
            self.evict(&digest, size).await;
        }
    }

    /// Deletes a blob the order gave up, unless a push has since made it hosted content
    /// (which leaves the cache's accounting but stays stored).
    async fn evict(&self, digest: &Digest, size: u64) {
        if matches!(crate::storage::marks::is_hosted(&*self.storage, digest).await, Ok(true)) {
            return;
        }
        match self.storage.delete_blob(digest).await {
            Ok(_) => {
                self.metrics.cache_evictions.inc();
                tracing::debug!(%digest, size, "evicted");
            }
            Err(e) => tracing::warn!(%digest, error = %e, "cannot evict blob"),
        }
    }

    fn publish(&self, inv: &Inventory) {
        // On a cluster the size is the bucket's (set where the cluster's total is read).
        if self.cluster.is_none() {
            self.metrics.cache_size_bytes.set(i64::try_from(inv.total).unwrap_or(i64::MAX));
        }
        self.metrics.cache_blobs.set(i64::try_from(inv.lru.len()).unwrap_or(i64::MAX));
    }
}

fn epoch_millis(t: std::time::SystemTime) -> u64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Sends the touches of the last second to the cluster's order and reads its total back, for
/// as long as the evictor lives.
async fn send_touches_forever(evictor: Weak<Evictor>) {
    let mut tick = tokio::time::interval(TOUCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(evictor) = evictor.upgrade() else { return };
        let Some(cluster) = evictor.cluster.clone() else { return };
        let touched: Vec<Digest> = match evictor.touched.lock() {
            Ok(mut t) => t.drain().collect(),
            Err(_) => Vec::new(),
        };
        if !touched.is_empty() {
            cluster.lru_touch(&touched).await;
        }
        if let Some(total) = cluster.lru_total().await {
            evictor.cluster_total.store(total, Ordering::Relaxed);
            evictor.metrics.cache_size_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        if evictor.cluster_total.load(Ordering::Relaxed) > evictor.max.unwrap_or(u64::MAX) {
            // Another replica's commits filled the bucket: evict here if nobody else does.
            evictor.enforce().await;
        }
    }
}

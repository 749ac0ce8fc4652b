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

use std::sync::{Arc, Mutex};

use lru::LruCache;

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
}

impl Evictor {
    /// An evictor for `storage` bounded by `max` bytes (unbounded: only accounting).
    pub fn new(max: Option<u64>, storage: Arc<dyn Storage>, metrics: Arc<Metrics>) -> Arc<Evictor> {
        Arc::new(Evictor {
            max,
            inventory: Mutex::new(Inventory { lru: LruCache::unbounded(), total: 0, staging: 0 }),
            storage,
            metrics,
        })
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
        self.enforce().await;
    }

    /// Marks a blob as just used.
    pub fn touch(&self, digest: &Digest) {
        if let Ok(mut inv) = self.inventory.lock() {
            inv.lru.promote(digest);
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
            // A cached blob that a push has since referenced became hosted content: it leaves
            // the cache's accounting but stays on disk.
            if matches!(crate::storage::marks::is_hosted(&*self.storage, &victim.0).await, Ok(true)) {
                continue;
            }
            match self.storage.delete_blob(&victim.0).await {
                Ok(_) => {
                    self.metrics.cache_evictions.inc();
                    tracing::debug!(digest = %victim.0, size = victim.1, "evicted");
                }
                Err(e) => tracing::warn!(digest = %victim.0, error = %e, "cannot evict blob"),
            }
        }
    }

    fn publish(&self, inv: &Inventory) {
        self.metrics.cache_size_bytes.set(i64::try_from(inv.total).unwrap_or(i64::MAX));
        self.metrics.cache_blobs.set(i64::try_from(inv.lru.len()).unwrap_or(i64::MAX));
    }
}

//! The hot tier (`storage.hot_tier`): with a bucket as the store, a byte-bounded LRU copy of
//! recently used blobs on this replica's disk, so hot blobs are served at disk speed (and as a
//! memory map) instead of through the bucket. It is a copy: losing it loses nothing.
//!
//! Filled two ways: a blob this replica fetched or received is kept when it is committed (the
//! verified staging file is renamed into place), and a whole blob read from the bucket is
//! written to a staging file on the way to the client and published only if its digest matches.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};

use super::{ByteStream, FsStorage, Staged, Storage};
use crate::distribution::{Digest, DigestVerifier};

/// The local copy and its LRU order (sizes in bytes).
pub struct HotTier {
    local: Arc<FsStorage>,
    max: u64,
    lru: Mutex<Lru>,
}

struct Lru {
    order: lru::LruCache<Digest, u64>,
    total: u64,
}

impl HotTier {
    /// A hot tier in `local`'s blob directory, holding at most `max` bytes.
    pub fn new(local: Arc<FsStorage>, max: u64) -> HotTier {
        HotTier { local, max, lru: Mutex::new(Lru { order: lru::LruCache::unbounded(), total: 0 }) }
    }

    /// Takes in what a previous run left on disk, oldest first, then trims to the bound
    /// (blocking: start-up only).
    pub fn load(&self) -> io::Result<()> {
        let mut blobs = self.local.scan_blobs()?;
        blobs.sort_by_key(|b| b.modified);
        let over = {
            let mut lru = self.lock();
            for b in blobs {
                lru.total += b.size;
                lru.order.put(b.digest, b.size);
            }
            self.over_bound(&mut lru)
        };
        for d in over {
            std::fs::remove_file(self.local.blob_path(&d))?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The map holds plain data: a panic elsewhere cannot leave it inconsistent.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The size of a blob held here (no disk access).
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        self.lock().order.peek(digest).copied()
    }

    /// Bytes `start..end` of a blob held here, or `None` (then the bucket has it).
    pub async fn read(&self, digest: &Digest, start: u64, end: u64) -> io::Result<Option<ByteStream>> {
        if self.lock().order.get(digest).is_none() {
            return Ok(None);
        }
        let found = self.local.read_blob(digest, start, end).await?;
        if found.is_none() {
            // Removed from disk behind our back: forget it, serve from the bucket.
            self.forget(digest);
        }
        Ok(found)
    }

    /// Publishes a verified staging file locally (after its upload to the bucket).
    pub async fn keep(&self, staged: Arc<Staged>, digest: &Digest) -> io::Result<()> {
        let size = staged.file.metadata()?.len();
        if size > self.max {
            return Ok(());
        }
        self.local.commit(staged, digest).await?;
        self.insert(digest.clone(), size).await;
        Ok(())
    }

    async fn insert(&self, digest: Digest, size: u64) {
        let over = {
            let mut lru = self.lock();
            if let Some(old) = lru.order.put(digest, size) {
                lru.total -= old;
            }
            lru.total += size;
            self.over_bound(&mut lru)
        };
        self.drop_files(over).await;
    }

    fn over_bound(&self, lru: &mut Lru) -> Vec<Digest> {
        let mut out = Vec::new();
        while lru.total > self.max {
            let Some((digest, size)) = lru.order.pop_lru() else { break };
            lru.total -= size;
            out.push(digest);
        }
        out
    }

    async fn drop_files(&self, digests: Vec<Digest>) {
        for d in digests {
            // Readers holding the file open finish; a failure leaves a file the next start counts.
            if let Err(e) = self.local.delete_blob(&d).await {
                tracing::warn!(error = %e, digest = %d, "could not remove a blob from the hot tier");
            }
        }
    }

    fn forget(&self, digest: &Digest) {
        let mut lru = self.lock();
        if let Some(size) = lru.order.pop(digest) {
            lru.total -= size;
        }
    }

    /// Removes a blob's local copy (eviction or quarantine of the blob itself).
    pub async fn remove(&self, digest: &Digest) -> io::Result<()> {
        self.forget(digest);
        self.local.delete_blob(digest).await.map(drop)
    }

    /// Passes a whole blob read from the bucket through, writing it to a staging file as it
    /// goes; publishes it locally if it ends whole with the right digest. A local failure stops
    /// the copy, never the client's stream.
    pub fn fill(self: &Arc<Self>, digest: Digest, size: u64, body: ByteStream) -> BoxFuture<'static, ByteStream> {
        let hot = self.clone();
        Box::pin(async move {
            if size > hot.max {
                return body;
            }
            let staged = match hot.local.stage().await {
                Ok(s) => Arc::new(s),
                Err(_) => return body,
            };
            let copy = Some(Copy { staged, written: 0, hasher: DigestVerifier::new() });
            stream::unfold((body, copy, hot, digest, size), |(mut body, mut copy, hot, digest, size)| async move {
                match body.next().await {
                    Some(Ok(bytes)) => {
                        copy = match copy {
                            Some(c) => c.write(bytes.clone()).await,
                            None => None,
                        };
                        // Published as soon as the last byte is written, not at the end of the
                        // stream: hyper stops polling a body once Content-Length bytes are sent.
                        if let Some(c) = copy.take_if(|c| c.written >= size) {
                            let (hot, digest) = (hot.clone(), digest.clone());
                            tokio::spawn(async move { c.publish(&hot, &digest, size).await });
                        }
                        Some((Ok(bytes), (body, copy, hot, digest, size)))
                    }
                    Some(Err(e)) => Some((Err(e), (body, None, hot, digest, size))),
                    None => None,
                }
            })
            .boxed()
        })
    }
}

/// A hot-tier copy in progress.
struct Copy {
    staged: Arc<Staged>,
    written: u64,
    hasher: DigestVerifier,
}

impl Copy {
    async fn write(mut self, bytes: Bytes) -> Option<Copy> {
        self.hasher.update(&bytes);
        let (staged, at) = (self.staged.clone(), self.written);
        let len = bytes.len() as u64;
        let written = tokio::task::spawn_blocking(move || staged.write_all_at(&[bytes], at)).await;
        matches!(written, Ok(Ok(()))).then(|| {
            self.written += len;
            self
        })
    }

    async fn publish(self, hot: &Arc<HotTier>, digest: &Digest, size: u64) {
        if self.written != size || self.hasher.finish() != *digest {
            tracing::warn!(%digest, "a blob read from the bucket did not match its digest; not kept locally");
            return;
        }
        if hot.local.commit(self.staged, digest).await.is_ok() {
            hot.insert(digest.clone(), size).await;
        }
    }
}

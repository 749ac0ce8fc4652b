//! The cluster's one recency order of cached blobs, for a size cap (`storage.max_size`) that
//! holds for the bucket, not for each replica's view of it: a sorted set of digests scored by
//! last access (`ferry:lru`), their sizes (`ferry:lru:sizes`) and the running total
//! (`ferry:lru:total`), each change one Lua script so the three never disagree.
//!
//! One replica at a time evicts (the lease `ferry:evict`), popping the least recently used
//! entry atomically, so no blob is evicted twice. While it checks a victim for a hosted mark
//! and deletes it, it holds `ferry:evicting:<hex>`: a push that marked the digest meanwhile waits
//! for that to end before it looks whether the bytes are stored (see [`Cluster::wait_eviction`]),
//! so an eviction and a push never race for one blob.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::Script;

use super::Cluster;
use crate::distribution::Digest;

/// The eviction lease: one replica evicts at a time.
pub const EVICT_KEY: &str = "ferry:evict";

const ORDER: &str = "ferry:lru";
const SIZES: &str = "ferry:lru:sizes";
const TOTAL: &str = "ferry:lru:total";

/// Adds members (ARGV: score, member, size, ...) not yet present, counting their sizes;
/// returns the total.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local added = 0 \
         for i = 1, #ARGV, 3 do \
           if redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i+1]) == 1 then \
             redis.call('HSET', KEYS[2], ARGV[i+1], ARGV[i+2]) \
             redis.call('INCRBY', KEYS[3], ARGV[i+2]) added = added + 1 \
           end \
         end return tonumber(redis.call('GET', KEYS[3]) or '0')",
    )
});

/// Pops the least recently used member: `{member, size}`, or nothing.
static POP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local got = redis.call('ZPOPMIN', KEYS[1]) \
         if #got == 0 then return false end \
         local size = tonumber(redis.call('HGET', KEYS[2], got[1]) or '0') \
         redis.call('HDEL', KEYS[2], got[1]) redis.call('DECRBY', KEYS[3], size) \
         return {got[1], size}",
    )
});

/// Removes a member (a blob that left the cache some other way); 1 if it was there.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end \
         local size = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') \
         redis.call('HDEL', KEYS[2], ARGV[1]) redis.call('DECRBY', KEYS[3], size) return 1",
    )
});

/// Now, as the order's scores count (ms since the epoch).
pub fn now_millis() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

fn evicting_key(digest: &Digest) -> String {
    format!("ferry:evicting:{}", digest.hex())
}

impl Cluster {
    /// Records blobs `(digest, size, last use in ms since the epoch)` the order lacks (a new
    /// commit, or the start-up inventory); those present keep their place. Returns the total
    /// bytes; `None`: Redis cannot answer.
    pub async fn lru_add(&self, blobs: &[(Digest, u64, u64)]) -> Option<u64> {
        let mut total = 0;
        for batch in blobs.chunks(500) {
            let mut args = Vec::with_capacity(batch.len() * 3);
            for (d, size, used) in batch {
                args.extend([used.to_string(), d.hex().to_owned(), size.to_string()]);
            }
            total = self
                .command(|mut conn| async move {
                    ADD.key(ORDER).key(SIZES).key(TOTAL).arg(args).invoke_async::<i64>(&mut conn).await
                })
                .await?;
        }
        Some(u64::try_from(total).unwrap_or(0))
    }

    /// Marks blobs as just used (only those the order holds; never older than they were).
    pub async fn lru_touch(&self, digests: &[Digest]) -> Option<()> {
        let now = now_millis();
        for batch in digests.chunks(500) {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(ORDER).arg("XX").arg("GT");
            for d in batch {
                cmd.arg(now).arg(d.hex());
            }
            self.command(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await }).await?;
        }
        Some(())
    }

    /// Bytes of cached blobs across the cluster.
    pub async fn lru_total(&self) -> Option<u64> {
        let total = self
            .command(|mut conn| async move { redis::cmd("GET").arg(TOTAL).query_async::<Option<i64>>(&mut conn).await })
            .await?;
        Some(u64::try_from(total.unwrap_or(0)).unwrap_or(0))
    }

    /// Takes the least recently used blob out of the order: `Some(None)` when it is empty.
    pub async fn lru_pop(&self) -> Option<Option<(Digest, u64)>> {
        let got = self
            .command(|mut conn| async move {
                POP.key(ORDER).key(SIZES).key(TOTAL).invoke_async::<Option<(String, u64)>>(&mut conn).await
            })
            .await?;
        // A member that is not a digest (written by something else) is dropped, not evicted.
        Some(got.and_then(|(hex, size)| Some((crate::storage::layout::digest_from_hex(&hex)?, size))))
    }

    /// Takes a blob out of the order (it left the cache another way, or became hosted content).
    pub async fn lru_remove(&self, digest: &Digest) -> Option<()> {
        let hex = digest.hex().to_owned();
        self.command(|mut conn| async move {
            REMOVE.key(ORDER).key(SIZES).key(TOTAL).arg(hex).invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(drop)
    }

    /// Says "this blob is being evicted" until the returned guard drops (or the lease lapses).
    pub async fn evicting(self: &std::sync::Arc<Self>, digest: &Digest) -> super::Claim {
        self.claim(evicting_key(digest)).await
    }

    /// Waits (at most two lease lifetimes) while another replica evicts `digest`: a push calls
    /// it after marking the digest and before asking whether the bytes are stored, so it either
    /// made the evictor skip them or sees them gone and stores its own copy.
    pub async fn wait_eviction(&self, digest: &Digest) {
        let key = evicting_key(digest);
        let deadline = Instant::now() + 2 * self.lease_ttl;
        while Instant::now() < deadline {
            let key = key.clone();
            let held = self
                .command(|mut conn| async move { redis::cmd("EXISTS").arg(key).query_async::<bool>(&mut conn).await });
            if held.await != Some(true) {
                return;
            }
            tokio::time::sleep(self.poll_interval().min(Duration::from_millis(50))).await;
        }
    }
}

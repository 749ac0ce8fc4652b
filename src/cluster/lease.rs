//! Leases: "this replica is doing X" in Redis, so the others wait for it or stream from it
//! instead of asking the upstream again. A lease is a key set if absent with an expiry
//! (`cluster.lease_ttl`), holding its owner's name; the owner renews it while the work runs
//! and deletes it when the work ends. An owner that dies stops renewing: its lease lapses and
//! the next replica that asks takes over.
//!
//! Renewing and releasing check the owner first (one Lua script each), so a replica never
//! extends or deletes a lease that lapsed and was taken by another.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use sha2::{Digest as _, Sha256};

use super::Cluster;
use crate::distribution::Digest;

/// Sets the lease if absent and returns its holder (this caller's name if it got it).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end \
         return redis.call('GET', KEYS[1])",
    )
});

/// Extends the lease if the caller still holds it; 1 if so.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
         return 0",
    )
});

/// Deletes the lease if the caller still holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
});

/// What asking for a lease gave.
pub enum Claim {
    /// This replica holds it: do the work.
    Owner(Lease),
    /// Another replica holds it: its advertised URL, or `None` when the holder cannot be asked
    /// (an earlier life of this replica, or this process's own lease being released), which
    /// only its lapse or release ends.
    Held(Option<String>),
    /// Redis cannot answer: do the work alone.
    Alone,
}

/// A lease this replica holds. Every claim of the same key in this process while it is held
/// gets a handle to the same lease (the process is one owner: which of its requests does the
/// work is the cache's in-process coalescing's to decide). Renewed in the background until
/// the last handle is dropped, which releases it.
#[derive(Clone)]
pub struct Lease {
    /// Kept for its drop: the last handle releases the lease.
    _held: Arc<Held>,
}

/// The one holding of a key by this process.
pub(super) struct Held {
    cluster: Arc<Cluster>,
    key: String,
    /// What this holding wrote into Redis: unique per claim, so releasing a lapsed holding
    /// can never delete the one a later claim of this process took.
    token: String,
    renew: tokio::task::JoinHandle<()>,
}

/// The key of the one fetch of a blob across the cluster.
pub fn fetch_key(digest: &Digest) -> String {
    format!("ferry:fetch:{digest}")
}

/// The key of a manifest or tag flight (hashed: it is made of names clients chose).
pub fn flight_key(what: &str) -> String {
    format!("ferry:flight:{}", hex::encode(Sha256::digest(what.as_bytes())))
}

impl Cluster {
    /// Takes the lease `key`, or says who holds it.
    pub async fn claim(self: &Arc<Self>, key: String) -> Claim {
        // One claim at a time in this process: two requests of this replica racing for one
        // key must end up sharing one holding, never both asking Redis and one of them
        // releasing what the other still works under. A claim is one Redis round trip,
        // bounded by redis_timeout (and none at all while degraded).
        let _one_at_a_time = self.claiming.lock().await;
        if let Some(held) = self.held_here(&key) {
            return Claim::Owner(Lease { _held: held });
        }
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}.{n} {}", self.me, self.advertise);
        let ttl = millis(self.lease_ttl);
        let holder = self
            .command(|mut conn| {
                let (key, token) = (key.clone(), token.clone());
                async move { ACQUIRE.key(key).arg(token).arg(ttl).invoke_async::<Option<String>>(&mut conn).await }
            })
            .await;
        match holder {
            None => Claim::Alone,
            Some(Some(h)) if h == token => {
                let renew = tokio::spawn(renew_forever(Arc::downgrade(self), key.clone(), token.clone()));
                let held = Arc::new(Held { cluster: self.clone(), key: key.clone(), token, renew });
                if let Ok(mut map) = self.held.lock() {
                    map.retain(|_, w| w.strong_count() > 0);
                    map.insert(key, Arc::downgrade(&held));
                }
                Claim::Owner(Lease { _held: held })
            }
            Some(Some(h)) => {
                let (holder, url) = h.split_once(' ').unwrap_or((h.as_str(), ""));
                let mine = holder.split_once('.').is_some_and(|(nonce, _)| nonce == self.me);
                Claim::Held((!mine && url != self.advertise && !url.is_empty()).then(|| url.to_owned()))
            }
            // It lapsed between the SET and the GET: nobody holds it, and asking again decides.
            Some(None) => Claim::Held(None),
        }
    }

    /// This process's live holding of `key`, if any.
    fn held_here(&self, key: &str) -> Option<Arc<Held>> {
        self.held.lock().ok()?.get(key)?.upgrade()
    }

    /// How long a caller that found a lease held waits before asking again.
    pub fn poll_interval(&self) -> Duration {
        (self.lease_ttl / 50).clamp(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// How long a lease outlives its owner's last renewal.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }
}

/// Renews `key` every third of the TTL while the cluster (and the lease) lives. A renewal
/// that finds the lease gone (it lapsed during a stall, or Redis lost it) is logged: the work
/// goes on, and at worst another replica repeats it.
async fn renew_forever(cluster: std::sync::Weak<Cluster>, key: String, token: String) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let every = c.lease_ttl / 3;
        drop(c);
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let ttl = millis(c.lease_ttl);
        let renewed = c
            .command(|mut conn| {
                let (key, token) = (key.clone(), token.clone());
                async move { RENEW.key(key).arg(token).arg(ttl).invoke_async::<i64>(&mut conn).await }
            })
            .await;
        if renewed == Some(0) {
            tracing::warn!(lease = %key, "a lease lapsed while its work ran; another replica may repeat it");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renew.abort();
        if let Ok(mut map) = self.cluster.held.lock() {
            // Ours, or another dead one: a live holding of this key would have been shared.
            if map.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&self.key);
            }
        }
        let (cluster, key, token) =
            (self.cluster.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        // Drop cannot wait: the release runs on its own. Should it not happen (Redis down),
        // the lease lapses after its TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                cluster
                    .command(|mut conn| async move { RELEASE.key(key).arg(token).invoke_async::<i64>(&mut conn).await })
                    .await;
            });
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Most fetch leases [`Cluster::fetches_by_owner`] reads: the view stays one bounded answer.
const VIEW_MAX_LEASES: usize = 10_000;

impl Cluster {
    /// How many fetches each replica (by its advertised URL) holds a lease for right now;
    /// `None` when Redis cannot answer. Reads at most 10,000 leases.
    pub async fn fetches_by_owner(&self) -> Option<std::collections::BTreeMap<String, usize>> {
        let holders = self
            .command(|mut conn| async move {
                let mut keys: Vec<String> = Vec::new();
                let mut cursor: u64 = 0;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("ferry:fetch:*")
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    keys.extend(batch);
                    cursor = next;
                    if cursor == 0 || keys.len() >= VIEW_MAX_LEASES {
                        break;
                    }
                }
                keys.truncate(VIEW_MAX_LEASES);
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                redis::cmd("MGET").arg(keys).query_async::<Vec<Option<String>>>(&mut conn).await
            })
            .await?;
        let mut owners = std::collections::BTreeMap::new();
        for h in holders.into_iter().flatten() {
            let url = h.split_once(' ').map_or("", |(_, url)| url).to_owned();
            *owners.entry(url).or_insert(0) += 1;
        }
        Some(owners)
    }
}

//! Upload sessions shared by the replicas: a session is one JSON record in Redis
//! (`ferry:upload:<id>`, expiring `hosted.upload_max_age` after its last change), its chunks are
//! objects in the bucket. Any replica may take the next chunk, the closing PUT, a status GET or
//! a cancel, and the session outlives the replica that opened it.
//!
//! Every change is a compare-and-set of the whole record (one Lua script), so two replicas
//! appending at the same offset cannot both win: the loser removes its chunk and answers 416.
//! The per-user bound is a sorted set per user (`ferry:uploads-of:<sha256(user)>`, scored by
//! expiry), checked and filled in the same script that creates the record.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Cluster;

/// A shared upload session as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedUpload {
    /// The repository it uploads to (another repository's session is unknown there).
    pub repo: String,
    /// Who opened it.
    pub owner: String,
    /// Bytes received so far: where the next chunk starts.
    pub written: u64,
    /// The chunks, in order; they cover `0..written` exactly.
    pub chunks: Vec<Chunk>,
    /// A closing PUT is assembling it: no chunk may join it any more.
    #[serde(default)]
    pub closing: bool,
}

/// One chunk of a shared upload: an object in the bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Its first byte's offset in the upload.
    pub start: u64,
    /// Its length.
    pub len: u64,
    /// What makes its key unique (see `storage::layout::upload_chunk`).
    pub name: String,
}

/// What opening a shared session gave.
pub enum Opened {
    /// The session exists in Redis.
    Open,
    /// The user holds `held` sessions already, the most they may.
    Full { held: usize },
}

/// Drops the user's expired sessions, then creates the record if the user holds fewer than
/// ARGV[4]: 1 if created, else minus the number held.
static OPEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3]) \
         local held = redis.call('ZCARD', KEYS[2]) \
         if held >= tonumber(ARGV[4]) then return -held end \
         redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
         redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[5]) \
         redis.call('PEXPIRE', KEYS[2], ARGV[2]) \
         return 1",
    )
});

/// Replaces the record if it is still ARGV[1]; 1 if so.
static SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
         redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
         redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[5]) \
         redis.call('PEXPIRE', KEYS[2], ARGV[3]) \
         return 1",
    )
});

/// Deletes the record if it is still ARGV[1] (or whatever it is, when ARGV[1] is empty) and
/// frees the user's slot; 1 if this call deleted it.
static CLOSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local cur = redis.call('GET', KEYS[1]) \
         if not cur or (ARGV[1] ~= '' and cur ~= ARGV[1]) then return 0 end \
         redis.call('DEL', KEYS[1]) redis.call('ZREM', KEYS[2], ARGV[2]) return 1",
    )
});

fn record_key(id: &str) -> String {
    format!("ferry:upload:{id}")
}

/// The per-user set (hashed: user names are the client's).
fn user_key(user: &str) -> String {
    format!("ferry:uploads-of:{}", hex::encode(Sha256::digest(user.as_bytes())))
}

fn now_millis() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl SharedUpload {
    /// The record's exact text (what a compare-and-set compares).
    pub fn encode(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Cluster {
    /// Creates session `id` for `upload.owner`, who may hold at most `max_per_user` sessions
    /// (each lives `ttl` after its last change). `None`: Redis cannot answer.
    pub async fn open_upload(
        &self,
        id: &str,
        upload: &SharedUpload,
        ttl: Duration,
        max_per_user: usize,
    ) -> Option<Opened> {
        let (record, user) = (record_key(id), user_key(&upload.owner));
        let (text, ttl, now, id) = (upload.encode(), millis(ttl), now_millis(), id.to_owned());
        let got = self
            .command(|mut conn| async move {
                OPEN.key(record)
                    .key(user)
                    .arg(text)
                    .arg(ttl)
                    .arg(now)
                    .arg(max_per_user)
                    .arg(id)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await?;
        Some(if got == 1 { Opened::Open } else { Opened::Full { held: usize::try_from(-got).unwrap_or(0) } })
    }

    /// Session `id` as Redis holds it, with its exact text: `Some(None)` if there is none (it
    /// finished, was cancelled, expired or never was). `None`: Redis cannot answer.
    pub async fn read_upload(&self, id: &str) -> Option<Option<(SharedUpload, String)>> {
        let key = record_key(id);
        let text = self
            .command(
                |mut conn| async move { redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut conn).await },
            )
            .await?;
        // A record that does not parse (another version's) is as good as none.
        Some(text.and_then(|t| serde_json::from_str(&t).ok().map(|u| (u, t))))
    }

    /// Replaces session `id` with `new` if Redis still holds `old`; `Some(false)` if another
    /// change came first (or the session is gone). `None`: Redis cannot answer.
    pub async fn swap_upload(&self, id: &str, old: &str, new: &SharedUpload, ttl: Duration) -> Option<bool> {
        let (record, user) = (record_key(id), user_key(&new.owner));
        let (old, text, ttl, now, id) = (old.to_owned(), new.encode(), millis(ttl), now_millis(), id.to_owned());
        let got = self
            .command(|mut conn| async move {
                SWAP.key(record)
                    .key(user)
                    .arg(old)
                    .arg(text)
                    .arg(ttl)
                    .arg(now)
                    .arg(id)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await?;
        Some(got == 1)
    }

    /// Ends session `id` of `owner` if Redis still holds `old` (any version when `old` is
    /// `None`); `Some(true)` if this call ended it. `None`: Redis cannot answer.
    pub async fn close_upload(&self, id: &str, owner: &str, old: Option<&str>) -> Option<bool> {
        let (record, user) = (record_key(id), user_key(owner));
        let (old, id) = (old.unwrap_or("").to_owned(), id.to_owned());
        let got = self
            .command(|mut conn| async move {
                CLOSE.key(record).key(user).arg(old).arg(id).invoke_async::<i64>(&mut conn).await
            })
            .await?;
        Some(got == 1)
    }

    /// Whether session `id` still exists (the purge of orphaned chunks asks). `None`: Redis
    /// cannot answer.
    pub async fn upload_exists(&self, id: &str) -> Option<bool> {
        let key = record_key(id);
        self.command(|mut conn| async move { redis::cmd("EXISTS").arg(key).query_async::<bool>(&mut conn).await }).await
    }
}

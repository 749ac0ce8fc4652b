//! The blob fetch: one task per cold digest, owned by no client, that streams the blob from the
//! upstreams into a staging file while hashing, publishes its [`Progress`] to every reader, and
//! commits the file once the digest matched.
//!
//! One fetch runs in three steps, each its own function:
//! * attempt ([`Received::place`]): an upstream's answer, checked to continue the bytes already
//!   received (a resume after a broken stream may start anywhere up to there);
//! * copy ([`Received::copy`]): its body in batches, hashed, then written to the staging file,
//!   or relayed in memory when the disk refuses it;
//! * verify ([`Received::verify`]): the digest verdict, and who is blamed for a mismatch.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use http::Method;
use tokio::sync::{broadcast, watch};

use super::Cache;
use crate::config::Capability;
use crate::distribution::{internal, Digest, DigestVerifier, ErrorCode, ProtocolError, RepoName};
use crate::metrics::Metrics;
use crate::registry::Route;
use crate::storage::{Staged, READ_CHUNK};
use crate::upstream::{body_span, error_chain, Answer, Attempts, Pool, Reason, Upstream, UpstreamRequest};

/// Progress of one blob fetch, published to every reader.
#[derive(Clone, Debug, Default)]
pub(super) struct Progress {
    /// An upstream answered; `total` is known if it sent a length.
    pub(super) ready: bool,
    pub(super) total: Option<u64>,
    /// Bytes written to the staging file (readable).
    pub(super) written: u64,
    /// Set once: verified (`Ok`) or failed.
    pub(super) done: Option<Result<(), ProtocolError>>,
    /// The upstream currently streaming.
    pub(super) upstream: String,
    /// Set when the disk refused a write: bytes from this offset on are relayed in memory to
    /// the clients already reading, and the blob will not be cached.
    pub(super) relay_from: Option<u64>,
}

/// Bytes relayed in memory once the disk refused them: `(offset in the blob, bytes)`.
pub(super) type Relayed = (u64, Bytes);

/// Batches a relay may queue for a reader before the reader is dropped as too slow: the bound
/// on memory when the disk is full (batches are at most a few MiB each, usually far less).
const RELAY_CAPACITY: usize = 64;

/// A fetch in progress, as its readers see it.
pub(super) struct BlobFetch {
    /// The staging file, or `None` when it could not even be created (relay from byte 0).
    pub(super) staged: Option<Arc<Staged>>,
    pub(super) progress: watch::Receiver<Progress>,
    pub(super) relay: broadcast::Sender<Relayed>,
}

/// A fetch to read, the reader's relay subscription, and whether it was joined (not started).
pub(super) type Joined = (Arc<BlobFetch>, broadcast::Receiver<Relayed>, bool);

impl Cache {
    /// Joins the fetch in progress for `digest`, or starts one. The relay receiver is taken
    /// here, before any byte can be relayed, so a reader never misses relayed bytes it needs.
    pub(super) async fn join_or_start(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
    ) -> Result<Joined, ProtocolError> {
        if let Some(joined) = self.try_join(digest)? {
            return Ok(joined);
        }
        let pool = self.pool(&route.registry)?;
        let staged = match self.storage.stage().await {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                // A full or broken disk never fails a pull: this one streams through uncached.
                self.metrics.cache_write_errors.inc();
                tracing::warn!(%digest, error = %e, "cannot create a staging file; streaming uncached");
                None
            }
        };
        let (tx, rx) = watch::channel(Progress { relay_from: staged.is_none().then_some(0), ..Progress::default() });
        let (relay, relay_rx) = broadcast::channel(RELAY_CAPACITY);
        let fetch = Arc::new(BlobFetch { staged: staged.clone(), progress: rx, relay });
        if staged.is_some() {
            let mut map = self.blob_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
            if let Some(f) = map.get(digest) {
                // Someone started it while we were creating our staging file (ours is dropped).
                if f.progress.borrow().relay_from.is_none() {
                    return Ok((f.clone(), f.relay.subscribe(), true));
                }
            }
            map.insert(digest.clone(), fetch.clone());
        }
        let this = self.clone();
        let (repo, digest, me) = (route.repo.clone(), digest.clone(), fetch.clone());
        tokio::spawn(async move {
            this.metrics.inflight_fetches.inc();
            // Cleans up however the task ends, a panic included: a fetch left in the map
            // without a verdict would hang or fail every later request for this digest.
            let guard = FetchGuard { cache: this.clone(), digest, me, tx };
            this.fetch_task(&pool, &repo, staged, guard).await;
        });
        Ok((fetch, relay_rx, false))
    }

    /// A fetch in progress that can still be joined: one that is writing to disk. One that is
    /// relaying (the disk refused it) cannot give a newcomer the bytes already relayed.
    fn try_join(&self, digest: &Digest) -> Result<Option<Joined>, ProtocolError> {
        let map = self.blob_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
        Ok(map
            .get(digest)
            .filter(|f| f.progress.borrow().relay_from.is_none())
            .map(|f| (f.clone(), f.relay.subscribe(), true)))
    }

    /// The body of a fetch's task: the fetch, the verdict to every reader, then the commit.
    async fn fetch_task(&self, pool: &Pool, repo: &RepoName, staged: Option<Arc<Staged>>, guard: FetchGuard) {
        let digest = guard.digest.clone();
        let result = self.run_fetch(pool, repo, &digest, staged.as_ref(), &guard.tx, &guard.me.relay).await;
        let cacheable = guard.tx.borrow().relay_from.is_none();
        // What reached the staging file (and was counted against max_size while it ran).
        let staged_bytes = match staged {
            Some(_) => {
                let p = guard.tx.borrow();
                p.relay_from.unwrap_or(p.written)
            }
            None => 0,
        };
        let (result, to_commit) = match (result, staged) {
            (Ok(size), Some(staged)) if cacheable => (Ok(()), Some((staged, size))),
            (Ok(_), _) => (Ok(()), None),
            (Err(e), _) => (Err(e), None),
        };
        if let Err(e) = &result {
            tracing::warn!(%digest, error = %e.message, "blob fetch failed");
        }
        // The verdict first: the digest matched, so every reader may complete now. Making
        // the blob durable (fsync, rename, fsync) is the cache's business, not the
        // clients': it took longer than the whole transfer of a 256 MiB blob on loopback.
        guard.tx.send_modify(|p| p.done = Some(result));
        let mut committed = None;
        if let Some((staged, size)) = to_commit {
            match self.storage.commit(staged, &digest).await {
                Ok(()) => committed = Some(size),
                Err(e) => {
                    self.metrics.cache_write_errors.inc();
                    tracing::warn!(%digest, error = %e, "blob served but not cached");
                }
            }
        }
        // Leaves the map only now: a newcomer before the commit joins this verified fetch,
        // one after it finds the blob on disk.
        drop(guard);
        self.evictor.staged_done(staged_bytes);
        if let Some(size) = committed {
            self.evictor.added(&digest, size).await;
        }
    }

    /// Streams the blob into the staging file from the first upstream that can, resuming with
    /// `Range` (or re-reading and discarding) when a stream breaks, then verifies the digest.
    /// Returns the blob's size.
    async fn run_fetch(
        &self,
        pool: &Pool,
        repo: &RepoName,
        digest: &Digest,
        staged: Option<&Arc<Staged>>,
        tx: &watch::Sender<Progress>,
        relay: &broadcast::Sender<Relayed>,
    ) -> Result<u64, ProtocolError> {
        let req = UpstreamRequest::new(Method::GET, repo, format!("blobs/{digest}"), Capability::Pull);
        let mut attempts = pool.attempts(req);
        let mut received = Received {
            staged,
            tx,
            relay,
            metrics: &self.metrics,
            hasher: DigestVerifier::new(),
            written: 0,
            total: None,
            held: None,
            // The size a manifest Ferry served declared, when known, and never past the limit.
            limit: self.declared.get(digest).await.unwrap_or(u64::MAX).min(self.max_blob_size),
            evictor: &self.evictor,
        };
        let upstream = loop {
            attempts.resume_from(received.written);
            let Some(answer) = attempts.next().await else {
                return Err(attempts.into_error(ErrorCode::BlobUnknown, &format!("blob {digest}")));
            };
            if let Some(upstream) = received.attempt(answer, &mut attempts).await? {
                break upstream;
            }
        };
        received.verify(digest, pool, &upstream, attempts.tried())
    }
}

/// What one fetch has received so far, across the upstreams it asked, and where it goes.
struct Received<'a> {
    staged: Option<&'a Arc<Staged>>,
    tx: &'a watch::Sender<Progress>,
    relay: &'a broadcast::Sender<Relayed>,
    metrics: &'a Metrics,
    hasher: DigestVerifier,
    /// Bytes received and kept (written to the staging file or relayed).
    written: u64,
    /// The blob's size, once an upstream announced it.
    total: Option<u64>,
    /// In relay mode the newest batch is held back until the digest is verified, so a
    /// corrupt blob never reaches a client complete.
    held: Option<Relayed>,
    /// Most bytes this blob may have: an endless body is cut off here.
    limit: u64,
    /// Staged bytes count against `storage.max_size` while the fetch runs.
    evictor: &'a super::Evictor,
}

/// How a body ended within a batch.
enum End {
    Closed,
    Broke(Reason),
}

/// Body pieces read together, and how the body ended if it did.
struct Batch {
    bufs: Vec<Bytes>,
    /// Bytes read from the upstream (before any are discarded).
    received: usize,
    end: Option<End>,
}

impl Received<'_> {
    /// Takes one upstream answer and copies its body. `Some(upstream)` once the body ended
    /// whole; `None` when this upstream was given up on (told to `attempts`: the next attempt
    /// resumes from what was kept).
    async fn attempt(
        &mut self,
        answer: Answer,
        attempts: &mut Attempts<'_>,
    ) -> Result<Option<Arc<Upstream>>, ProtocolError> {
        let Answer { upstream, response } = answer;
        let name = upstream.name().to_owned();
        let discard = match self.place(&response, &name) {
            Ok(discard) => discard,
            Err(reason) => {
                attempts.rejected(&upstream, reason);
                return Ok(None);
            }
        };
        match self.copy(response.bytes_stream(), discard, &name).await? {
            Ok(()) => Ok(Some(upstream)),
            Err(reason) => {
                tracing::warn!(upstream = %name, %reason, written = self.written, "blob stream broke; resuming");
                attempts.failed(&upstream, reason);
                Ok(None)
            }
        }
    }

    /// Checks that an answer continues the bytes already received, and tells the readers who
    /// is streaming. Returns how many leading bytes of its body are already here (an upstream
    /// without range support restarts from zero).
    fn place(&mut self, response: &reqwest::Response, name: &str) -> Result<u64, Reason> {
        let (body_start, body_total) =
            body_span(response).ok_or_else(|| Reason::Body("unusable Content-Range".into()))?;
        if body_start > self.written || (self.total.is_some() && body_total.is_some() && self.total != body_total) {
            return Err(Reason::Body("answer does not continue the bytes already received".into()));
        }
        if body_total.is_some_and(|t| t > self.limit) {
            return Err(Reason::Body(format!("announces more than the {} bytes this blob may have", self.limit)));
        }
        self.total = self.total.or(body_total);
        let total = self.total;
        self.tx.send_modify(|p| {
            p.ready = true;
            p.total = total;
            p.upstream = name.to_owned();
        });
        Ok(self.written - body_start)
    }

    /// Copies one body, skipping its first `discard` bytes. `Ok(Err(reason))`: it broke (or
    /// overran the announced size); the bytes kept so far stay.
    async fn copy<S>(&mut self, mut body: S, mut discard: u64, name: &str) -> Result<Result<(), Reason>, ProtocolError>
    where
        S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
    {
        loop {
            let Batch { mut bufs, received, end } = next_batch(&mut body).await;
            self.metrics.upstream_bytes.with_label_values(&[name]).inc_by(received as u64);
            skip_prefix(&mut bufs, &mut discard);
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            if self.total.is_some_and(|t| self.written + len > t) {
                return Ok(Err(Reason::Body("more bytes than announced".into())));
            }
            if self.written + len > self.limit {
                return Ok(Err(Reason::Body(format!("longer than the {} bytes this blob may have", self.limit))));
            }
            if len > 0 {
                self.keep(bufs, len).await?;
            }
            match end {
                None => {}
                Some(End::Broke(reason)) => return Ok(Err(reason)),
                Some(End::Closed) => {
                    return Ok(match self.total {
                        Some(t) if self.written < t => {
                            Err(Reason::Body(format!("closed after {} of {t} bytes", self.written)))
                        }
                        _ => Ok(()),
                    })
                }
            }
        }
    }

    /// Hashes a batch and writes it to the staging file, or relays it in memory once the disk
    /// refused (or never had) this blob; then publishes the new length.
    async fn keep(&mut self, bufs: Vec<Bytes>, len: u64) -> Result<(), ProtocolError> {
        let relay_from = self.tx.borrow().relay_from;
        match (relay_from, self.staged) {
            (None, Some(staged)) => {
                let hasher = std::mem::take(&mut self.hasher);
                let (hasher, bufs, res) = hash_and_write(staged.clone(), hasher, bufs, self.written).await?;
                self.hasher = hasher;
                if let Err(e) = res {
                    // Disk full or failing: keep serving the clients already here from
                    // memory; this blob will not be cached.
                    self.metrics.cache_write_errors.inc();
                    tracing::warn!(error = %e, at = self.written, "staging write failed; streaming the rest uncached");
                    let at = self.written;
                    self.tx.send_modify(|p| p.relay_from = Some(at));
                    // The batch was hashed already: relay it without hashing again.
                    self.relay_batch(bufs);
                }
            }
            _ => {
                for b in &bufs {
                    self.hasher.update(b);
                }
                self.relay_batch(bufs);
            }
        }
        self.written += len;
        let written = self.written;
        self.tx.send_modify(|p| p.written = written);
        if relay_from.is_none() && self.staged.is_some() {
            self.evictor.staging(len).await;
        }
        Ok(())
    }

    /// Queues `bufs` (at the current length) as the held-back batch and relays the previous one.
    fn relay_batch(&mut self, bufs: Vec<Bytes>) {
        if let Some(prev) = self.held.take() {
            // Nobody listening is fine: every reader may have gone.
            let _ = self.relay.send(prev);
        }
        let joined: Bytes =
            if bufs.len() == 1 { bufs.into_iter().next().unwrap_or_default() } else { bufs.concat().into() };
        self.held = Some((self.written, joined));
    }

    /// The digest verdict once `upstream` ended the body. On a match the held-back batch goes
    /// out and the size is returned. On a mismatch the one upstream that sent every byte is
    /// benched at once; when `tried` shows bytes may have come from several, which one lied
    /// is unknown, so each gets an ordinary failure instead.
    fn verify(
        self,
        digest: &Digest,
        pool: &Pool,
        upstream: &Upstream,
        tried: &[(String, Reason)],
    ) -> Result<u64, ProtocolError> {
        let got = self.hasher.finish();
        if got != *digest {
            self.metrics.digest_mismatches.inc();
            let resumed = !tried.is_empty() && self.written > 0;
            if resumed {
                let reason = Reason::Body("digest mismatch in a resumed blob".into());
                upstream.report_failure(&reason);
                for (name, _) in tried {
                    if let Some(up) = pool.upstream(name) {
                        up.report_failure(&reason);
                    }
                }
            } else {
                upstream.report_failure(&Reason::DigestMismatch);
            }
            tracing::error!(upstream = upstream.name(), resumed, expected = %digest, %got, "blob digest mismatch; discarded");
            return Err(ProtocolError::new(
                ErrorCode::DigestInvalid,
                format!("upstream {} sent bytes that do not match {digest}", upstream.name()),
            ));
        }
        if let Some(last) = self.held {
            // Nobody listening is fine: every reader may have gone.
            let _ = self.relay.send(last);
        }
        Ok(self.written)
    }
}

/// The next piece of a body and whatever else has already arrived (up to four read chunks),
/// so the disk sees few large writes.
async fn next_batch<S>(body: &mut S) -> Batch
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    let mut batch = Batch { bufs: Vec::new(), received: 0, end: None };
    let mut piece = body.next().await;
    loop {
        match piece {
            None => batch.end = Some(End::Closed),
            Some(Err(e)) => batch.end = Some(End::Broke(Reason::Body(error_chain(&e)))),
            Some(Ok(b)) => {
                batch.received += b.len();
                batch.bufs.push(b);
            }
        }
        if batch.end.is_some() || batch.received >= 4 * READ_CHUNK {
            return batch;
        }
        match body.next().now_or_never() {
            Some(next) => piece = next,
            None => return batch,
        }
    }
}

/// Drops the first `discard` bytes of `bufs` (bytes the readers already have: a resumed answer
/// that restarted from zero), counting `discard` down.
fn skip_prefix(bufs: &mut Vec<Bytes>, discard: &mut u64) {
    while *discard > 0 && !bufs.is_empty() {
        let first = &mut bufs[0];
        if (first.len() as u64) <= *discard {
            *discard -= first.len() as u64;
            bufs.remove(0);
        } else {
            *first = first.slice(*discard as usize..);
            *discard = 0;
        }
    }
}

/// Hashes `bufs` and writes them at `at` in the staging file, on the blocking pool (the bytes
/// move there, no copy); hands back the hasher, the bytes (to relay if the write failed) and
/// the write's outcome.
async fn hash_and_write(
    staged: Arc<Staged>,
    mut hasher: DigestVerifier,
    bufs: Vec<Bytes>,
    at: u64,
) -> Result<(DigestVerifier, Vec<Bytes>, io::Result<()>), ProtocolError> {
    tokio::task::spawn_blocking(move || {
        bufs.iter().for_each(|b| hasher.update(b));
        let res = staged.write_all_at(&bufs, at);
        (hasher, bufs, res)
    })
    .await
    .map_err(|e| internal("hash task failed", e))
}

/// Ends a blob fetch however its task ends: a verdict for every reader (a failure if none was
/// given), its map entry removed, the in-flight gauge decremented.
struct FetchGuard {
    cache: Arc<Cache>,
    digest: Digest,
    me: Arc<BlobFetch>,
    tx: watch::Sender<Progress>,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        self.tx.send_if_modified(|p| {
            if p.done.is_some() {
                return false;
            }
            p.done = Some(Err(ProtocolError::new(ErrorCode::Unavailable, "the blob fetch failed unexpectedly")));
            true
        });
        if let Ok(mut map) = self.cache.blob_fetches.lock() {
            if map.get(&self.digest).is_some_and(|f| Arc::ptr_eq(f, &self.me)) {
                map.remove(&self.digest);
            }
        }
        self.cache.metrics.inflight_fetches.dec();
    }
}

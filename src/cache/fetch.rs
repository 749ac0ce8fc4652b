//! The blob fetch: one task per cold digest, owned by no client, that streams the blob from the
//! upstreams into its [`FrameRing`] (where readers that keep up take the frames as they are)
//! and, through the [`StagingWriter`], into a hashed staging file, publishes its [`Progress`]
//! to every reader, and commits the file once the digest matched.
//!
//! One fetch runs in three steps, each its own function:
//! * attempt ([`Received::place`]): an upstream's answer, checked to continue the bytes already
//!   received (a resume after a broken stream may start anywhere up to there);
//! * copy ([`Received::copy`]): its body, frame batches into the ring at once and to the
//!   writer behind (the disk refusing it only means the blob is not cached);
//! * verify ([`Received::verify`]): the digest verdict, and who is blamed for a mismatch.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use http::Method;
use tokio::sync::watch;

use super::peer::Origin;
use super::ring::{FrameRing, RingBudget};
use super::tail::Reader;
use super::writer::{Outcome, StagingWriter, MIN_BATCH};
use super::Cache;
use crate::cluster::Lease;
use crate::config::Capability;
use crate::distribution::{internal, Digest, ErrorCode, ProtocolError, RepoName};
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
    /// Bytes received and kept: in the fetch's ring, or (older ones) in the staging file.
    pub(super) received: u64,
    /// Set once: verified (`Ok`) or failed.
    pub(super) done: Option<Result<(), ProtocolError>>,
    /// The upstream currently streaming.
    pub(super) upstream: String,
    /// Set when the disk refused a write: bytes from this offset on are only in memory (the
    /// ring), and the blob will not be cached.
    pub(super) relay_from: Option<u64>,
}

/// How much memory fetches keep for their readers (`limits.fetch_ring`, `fetch_ring_total`).
#[derive(Clone, Debug)]
pub struct RingBounds {
    /// Durable frames one fetch keeps for readers that keep up.
    pub per_fetch: u64,
    /// What all fetches keep together.
    pub budget: Arc<RingBudget>,
}

/// A fetch in progress, as its readers see it.
pub(super) struct BlobFetch {
    /// The staging file, or `None` when it could not even be created (relay from byte 0).
    pub(super) staged: Option<Arc<Staged>>,
    pub(super) progress: watch::Receiver<Progress>,
    /// The recent frames, shared with every reader.
    pub(super) ring: FrameRing,
}

/// A reader of a fetch, and whether the fetch was joined (not started).
pub(super) type Joined = (Reader, bool);

/// How a fetch's work ended.
pub(super) struct Ended {
    /// The blob's size, or the failure.
    pub(super) result: Result<u64, ProtocolError>,
    /// What went to the staging file (and counted against max_size).
    pub(super) staged_bytes: u64,
    /// Commit it: this replica fetched it from an upstream. A blob streamed whole from the
    /// replica that owns the fetch is that replica's to commit.
    pub(super) publish: bool,
    /// Held until the commit ended, so nobody starts the same fetch before the blob is stored.
    pub(super) lease: Option<Lease>,
}

impl Cache {
    /// Joins the fetch in progress for `digest`, or starts one; `None` when the blob is on disk
    /// by now (serve it as a hit).
    pub(super) async fn join_or_start(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
    ) -> Result<Option<Joined>, ProtocolError> {
        if let Some(joined) = self.try_join(digest)? {
            return Ok(Some(joined));
        }
        // The caller found no blob on disk, but a fetch may have committed it and left the map
        // since: a fetch leaves only after its rename, so a look after missing it is decisive.
        // A store that cannot answer now cannot have committed it either.
        let stored = self.storage.blob_size(digest).await.unwrap_or(None);
        if stored.is_some() {
            return Ok(None);
        }
        let pool = self.pool(&route.registry)?;
        let Some((origin, role)) = self.origin(digest).await else { return Ok(None) };
        // A blob streamed from its owner is the owner's to store: a plain staging file (no
        // upload alongside), kept for the readers that fall behind.
        let staging = match &origin {
            Origin::Upstreams(_) => self.storage.stage_blob(digest).await,
            Origin::Peer(_) => self.storage.stage().await,
        };
        let staged = match staging {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                // A full or broken disk never fails a pull: this one streams through uncached.
                self.metrics.cache_write_errors.inc();
                tracing::warn!(%digest, error = %e, "cannot create a staging file; streaming uncached");
                None
            }
        };
        let (tx, rx) = watch::channel(Progress { relay_from: staged.is_none().then_some(0), ..Progress::default() });
        let ring = FrameRing::new(self.ring.per_fetch, self.ring.budget.clone());
        let fetch = Arc::new(BlobFetch { staged: staged.clone(), progress: rx, ring });
        // Our reader joins before the fetch can receive a byte, so none leaves unseen.
        let reader = Reader::join(&fetch).ok_or_else(|| internal("a new fetch refused its reader", digest))?;
        {
            let mut map = self.blob_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
            // Someone started it while we were creating our staging file (ours is dropped).
            if let Some(joined) = map.get(digest).and_then(Reader::join) {
                return Ok(Some((joined, true)));
            }
            if staged.is_none() {
                fetch.ring.relay();
            }
            // Listed even without a staging file: others join while its ring has every byte.
            map.insert(digest.clone(), fetch.clone());
        }
        if let Some(role) = role {
            self.metrics.cluster_fetches.with_label_values(&[role]).inc();
        }
        let this = self.clone();
        let (repo, digest, me) = (route.repo.clone(), digest.clone(), fetch.clone());
        tokio::spawn(async move {
            this.metrics.inflight_fetches.inc();
            // Cleans up however the task ends, a panic included: a fetch left in the map
            // without a verdict would hang or fail every later request for this digest.
            let guard = FetchGuard { cache: this.clone(), digest, me, tx };
            this.fetch_task(&pool, &repo, guard, origin).await;
        });
        Ok(Some((reader, false)))
    }

    /// A fetch in progress that can still be joined: one that is writing to disk, or one
    /// relaying (the disk refused it) whose ring still holds every byte not in the file.
    pub(super) fn try_join(&self, digest: &Digest) -> Result<Option<Joined>, ProtocolError> {
        let map = self.blob_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
        Ok(map.get(digest).and_then(Reader::join).map(|r| (r, true)))
    }

    /// The body of a fetch's task: the fetch, the verdict to every reader, then the commit.
    async fn fetch_task(&self, pool: &Pool, repo: &RepoName, guard: FetchGuard, origin: Origin) {
        let digest = guard.digest.clone();
        let staged = guard.me.staged.clone();
        let Ended { result, staged_bytes, publish, lease } =
            self.run_fetch(pool, repo, &digest, &guard.me, &guard.tx, origin).await;
        let cacheable = publish && guard.tx.borrow().relay_from.is_none();
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
        guard.me.ring.release();
        drop(guard);
        drop(lease);
        self.evictor.staged_done(staged_bytes);
        if let Some(size) = committed {
            self.evictor.added(&digest, size).await;
        }
    }

    /// Streams the blob from the replica that owns its fetch, or from the first upstream that
    /// can (resuming with `Range`, or re-reading and discarding, when a stream breaks), then
    /// verifies the digest.
    async fn run_fetch(
        &self,
        pool: &Pool,
        repo: &RepoName,
        digest: &Digest,
        fetch: &BlobFetch,
        tx: &watch::Sender<Progress>,
        origin: Origin,
    ) -> Ended {
        let received = Received {
            fetch,
            tx,
            metrics: &self.metrics,
            writer: StagingWriter::new(fetch.staged.clone()),
            kept: 0,
            total: None,
            // The size a manifest Ferry served declared, when known, and never past the limit.
            limit: self.declared.get(digest).await.unwrap_or(u64::MAX).min(self.max_blob_size),
            evictor: &self.evictor,
            staged_bytes: 0,
            from_peer: false,
        };
        let (mut received, lease) = match self.after_peers(received, origin, digest).await {
            Ok(going_on) => going_on,
            Err(ended) => return ended,
        };
        let fail = |result, received: &Received, lease| Ended {
            result,
            staged_bytes: received.staged_bytes,
            publish: true,
            lease,
        };
        let req = UpstreamRequest::new(Method::GET, repo, format!("blobs/{digest}"), Capability::Pull);
        let mut attempts = pool.attempts(req);
        let upstream = match received.fetch(&mut attempts).await {
            Ok(Some(upstream)) => upstream,
            Ok(None) => {
                let error = attempts.into_error(ErrorCode::BlobUnknown, &format!("blob {digest}"));
                return fail(Err(error), &received, lease);
            }
            Err(e) => return fail(Err(e), &received, lease),
        };
        if let Err(e) = received.finish().await {
            return fail(Err(e), &received, lease);
        }
        let staged_bytes = received.staged_bytes;
        let result = received.verify(digest, Some((pool, &upstream, attempts.tried())));
        Ended { result, staged_bytes, publish: true, lease }
    }
}

/// What one fetch has received so far, across the upstreams it asked, and where it goes.
pub(super) struct Received<'a> {
    fetch: &'a BlobFetch,
    tx: &'a watch::Sender<Progress>,
    pub(super) metrics: &'a Metrics,
    /// Hashes every byte kept and stages it.
    writer: StagingWriter,
    /// Bytes received and kept (in the ring, and handed to the writer).
    pub(super) kept: u64,
    /// The blob's size, once an upstream announced it.
    total: Option<u64>,
    /// Most bytes this blob may have: an endless body is cut off here.
    limit: u64,
    /// Staged bytes count against `storage.max_size` while the fetch runs.
    evictor: &'a super::Evictor,
    /// Bytes handed to the staging file.
    pub(super) staged_bytes: u64,
    /// The body being copied comes from another replica (or the store), not an upstream: its
    /// bytes are not upstream traffic.
    pub(super) from_peer: bool,
}

/// Who sent a blob that ended: the pool, the upstream that ended it, and who else was tried.
type Blame<'a> = (&'a Pool, &'a Upstream, &'a [(String, Reason)]);

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

/// What the copy loop waits for next.
enum Step {
    Received(Batch),
    Written(Option<Outcome>),
}

impl Received<'_> {
    /// Asks the upstreams in turn until one sent the whole body; returns that one, or `None`
    /// when every upstream was tried.
    async fn fetch(&mut self, attempts: &mut Attempts<'_>) -> Result<Option<Arc<Upstream>>, ProtocolError> {
        loop {
            attempts.resume_from(self.kept);
            let Some(answer) = attempts.next().await else { return Ok(None) };
            if let Some(upstream) = self.attempt(answer, attempts).await? {
                return Ok(Some(upstream));
            }
        }
    }

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
                tracing::warn!(upstream = %name, %reason, kept = self.kept, "blob stream broke; resuming");
                attempts.failed(&upstream, reason);
                Ok(None)
            }
        }
    }

    /// Checks that an answer continues the bytes already received, and tells the readers who
    /// is streaming. Returns how many leading bytes of its body are already here (an upstream
    /// without range support restarts from zero).
    pub(super) fn place(&mut self, response: &reqwest::Response, name: &str) -> Result<u64, Reason> {
        let span = body_span(response).ok_or_else(|| Reason::Body("unusable Content-Range".into()))?;
        self.place_span(span, name)
    }

    /// [`Self::place`] for a body that starts at `body_start` of `body_total` bytes.
    pub(super) fn place_span(
        &mut self,
        (body_start, body_total): (u64, Option<u64>),
        name: &str,
    ) -> Result<u64, Reason> {
        if body_start > self.kept || (self.total.is_some() && body_total.is_some() && self.total != body_total) {
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
        Ok(self.kept - body_start)
    }

    /// Copies one body, skipping its first `discard` bytes, while the writer hashes and stages
    /// the batches behind it. `Ok(Err(reason))`: it broke (or overran the announced size); the
    /// bytes kept so far stay.
    pub(super) async fn copy<S, E>(
        &mut self,
        mut body: S,
        mut discard: u64,
        name: &str,
    ) -> Result<Result<(), Reason>, ProtocolError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error + 'static,
    {
        loop {
            let step = if self.writer.full() {
                Step::Written(self.writer.wait().await?)
            } else if self.writer.busy() {
                tokio::select! {
                    biased;
                    written = self.writer.wait() => Step::Written(written?),
                    // Cancel-safe: `next_batch` awaits only for its first piece.
                    batch = next_batch(&mut body) => Step::Received(batch),
                }
            } else {
                Step::Received(next_batch(&mut body).await)
            };
            let Batch { mut bufs, received, end } = match step {
                Step::Written(outcome) => {
                    self.written(outcome);
                    self.start_batch(MIN_BATCH).await;
                    continue;
                }
                Step::Received(batch) => batch,
            };
            if !self.from_peer {
                self.metrics.upstream_bytes.with_label_values(&[name]).inc_by(received as u64);
            }
            skip_prefix(&mut bufs, &mut discard);
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            if self.total.is_some_and(|t| self.kept + len > t) {
                return Ok(Err(Reason::Body("more bytes than announced".into())));
            }
            if self.kept + len > self.limit {
                return Ok(Err(Reason::Body(format!("longer than the {} bytes this blob may have", self.limit))));
            }
            if len > 0 {
                self.keep(bufs, len).await;
            }
            match end {
                None => {}
                Some(End::Broke(reason)) => return Ok(Err(reason)),
                Some(End::Closed) => {
                    return Ok(match self.total {
                        Some(t) if self.kept < t => {
                            Err(Reason::Body(format!("closed after {} of {t} bytes", self.kept)))
                        }
                        _ => Ok(()),
                    })
                }
            }
        }
    }

    /// Shares a batch with the readers (the ring), publishes the new length, and queues it
    /// for the writer.
    async fn keep(&mut self, bufs: Vec<Bytes>, len: u64) {
        let received = self.fetch.ring.push(&bufs);
        self.kept += len;
        debug_assert_eq!(received, self.kept);
        self.tx.send_modify(|p| p.received = received);
        self.writer.add(bufs, len);
        self.start_batch(MIN_BATCH).await;
        // Relaying (disk full), the ring is the only copy: wait for the slowest reader.
        self.fetch.ring.room().await;
    }

    /// Starts the writer on the pending bytes if it is idle and `min` are there.
    async fn start_batch(&mut self, min: u64) {
        let staging = self.writer.start(min);
        if staging > 0 {
            self.staged_bytes += staging;
            self.evictor.staging(staging).await;
        }
    }

    /// A batch is done: its bytes are in the file now (readers behind the ring may read them
    /// there), or the disk refused it and the rest of the blob is relayed uncached.
    fn written(&mut self, outcome: Option<Outcome>) {
        match outcome {
            Some(Outcome::Durable { end }) => self.fetch.ring.durable_to(end),
            Some(Outcome::Refused { at, error }) => {
                // Disk full or failing: keep serving the clients already here from memory;
                // this blob will not be cached.
                self.metrics.cache_write_errors.inc();
                tracing::warn!(%error, at, "staging write failed; streaming the rest uncached");
                self.fetch.ring.relay();
                self.tx.send_modify(|p| p.relay_from = Some(at));
            }
            Some(Outcome::Hashed) | None => {}
        }
    }

    /// Hands the last bytes to the writer and waits until every batch is done.
    pub(super) async fn finish(&mut self) -> Result<(), ProtocolError> {
        loop {
            self.start_batch(0).await;
            match self.writer.wait().await? {
                Some(outcome) => self.written(Some(outcome)),
                None => return Ok(()),
            }
        }
    }

    /// The digest verdict once the body ended (every batch hashed). `blame`: the upstream
    /// that ended it, the pool, and who else was tried (`None`: another replica sent it, and
    /// it verifies what it fetches itself). On a mismatch the one upstream that sent every
    /// byte is benched at once; when `tried` shows bytes may have come from several, which one
    /// lied is unknown, so each gets an ordinary failure instead. Returns the size.
    pub(super) fn verify(self, digest: &Digest, blame: Option<Blame<'_>>) -> Result<u64, ProtocolError> {
        let got = self.writer.digest().ok_or_else(|| internal("blob verified before it was hashed", digest))?;
        if got != *digest {
            self.metrics.digest_mismatches.inc();
            let Some((pool, upstream, tried)) = blame else {
                tracing::error!(expected = %digest, %got, "blob from another replica does not match its digest; discarded");
                return Err(ProtocolError::new(
                    ErrorCode::DigestInvalid,
                    format!("bytes received do not match {digest}"),
                ));
            };
            let resumed = !tried.is_empty() && self.kept > 0;
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
        Ok(self.kept)
    }
}

/// The next piece of a body and whatever else has already arrived (up to four read chunks),
/// so the disk sees few large writes.
async fn next_batch<S, E>(body: &mut S) -> Batch
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + 'static,
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

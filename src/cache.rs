//! The cache: manifests (moka in memory, records on disk), tag→digest mappings with a TTL, and
//! the blob fetcher that turns any number of concurrent misses into one upstream fetch.
//!
//! A blob fetch is a task of its own, owned by no client. It writes into a staging file while
//! hashing and publishes how many bytes are written; every client (the first one included)
//! streams from that file up to the published length. The last byte is held back until the
//! digest is verified, so a corrupt fetch aborts every response rather than completing it.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::{self, StreamExt};
use http::Method;
use tokio::sync::watch;

use crate::config::{CacheConfig, Capability};
use crate::distribution::{
    accept_or_all, accepts, internal, unsatisfiable, BlobAnswer, ByteRange, Digest, DigestVerifier, ErrorCode,
    Manifest, ProtocolError, Reference, RepoName, Source, DOCKER_MANIFEST_LIST, MAX_MANIFEST_BYTES, OCI_INDEX,
};
use crate::metrics::Metrics;
use crate::registry::Route;
use crate::storage::records::{decode_manifest, encode_manifest, TagEntry};
use crate::storage::{layout, marks, ByteStream, Staged, Storage, READ_CHUNK};
use crate::upstream::{error_chain, Answer, Exhausted, Pool, Reason, UpstreamRequest};

pub mod admin;
mod eviction;
pub use eviction::Evictor;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TagKey {
    registry: String,
    repo: RepoName,
    tag: String,
    /// Clients that accept an index get the index; others may get a platform manifest. The
    /// two answers must not overwrite each other.
    index: bool,
}

impl TagKey {
    fn object_key(&self) -> String {
        layout::tag_entry(&self.registry, &self.repo, &self.tag, self.index)
    }
}

/// Progress of one blob fetch, published to every reader.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// An upstream answered; `total` is known if it sent a length.
    ready: bool,
    total: Option<u64>,
    /// Bytes written to the staging file (readable).
    written: u64,
    /// Set once: verified (`Ok`) or failed.
    done: Option<Result<(), ProtocolError>>,
    /// The upstream currently streaming.
    upstream: String,
    /// Set when the disk refused a write: bytes from this offset on are relayed in memory to
    /// the clients already reading, and the blob will not be cached.
    relay_from: Option<u64>,
}

/// Bytes relayed in memory once the disk refused them: `(offset in the blob, bytes)`.
type Relayed = (u64, Bytes);

/// Batches a relay may queue for a reader before the reader is dropped as too slow: the bound
/// on memory when the disk is full (batches are at most a few MiB each, usually far less).
const RELAY_CAPACITY: usize = 64;

struct BlobFetch {
    /// The staging file, or `None` when it could not even be created (relay from byte 0).
    staged: Option<Arc<Staged>>,
    progress: watch::Receiver<Progress>,
    relay: tokio::sync::broadcast::Sender<Relayed>,
}

type SharedManifest = Shared<BoxFuture<'static, Result<(Arc<Manifest>, Source), ProtocolError>>>;

/// The cache over a set of registries' upstream pools.
pub struct Cache {
    storage: Arc<dyn Storage>,
    pools: HashMap<String, Arc<Pool>>,
    config: CacheConfig,
    metrics: Arc<Metrics>,
    manifests: moka::future::Cache<Digest, Arc<Manifest>>,
    tags: moka::future::Cache<TagKey, TagEntry>,
    manifest_fetches: Arc<Mutex<HashMap<String, SharedManifest>>>,
    blob_fetches: Arc<Mutex<HashMap<Digest, Arc<BlobFetch>>>>,
    evictor: Arc<Evictor>,
    /// Hosted namespaces exist: local content may be private and needs a check before the
    /// proxied side serves it.
    guard_private: bool,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Cache {
    /// A cache over `storage`, fetching through `pools` (one per configured registry), keeping
    /// cached blobs under `max_size` bytes. With `guard_private` (hosted namespaces share the
    /// store), content only pushed here is not served on proxied paths. Must be called inside a
    /// Tokio runtime: the inventory of blobs already on disk is loaded in the background.
    pub fn new(
        storage: Arc<dyn Storage>,
        pools: HashMap<String, Arc<Pool>>,
        config: CacheConfig,
        max_size: Option<u64>,
        guard_private: bool,
        metrics: Arc<Metrics>,
    ) -> Arc<Cache> {
        let evictor = Evictor::new(max_size, storage.clone(), metrics.clone());
        let scanning = evictor.clone();
        tokio::spawn(async move { scanning.scan().await });
        let manifests = moka::future::Cache::builder()
            .max_capacity(config.memory.as_u64())
            .weigher(|_, m: &Arc<Manifest>| u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX))
            .build();
        let tags = moka::future::Cache::builder().max_capacity(1_000_000).build();
        Arc::new(Cache {
            storage,
            pools,
            config,
            metrics,
            manifests,
            tags,
            manifest_fetches: Default::default(),
            blob_fetches: Default::default(),
            evictor,
            guard_private,
        })
    }

    /// Whether local content for `digest` may be served on `route`: anything an upstream gave
    /// us may; content only pushed here (a private layer) may only once an upstream confirms
    /// it has the same digest, so knowing a private digest is not enough to read it.
    async fn servable(&self, route: &Route, digest: &Digest, kind: &str) -> Result<bool, ProtocolError> {
        if !self.guard_private {
            return Ok(true);
        }
        match marks::is_private(&*self.storage, digest).await {
            Ok(false) => return Ok(true),
            Ok(true) => {}
            Err(e) => return Err(internal("cannot read hosted mark", e)),
        }
        let pool = self.pool(&route.registry)?;
        let req = UpstreamRequest {
            method: Method::HEAD,
            repo: &route.repo,
            path: format!("{kind}/{digest}"),
            accept: accept_or_all(&[]),
            range_from: None,
            capability: Capability::Pull,
            skip: vec![],
        };
        match pool.send(&req).await {
            Ok(_) => {
                if let Err(e) = marks::mark_public(&*self.storage, digest).await {
                    tracing::warn!(%digest, error = %e, "cannot record that a pushed digest is public");
                }
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    fn pool(&self, registry: &str) -> Result<Arc<Pool>, ProtocolError> {
        self.pools.get(registry).cloned().ok_or_else(|| {
            ProtocolError::new(ErrorCode::NameUnknown, format!("registry {registry:?} is not configured"))
        })
    }

    fn count(&self, kind: &str, result: &str) {
        self.metrics.cache_requests.with_label_values(&[kind, result]).inc();
    }

    // ----- manifests -----

    /// A manifest by tag or digest, from memory, disk or the upstreams.
    pub async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
        accept: &[String],
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(route, d, accept).await,
            Reference::Tag(t) => self.manifest_by_tag(route, t, accept).await,
        }
    }

    async fn local_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.get(digest).await {
            return Some(m);
        }
        let record = match self.storage.get_object(&layout::manifest_record(digest)).await {
            Ok(r) => r?,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read manifest record");
                return None;
            }
        };
        let m = Arc::new(decode_manifest(digest, record)?);
        self.manifests.insert(digest.clone(), m.clone()).await;
        Some(m)
    }

    async fn store_manifest(&self, m: &Arc<Manifest>) {
        self.manifests.insert(m.digest.clone(), m.clone()).await;
        let key = layout::manifest_record(&m.digest);
        if let Err(e) = self.storage.put_object(&key, encode_manifest(m)).await {
            self.metrics.cache_write_errors.inc();
            tracing::warn!(digest = %m.digest, error = %e, "manifest served but not persisted");
        }
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        accept: &[String],
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        if let Some(m) = self.local_manifest(digest).await {
            if !self.servable(route, digest, "manifests").await? {
                return Err(ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {digest} not found")));
            }
            self.count("manifest", "hit");
            return Ok((m, Source::Cache));
        }
        let this = self.clone();
        let (route, digest_owned, accept) = (route.clone(), digest.clone(), accept.to_vec());
        let key = format!("{}\n{digest}", route.registry);
        self.coalesce_manifest(key, async move {
            let (m, up) = this
                .fetch_manifest(&route, &Reference::Digest(digest_owned.clone()), &accept, Capability::Pull)
                .await?;
            this.store_manifest(&m).await;
            Ok((m, Source::Upstream(up)))
        })
        .await
    }

    /// Runs `work` once per key at a time; concurrent callers share its result. The work is a
    /// task of its own, so a caller that goes away does not cancel it for the others.
    async fn coalesce_manifest(
        &self,
        key: String,
        work: impl std::future::Future<Output = Result<(Arc<Manifest>, Source), ProtocolError>> + Send + 'static,
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        let (shared, joined) = {
            let mut map = self.manifest_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
            match map.get(&key) {
                Some(s) => (s.clone(), true),
                None => {
                    let map_ref = self.manifest_fetches.clone();
                    let key2 = key.clone();
                    let handle = tokio::spawn(async move {
                        // Removed however the work ends, a panic included: a key left behind
                        // would answer every later request with the same failure.
                        let _done = RemoveOnDrop { map: map_ref, key: key2 };
                        work.await
                    });
                    let shared = async move { handle.await.map_err(|e| internal("manifest fetch task failed", e))? }
                        .boxed()
                        .shared();
                    map.insert(key, shared.clone());
                    (shared, false)
                }
            }
        };
        let (m, source) = shared.await?;
        if joined {
            self.count("manifest", "coalesced");
        }
        Ok((m, source))
    }

    /// GETs a manifest from the upstreams allowed `cap`, reading at most 4 MiB and, by digest,
    /// verifying the bytes; a wrong answer moves on to the next upstream.
    async fn fetch_manifest(
        &self,
        route: &Route,
        reference: &Reference,
        accept: &[String],
        cap: Capability,
    ) -> Result<(Arc<Manifest>, String), ProtocolError> {
        let pool = self.pool(&route.registry)?;
        let accept = accept_or_all(accept);
        let mut req = UpstreamRequest {
            method: Method::GET,
            repo: &route.repo,
            path: format!("manifests/{reference}"),
            accept,
            range_from: None,
            capability: cap,
            skip: vec![],
        };
        let mut tried = Exhausted::default();
        let what = format!("manifest {}:{reference}", route.repo);
        for _ in 0..pool_attempts(&pool) {
            let answer = match pool.send(&req).await {
                Ok(a) => a,
                Err(e) => {
                    tried.tried.extend(e.tried);
                    break;
                }
            };
            let up = answer.upstream.clone();
            match read_manifest(answer, reference).await {
                Ok(m) => {
                    self.count("manifest", "miss");
                    return Ok((Arc::new(m), up.name().to_owned()));
                }
                Err(reason) => {
                    if reason == Reason::DigestMismatch {
                        self.metrics.digest_mismatches.inc();
                    }
                    up.report_failure(&reason);
                    tracing::warn!(upstream = up.name(), %reason, %what, "bad manifest answer; trying the next upstream");
                    req.skip.push(up.name().to_owned());
                    tried.tried.push((up.name().to_owned(), reason));
                }
            }
        }
        Err(tried.into_error(ErrorCode::ManifestUnknown, &what))
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        route: &Route,
        tag: &str,
        accept: &[String],
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        let key = TagKey {
            registry: route.registry.clone(),
            repo: route.repo.clone(),
            tag: tag.to_owned(),
            index: accepts(accept, OCI_INDEX) || accepts(accept, DOCKER_MANIFEST_LIST),
        };
        let entry = self.tag_entry(&key).await;
        if let Some(e) = &entry {
            let fresh = now_secs().saturating_sub(e.validated_at) < self.config.tag_ttl.as_secs();
            if fresh && accepts(accept, &e.media_type) {
                if let Some(m) = self.local_by_str(&e.digest).await {
                    self.count("manifest", "hit");
                    return Ok((m, Source::Cache));
                }
            }
        }
        let this = self.clone();
        let (route, accept) = (route.clone(), accept.to_vec());
        let coalesce_key = format!("{}\n{}\n{}\n{}", key.registry, key.repo, key.tag, key.index);
        self.coalesce_manifest(coalesce_key, async move { this.resolve_tag(&route, key, entry, &accept).await }).await
    }

    async fn local_by_str(&self, digest: &str) -> Option<Arc<Manifest>> {
        let d = Digest::parse(digest).ok()?;
        self.local_manifest(&d).await
    }

    async fn tag_entry(&self, key: &TagKey) -> Option<TagEntry> {
        if let Some(e) = self.tags.get(key).await {
            return Some(e);
        }
        let raw = self.storage.get_object(&key.object_key()).await.ok()??;
        let e = TagEntry::decode(&raw)?;
        self.tags.insert(key.clone(), e.clone()).await;
        Some(e)
    }

    async fn save_tag(&self, key: &TagKey, m: &Manifest) {
        let e = TagEntry { digest: m.digest.to_string(), media_type: m.media_type.clone(), validated_at: now_secs() };
        self.tags.insert(key.clone(), e.clone()).await;
        if let Err(err) = self.storage.put_object(&key.object_key(), e.encode()).await {
            self.metrics.cache_write_errors.inc();
            tracing::warn!(error = %err, "tag mapping not persisted");
        }
    }

    /// Revalidates a known tag with a HEAD (no body moves when the digest is unchanged), or
    /// fetches it; with every upstream down, serves the last known answer as stale.
    async fn resolve_tag(
        &self,
        route: &Route,
        key: TagKey,
        entry: Option<TagEntry>,
        accept: &[String],
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        let local = match &entry {
            Some(e) => self.local_by_str(&e.digest).await,
            None => None,
        };
        if let Some(m) = &local {
            match self.head_tag(route, &key.tag, accept).await {
                Ok(Some(d)) if d == m.digest => {
                    self.save_tag(&key, m).await;
                    self.count("manifest", "hit");
                    return Ok((m.clone(), Source::Revalidated));
                }
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::Unavailable => return self.serve_stale(&key, entry.as_ref(), m, e),
                Err(e) => return Err(e),
            }
        }
        let reference = Reference::Tag(key.tag.clone());
        match self.fetch_manifest(route, &reference, accept, Capability::Resolve).await {
            Ok((m, up)) => {
                self.store_manifest(&m).await;
                self.save_tag(&key, &m).await;
                Ok((m, Source::Upstream(up)))
            }
            Err(e) if e.code == ErrorCode::Unavailable => match &local {
                Some(m) => self.serve_stale(&key, entry.as_ref(), m, e),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn serve_stale(
        &self,
        key: &TagKey,
        entry: Option<&TagEntry>,
        m: &Arc<Manifest>,
        why: ProtocolError,
    ) -> Result<(Arc<Manifest>, Source), ProtocolError> {
        let age = now_secs().saturating_sub(entry.map_or(0, |e| e.validated_at));
        if age > self.config.serve_stale.as_secs() {
            return Err(why);
        }
        // Stale-if-error: a gateway that lost its upstreams keeps serving what it knows.
        tracing::warn!(repo = %key.repo, tag = %key.tag, digest = %m.digest, error = %why.message, "serving stale tag");
        self.count("manifest", "stale");
        Ok((m.clone(), Source::Stale))
    }

    /// The tag's current digest according to the resolve-capable upstreams (`None` if the
    /// upstream answered without a digest header).
    async fn head_tag(&self, route: &Route, tag: &str, accept: &[String]) -> Result<Option<Digest>, ProtocolError> {
        let pool = self.pool(&route.registry)?;
        let accept = accept_or_all(accept);
        let req = UpstreamRequest {
            method: Method::HEAD,
            repo: &route.repo,
            path: format!("manifests/{tag}"),
            accept,
            range_from: None,
            capability: Capability::Resolve,
            skip: vec![],
        };
        let answer = pool
            .send(&req)
            .await
            .map_err(|e| e.into_error(ErrorCode::ManifestUnknown, &format!("manifest {}:{tag}", route.repo)))?;
        Ok(answer
            .response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok()))
    }

    // ----- blobs -----

    /// A blob (or its headers, for HEAD), from disk, an in-progress fetch, or a new fetch.
    pub async fn blob(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobAnswer, ProtocolError> {
        let stored = self.storage.blob_size(digest).await.map_err(|e| internal("cannot stat blob", e))?;
        if let Some(size) = stored {
            if !self.servable(route, digest, "blobs").await? {
                return Err(ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} not found")));
            }
            self.count("blob", "hit");
            self.evictor.touch(digest);
            let span = match range {
                Some(r) => Some(r.resolve(size).ok_or_else(|| unsatisfiable(size))?),
                None => None,
            };
            let body = if head {
                None
            } else {
                let (start, end) = span.map(|(s, e)| (s, e + 1)).unwrap_or((0, size));
                match self.storage.read_blob(digest, start, end).await {
                    Ok(Some(s)) => Some(s),
                    // Evicted between stat and open: fetch it again.
                    Ok(None) => return Box::pin(self.fetch_blob(route, digest, range)).await,
                    Err(e) => return Err(internal("cannot read blob", e)),
                }
            };
            return Ok(BlobAnswer { size: Some(size), range: span, body, source: Source::Cache });
        }
        if head {
            return self.head_blob(route, digest).await;
        }
        self.fetch_blob(route, digest, range).await
    }

    async fn head_blob(&self, route: &Route, digest: &Digest) -> Result<BlobAnswer, ProtocolError> {
        let pool = self.pool(&route.registry)?;
        let req = UpstreamRequest {
            method: Method::HEAD,
            repo: &route.repo,
            path: format!("blobs/{digest}"),
            accept: vec![],
            range_from: None,
            capability: Capability::Pull,
            skip: vec![],
        };
        let answer =
            pool.send(&req).await.map_err(|e| e.into_error(ErrorCode::BlobUnknown, &format!("blob {digest}")))?;
        // Not `content_length()`: reqwest reports the (empty) body of a HEAD answer there.
        let size = answer
            .response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(BlobAnswer { size, range: None, body: None, source: Source::Upstream(answer.upstream.name().to_owned()) })
    }

    async fn fetch_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobAnswer, ProtocolError> {
        let (fetch, relay, joined) = self.join_or_start(route, digest).await?;
        self.count("blob", if joined { "coalesced" } else { "miss" });
        let mut rx = fetch.progress.clone();
        let progress = rx
            .wait_for(|p| p.ready || p.done.is_some())
            .await
            .map_err(|_| internal("blob fetch ended unexpectedly", digest))?
            .clone();
        if let Some(Err(e)) = progress.done {
            return Err(e);
        }
        if progress.done.is_some() && progress.written == 0 && !progress.ready {
            return Err(internal("blob fetch ended without data", digest));
        }
        let size = progress.total;
        let span = match (range, size) {
            (Some(r), Some(size)) => Some(r.resolve(size).ok_or_else(|| unsatisfiable(size))?),
            _ => None,
        };
        let (start, end) = match span {
            Some((s, e)) => (s, Some(e + 1)),
            None => (0, None),
        };
        Ok(BlobAnswer {
            size,
            range: span,
            body: Some(tail_stream(fetch, relay, start, end)),
            source: Source::Upstream(progress.upstream),
        })
    }

    /// Joins the fetch in progress for `digest`, or starts one. The relay receiver is taken
    /// here, before any byte can be relayed, so a reader never misses relayed bytes it needs.
    async fn join_or_start(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
    ) -> Result<(Arc<BlobFetch>, tokio::sync::broadcast::Receiver<Relayed>, bool), ProtocolError> {
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
        let (relay, relay_rx) = tokio::sync::broadcast::channel(RELAY_CAPACITY);
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
            let guard = FetchGuard { cache: this.clone(), digest: digest.clone(), me: me.clone(), tx };
            let result = this.run_fetch(&pool, &repo, &digest, staged.as_ref(), &guard.tx, &me.relay).await;
            let cacheable = guard.tx.borrow().relay_from.is_none();
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
                match this.storage.commit(staged, &digest).await {
                    Ok(()) => committed = Some(size),
                    Err(e) => {
                        this.metrics.cache_write_errors.inc();
                        tracing::warn!(%digest, error = %e, "blob served but not cached");
                    }
                }
            }
            // Leaves the map only now: a newcomer before the commit joins this verified fetch,
            // one after it finds the blob on disk.
            drop(guard);
            if let Some(size) = committed {
                this.evictor.added(&digest, size).await;
            }
        });
        Ok((fetch, relay_rx, false))
    }

    /// A fetch in progress that can still be joined: one that is writing to disk. One that is
    /// relaying (the disk refused it) cannot give a newcomer the bytes already relayed.
    #[allow(clippy::type_complexity)]
    fn try_join(
        &self,
        digest: &Digest,
    ) -> Result<Option<(Arc<BlobFetch>, tokio::sync::broadcast::Receiver<Relayed>, bool)>, ProtocolError> {
        let map = self.blob_fetches.lock().map_err(|e| internal("lock poisoned", e))?;
        Ok(map
            .get(digest)
            .filter(|f| f.progress.borrow().relay_from.is_none())
            .map(|f| (f.clone(), f.relay.subscribe(), true)))
    }

    /// Streams the blob into the staging file from the first upstream that can, resuming with
    /// `Range` (or re-reading and discarding) when a stream breaks, then verifies the digest.
    async fn run_fetch(
        &self,
        pool: &Pool,
        repo: &RepoName,
        digest: &Digest,
        staged: Option<&Arc<Staged>>,
        tx: &watch::Sender<Progress>,
        relay: &tokio::sync::broadcast::Sender<Relayed>,
    ) -> Result<u64, ProtocolError> {
        let what = format!("blob {digest}");
        let mut hasher = DigestVerifier::new();
        let mut written: u64 = 0;
        let mut total: Option<u64> = None;
        let mut tried = Exhausted::default();
        let mut req = UpstreamRequest {
            method: Method::GET,
            repo,
            path: format!("blobs/{digest}"),
            accept: vec![],
            range_from: None,
            capability: Capability::Pull,
            skip: vec![],
        };
        let mut last_upstream = None;
        // In relay mode the newest batch is held back until the digest is verified, so a
        // corrupt blob never reaches a client complete.
        let mut held: Option<Relayed> = None;
        for _ in 0..pool_attempts(pool) {
            req.range_from = (written > 0).then_some(written);
            let Answer { upstream, response } = match pool.send(&req).await {
                Ok(a) => a,
                Err(e) => {
                    tried.tried.extend(e.tried);
                    break;
                }
            };
            let name = upstream.name().to_owned();
            let (body_start, body_total) = match body_span(&response) {
                Some(span) => span,
                None => {
                    let reason = Reason::Body("unusable Content-Range".into());
                    upstream.report_failure(&reason);
                    req.skip.push(name.clone());
                    tried.tried.push((name, reason));
                    continue;
                }
            };
            if body_start > written || (total.is_some() && body_total.is_some() && total != body_total) {
                let reason = Reason::Body("answer does not continue the bytes already received".into());
                upstream.report_failure(&reason);
                req.skip.push(name.clone());
                tried.tried.push((name, reason));
                continue;
            }
            total = total.or(body_total);
            tx.send_modify(|p| {
                p.ready = true;
                p.total = total;
                p.upstream = name.clone();
            });
            let mut discard = written - body_start;
            let mut body = response.bytes_stream();
            let outcome: Result<(), Reason> = loop {
                let mut batch: Vec<Bytes> = Vec::new();
                let mut batch_len = 0usize;
                let mut ended = false;
                let mut broke = None;
                match body.next().await {
                    None => ended = true,
                    Some(Err(e)) => broke = Some(Reason::Body(error_chain(&e))),
                    Some(Ok(b)) => {
                        batch_len += b.len();
                        batch.push(b);
                    }
                }
                // Take whatever else has already arrived, so the disk sees few large writes.
                while !ended && broke.is_none() && batch_len < 4 * READ_CHUNK {
                    match body.next().now_or_never() {
                        Some(Some(Ok(b))) => {
                            batch_len += b.len();
                            batch.push(b);
                        }
                        Some(Some(Err(e))) => broke = Some(Reason::Body(error_chain(&e))),
                        Some(None) => ended = true,
                        None => break,
                    }
                }
                self.metrics.upstream_bytes.with_label_values(&[&name]).inc_by(batch_len as u64);
                // Bytes the client already has (a resumed answer that restarted from zero).
                while discard > 0 && !batch.is_empty() {
                    let first = &mut batch[0];
                    if (first.len() as u64) <= discard {
                        discard -= first.len() as u64;
                        batch.remove(0);
                    } else {
                        *first = first.slice(discard as usize..);
                        discard = 0;
                    }
                }
                let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
                if total.is_some_and(|t| written + len > t) {
                    break Err(Reason::Body("more bytes than announced".into()));
                }
                if len > 0 {
                    let relay_from = tx.borrow().relay_from;
                    match (relay_from, staged) {
                        (None, Some(staged)) => {
                            let s = staged.clone();
                            let at = written;
                            let mut h = std::mem::take(&mut hasher);
                            let kept = batch.clone();
                            // Hash and write on the blocking pool: the bytes move there, no copy.
                            let (h, res) = tokio::task::spawn_blocking(move || {
                                for b in &kept {
                                    h.update(b);
                                }
                                let res = s.write_all_at(&kept, at);
                                (h, res)
                            })
                            .await
                            .map_err(|e| internal("hash task failed", e))?;
                            hasher = h;
                            match res {
                                Ok(()) => {
                                    written += len;
                                    tx.send_modify(|p| p.written = written);
                                }
                                Err(e) => {
                                    // Disk full or failing: keep serving the clients already
                                    // here from memory; this blob will not be cached.
                                    self.metrics.cache_write_errors.inc();
                                    tracing::warn!(error = %e, at = written, "staging write failed; streaming the rest uncached");
                                    tx.send_modify(|p| p.relay_from = Some(written));
                                    // The batch was hashed already: relay it without hashing again.
                                    held = relay_batch(relay, held.take(), written, batch);
                                    written += len;
                                    tx.send_modify(|p| p.written = written);
                                }
                            }
                        }
                        _ => {
                            for b in &batch {
                                hasher.update(b);
                            }
                            held = relay_batch(relay, held.take(), written, batch);
                            written += len;
                            tx.send_modify(|p| p.written = written);
                        }
                    }
                }
                if let Some(reason) = broke {
                    break Err(reason);
                }
                if ended {
                    break match total {
                        Some(t) if written < t => Err(Reason::Body(format!("closed after {written} of {t} bytes"))),
                        _ => Ok(()),
                    };
                }
            };
            match outcome {
                Ok(()) => {
                    last_upstream = Some(upstream);
                    break;
                }
                Err(reason) => {
                    tracing::warn!(upstream = %name, %reason, written, "blob stream broke; resuming");
                    upstream.report_failure(&reason);
                    self.metrics.upstream_failovers.with_label_values(&[pool.registry(), &name, reason.label()]).inc();
                    req.skip.push(name.clone());
                    tried.tried.push((name, reason));
                }
            }
        }
        let Some(upstream) = last_upstream else {
            return Err(tried.into_error(ErrorCode::BlobUnknown, &what));
        };
        let got = hasher.finish();
        if got != *digest {
            self.metrics.digest_mismatches.inc();
            let resumed = !tried.tried.is_empty() && written > 0;
            if resumed {
                // Bytes came from more than one upstream: which one lied is unknown, so none is
                // benched at once; each gets an ordinary failure.
                let reason = Reason::Body("digest mismatch in a resumed blob".into());
                upstream.report_failure(&reason);
                for (name, _) in &tried.tried {
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
        if let Some(last) = held {
            // Nobody listening is fine: every reader may have gone.
            let _ = relay.send(last);
        }
        Ok(written)
    }
}

/// Removes a manifest fetch's key when its task ends, however it ends.
struct RemoveOnDrop {
    map: Arc<Mutex<HashMap<String, SharedManifest>>>,
    key: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&self.key);
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

/// Queues `batch` (at `offset`) as the held-back batch and relays the previous one.
fn relay_batch(
    relay: &tokio::sync::broadcast::Sender<Relayed>,
    previous: Option<Relayed>,
    offset: u64,
    batch: Vec<Bytes>,
) -> Option<Relayed> {
    if let Some(prev) = previous {
        let _ = relay.send(prev);
    }
    let joined: Bytes =
        if batch.len() == 1 { batch.into_iter().next().unwrap_or_default() } else { batch.concat().into() };
    Some((offset, joined))
}

/// Attempts one piece of work may make: each upstream twice (a resume may return to the
/// same one), plus one; bounded whatever the upstreams do.
fn pool_attempts(pool: &Pool) -> usize {
    2 * pool.len() + 1
}

/// Where an upstream's body starts and the blob's full size, from a 200 or a 206.
fn body_span(resp: &reqwest::Response) -> Option<(u64, Option<u64>)> {
    if resp.status() != http::StatusCode::PARTIAL_CONTENT {
        return Some((0, resp.content_length()));
    }
    let cr = resp.headers().get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let spec = cr.trim().strip_prefix("bytes ")?;
    let (span, total) = spec.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()))
}

/// Reads a manifest body (bounded) and checks it against the digest it was asked by.
async fn read_manifest(answer: Answer, reference: &Reference) -> Result<Manifest, Reason> {
    let resp = answer.response;
    if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
        return Err(Reason::Body(format!("manifest larger than {MAX_MANIFEST_BYTES} bytes")));
    }
    let header_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let buf = crate::upstream::read_bounded(resp, MAX_MANIFEST_BYTES).await?;
    let bytes = Bytes::from(buf);
    let digest = Digest::of(&bytes);
    if let Reference::Digest(want) = reference {
        if *want != digest {
            return Err(Reason::DigestMismatch);
        }
    }
    let media_type = header_type
        .filter(|t| !t.is_empty() && !t.contains('\n'))
        .or_else(|| sniff_media_type(&bytes))
        .unwrap_or_else(|| "application/json".to_owned());
    Ok(Manifest { digest, media_type, bytes })
}

fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type
}

/// Streams `start..end` of an in-progress (or finished) fetch as the bytes become available.
/// The final byte waits for the digest verdict; a failed fetch ends the stream with an error,
/// which aborts the client's response instead of completing it. When the disk refused the
/// blob, the bytes past what reached the staging file come from the in-memory relay.
fn tail_stream(
    fetch: Arc<BlobFetch>,
    relay: tokio::sync::broadcast::Receiver<Relayed>,
    start: u64,
    end: Option<u64>,
) -> ByteStream {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let rx = fetch.progress.clone();
    stream::try_unfold((fetch, rx, relay, start), move |(fetch, mut rx, mut relay, pos)| async move {
        loop {
            let (written, done, relay_from) = {
                let p = rx.borrow_and_update();
                (p.written, p.done.clone(), p.relay_from)
            };
            let verified = match done {
                Some(Err(e)) => return Err(io::Error::other(e.message)),
                Some(Ok(())) => true,
                None => false,
            };
            if verified && pos >= end.unwrap_or(written) {
                return Ok(None);
            }
            let file_limit = match relay_from {
                Some(r) => r,
                None if verified => written,
                None => written.saturating_sub(1),
            };
            let limit = end.map_or(file_limit, |e| e.min(file_limit));
            if pos < limit {
                let Some(staged) = fetch.staged.clone() else {
                    return Err(io::Error::other("no staging file to read"));
                };
                let len = (limit - pos).min(READ_CHUNK as u64) as usize;
                let chunk =
                    tokio::task::spawn_blocking(move || staged.read_at(pos, len)).await.map_err(io::Error::other)??;
                if chunk.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "staging file shorter than published"));
                }
                let next = pos + chunk.len() as u64;
                return Ok(Some((chunk, (fetch, rx, relay, next))));
            }
            if relay_from.is_some_and(|r| pos >= r) {
                let msg = if verified {
                    // Everything was relayed before the verdict: it is queued or lost.
                    match relay.try_recv() {
                        Ok(m) => Ok(m),
                        Err(TryRecvError::Lagged(_)) => Err(RecvError::Lagged(0)),
                        Err(_) => Err(RecvError::Closed),
                    }
                } else {
                    tokio::select! {
                        m = relay.recv() => m,
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return Err(io::Error::other("blob fetch ended without a verdict"));
                            }
                            continue;
                        }
                    }
                };
                let (off, bytes) = match msg {
                    Ok(m) => m,
                    Err(RecvError::Lagged(_)) => {
                        return Err(io::Error::other("client too slow for an uncached (disk full) stream"))
                    }
                    Err(RecvError::Closed) => return Err(io::Error::other("relayed bytes missing")),
                };
                let chunk_end = off + bytes.len() as u64;
                if chunk_end <= pos {
                    continue;
                }
                if off > pos {
                    return Err(io::Error::other("relayed bytes missing"));
                }
                let mut piece = bytes.slice((pos - off) as usize..);
                if let Some(e) = end {
                    piece.truncate(usize::try_from(e - pos).unwrap_or(usize::MAX));
                }
                let next = pos + piece.len() as u64;
                return Ok(Some((piece, (fetch, rx, relay, next))));
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("blob fetch ended without a verdict"));
            }
        }
    })
    .boxed()
}

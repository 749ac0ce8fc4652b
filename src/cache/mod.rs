//! The cache: manifests (moka in memory, records on disk), tag→digest mappings with a TTL, and
//! the blob fetcher that turns any number of concurrent misses into one upstream fetch.
//!
//! * `manifests`: manifests by digest and by tag, revalidation, stale-if-error.
//! * `coalesce`: the manifest single-flight (one upstream fetch per key at a time).
//! * `blobs`: blob hits, HEAD, and misses joining a fetch.
//! * `fetch`: the blob fetch task (attempt, copy, verify) and how readers join it.
//! * `ring`: the bounded ring of recent frames a fetch shares with its readers.
//! * `writer`: hashes and stages a fetch's bytes, one batch in flight.
//! * `tail`: the reader that follows a fetch in progress.
//! * `forget`: `ferry cache forget` (tags dropped on every replica).
//! * `peer`: with a cluster, a fetch another replica owns, streamed from it (and the owner's
//!   answer to such requests).
//! * [`eviction`](Evictor), [`admin`], [`clock`](Clock).
//!
//! A blob fetch is a task of its own, owned by no client. It puts each batch of body frames in
//! a bounded ring and publishes how many bytes it received; every client (the first one
//! included) sends those same frames, and only one that fell behind the ring reads the staging
//! file the writer fills (hashing as it goes, overlapped with receiving). The last byte is held
//! back until the digest is verified, so a corrupt fetch aborts every response rather than
//! completing it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::Method;

use crate::cluster::Cluster;
use crate::config::{CacheConfig, Capability};
use crate::distribution::{accept_or_all, internal, Digest, ErrorCode, Manifest, ProtocolError};
use crate::metrics::Metrics;
use crate::registry::Route;
use crate::storage::records::TagEntry;
use crate::storage::{marks, Storage};
use crate::upstream::{Pool, UpstreamRequest};

pub mod admin;
mod blobs;
mod clock;
mod coalesce;
mod eviction;
mod fetch;
mod forget;
mod manifests;
mod peer;
mod ring;
mod tail;
#[cfg(test)]
mod tests;
mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use eviction::Evictor;
pub use fetch::RingBounds;
pub use forget::Forgotten;
pub use ring::RingBudget;

use coalesce::ManifestFlights;
use fetch::BlobFetch;
use manifests::TagKey;

/// The cache over a set of registries' upstream pools.
pub struct Cache {
    storage: Arc<dyn Storage>,
    pools: HashMap<String, Arc<Pool>>,
    config: CacheConfig,
    /// `cache.tag_policies`, compiled.
    policies: Vec<(glob::Pattern, std::time::Duration)>,
    metrics: Arc<Metrics>,
    /// Judges tag freshness (`tag_ttl`) and staleness (`serve_stale`).
    clock: Arc<dyn Clock>,
    manifests: moka::future::Cache<Digest, Arc<Manifest>>,
    tags: moka::future::Cache<TagKey, TagEntry>,
    manifest_fetches: ManifestFlights,
    blob_fetches: Arc<Mutex<HashMap<Digest, Arc<BlobFetch>>>>,
    evictor: Arc<Evictor>,
    /// Hosted namespaces exist: local content may be private and needs a check before the
    /// proxied side serves it.
    guard_private: bool,
    /// Largest blob fetched (`limits.max_blob_size`).
    max_blob_size: u64,
    /// What fetches keep in memory for their readers.
    ring: RingBounds,
    /// Blob sizes that manifests Ferry holds declare: a fetch never takes more than that.
    declared: moka::future::Cache<Digest, u64>,
    /// The other replicas, when there are (one fetch and one tag flight across all).
    cluster: Option<Arc<Cluster>>,
}

/// What the cache reports to, reads time from, and coordinates with.
pub struct Services {
    /// Every exported series.
    pub metrics: Arc<Metrics>,
    /// Judges tag freshness (`tag_ttl`) and staleness (`serve_stale`): [`SystemClock`] in a
    /// running Ferry.
    pub clock: Arc<dyn Clock>,
    /// The cluster this replica is part of, if any.
    pub cluster: Option<Arc<Cluster>>,
}

/// How much the cache may hold: cached blobs in total, one blob, and fetches in memory.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// `storage.max_size`: cached blobs (and fetches in progress) together; `None`: unbounded.
    pub max_size: Option<u64>,
    /// `limits.max_blob_size`.
    pub max_blob_size: u64,
    /// `limits.fetch_ring` and `limits.fetch_ring_total`.
    pub ring: RingBounds,
}

/// Sizes remembered from manifests (an entry is ~100 bytes).
const DECLARED_CAPACITY: u64 = 200_000;

impl Cache {
    /// A cache over `storage`, fetching through `pools` (one per configured registry), keeping
    /// cached blobs within `bounds`, with `services`. With `guard_private` (hosted namespaces share the store), content only
    /// pushed here is not served on proxied paths. Must be called inside a Tokio runtime: the
    /// inventory of blobs already on disk is loaded in the background.
    pub fn new(
        storage: Arc<dyn Storage>,
        pools: HashMap<String, Arc<Pool>>,
        config: CacheConfig,
        bounds: Bounds,
        guard_private: bool,
        services: Services,
    ) -> Arc<Cache> {
        let Services { metrics, clock, cluster } = services;
        let evictor = Evictor::new(bounds.max_size, storage.clone(), metrics.clone(), cluster.clone());
        let scanning = evictor.clone();
        tokio::spawn(async move { scanning.scan().await });
        let manifests = moka::future::Cache::builder()
            .max_capacity(config.memory.as_u64())
            .weigher(|_, m: &Arc<Manifest>| u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX))
            .build();
        // Invalidation closures: `ferry cache forget` drops every tag of a repository.
        let tags = moka::future::Cache::builder().max_capacity(1_000_000).support_invalidation_closures().build();
        // Validated with the configuration; a glob that does not compile matches nothing.
        let policies = config.compiled_policies().unwrap_or_default();
        let invalidations = cluster.as_ref().map(|c| c.invalidations());
        let cache = Arc::new(Cache {
            storage,
            pools,
            policies,
            config,
            metrics,
            clock,
            manifests,
            tags,
            manifest_fetches: Default::default(),
            blob_fetches: Default::default(),
            evictor,
            guard_private,
            max_blob_size: bounds.max_blob_size,
            ring: bounds.ring,
            declared: moka::future::Cache::new(DECLARED_CAPACITY),
            cluster,
        });
        if let Some(rx) = invalidations {
            forget::follow(&cache, rx);
        }
        cache
    }

    /// Whether local content for `digest` may be served on `route`: anything an upstream gave
    /// us may; content only pushed here (a private layer) may only once a resolve-capable
    /// upstream confirms it has the same digest, so knowing a private digest is not enough to
    /// read it. A `pull`-only mirror is untrusted: its 200 to a HEAD proves nothing.
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
        let req = UpstreamRequest::new(Method::HEAD, &route.repo, format!("{kind}/{digest}"), Capability::Resolve)
            .with_accept(accept_or_all(&[]));
        match pool.attempts(req).next().await {
            Some(_) => {
                if let Err(e) = marks::mark_public(&*self.storage, digest).await {
                    tracing::warn!(%digest, error = %e, "cannot record that a pushed digest is public");
                }
                Ok(true)
            }
            None => Ok(false),
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
}

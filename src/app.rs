//! The composition root: one [`App`] built from a validated [`Config`] — storage, upstream
//! pools, credentials, hosted namespaces, the cache and the router — shared by every listener
//! as an `Arc<App>`. Nothing here knows HTTP; `crate::http` answers requests with it.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::auth::Auth;
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::config::{ChallengeKind, Config};
use crate::hosted::Hosted;
use crate::metrics::Metrics;
use crate::pull_policy::PullPolicy;
use crate::registry::Router;
use crate::storage::{Metered, Storage};
use crate::upstream::Pool;

/// Everything a request handler needs.
pub struct App {
    /// Hosted namespaces and mirrored registries: who answers a name.
    pub router: Router,
    /// What may be pulled through each mirrored registry.
    pub pull_policy: PullPolicy,
    /// Proxied manifests and blobs.
    pub cache: Arc<Cache>,
    /// Every exported series.
    pub metrics: Arc<Metrics>,
    /// The content store (probed by `/readyz`).
    pub storage: Arc<dyn Storage>,
    /// Client credentials (when `hosted.htpasswd` is set).
    pub auth: Option<Arc<Auth>>,
    /// Private namespaces (when `hosted.namespaces` is not empty).
    pub hosted: Option<Arc<Hosted>>,
    /// How 401s challenge clients.
    pub challenge: ChallengeKind,
    /// Configured token endpoint URL, if any (else derived from the request).
    pub token_realm: Option<String>,
    /// `https` with TLS, else `http` (for the derived token realm).
    pub scheme: &'static str,
    /// The other replicas (`cluster:`), if any.
    pub cluster: Option<Arc<Cluster>>,
}

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened.
    #[error("storage.root {path}: {err}")]
    Storage {
        /// The configured root.
        path: String,
        /// Cause.
        err: io::Error,
    },
    /// An upstream could not be set up.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::BuildError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The listener could not bind.
    #[error("listen {addr}: {err}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        err: io::Error,
    },
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS certificate or key could not be loaded.
    #[error("{0}")]
    Tls(String),
    /// The htpasswd file could not be loaded.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The cluster section could not be set up.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl App {
    /// Builds the application from a validated config: opens storage, builds upstream clients.
    /// No upstream is contacted: Ferry starts and serves its cache with every upstream down.
    pub fn new(config: &Config) -> Result<Arc<App>, StartError> {
        let metrics = Arc::new(Metrics::new()?);
        let storage: Arc<dyn Storage> = Arc::new(Metered::new(open_storage(config)?, metrics.clone()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(report_abandoned_uploads(storage.clone()));
        }
        let mut pools = HashMap::new();
        for (name, reg) in &config.registries {
            pools.insert(name.clone(), Arc::new(Pool::new(name, reg, metrics.clone())?));
        }
        let cluster = match &config.cluster {
            Some(c) => Some(Cluster::new(c, metrics.clone())?),
            None => None,
        };
        let auth = Auth::from_config(&config.hosted)?
            .map(|a| match &cluster {
                Some(c) => a.with_token_key(c.token_key()),
                None => a,
            })
            .map(Arc::new);
        let hosted = match &auth {
            Some(auth) if !config.hosted.namespaces.is_empty() => {
                let hosted = Hosted::in_cluster(
                    storage.clone(),
                    auth.clone(),
                    config.hosted.clone(),
                    config.limits.max_upload_sessions_per_user,
                    cluster.clone(),
                );
                // Abandoned uploads are purged in the background (when there is a runtime).
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(hosted.clone().purge_uploads_forever());
                }
                Some(hosted)
            }
            _ => None,
        };
        // Names are hosted only when a hosted registry serves them: without one they route
        // to the mirrored registries like any other name.
        let hosted_namespaces = hosted.as_ref().map(|h| h.namespaces().to_vec()).unwrap_or_default();
        let router =
            Router::new(config.registries.keys().cloned(), &config.default_registry).with_hosted(hosted_namespaces);
        let bounds = crate::cache::Bounds {
            max_size: config.storage.max_size.map(|s| s.as_u64()),
            max_blob_size: config.limits.max_blob_size.as_u64(),
            ring: crate::cache::RingBounds {
                per_fetch: config.limits.fetch_ring.as_u64(),
                budget: crate::cache::RingBudget::new(config.limits.fetch_ring_total.as_u64()),
            },
        };
        let services = crate::cache::Services {
            metrics: metrics.clone(),
            clock: Arc::new(crate::cache::SystemClock),
            cluster: cluster.clone(),
        };
        let cache = Cache::new(storage.clone(), pools, config.cache.clone(), bounds, hosted.is_some(), services);
        Ok(Arc::new(App {
            router,
            pull_policy: PullPolicy::new(&config.registries),
            cache,
            metrics,
            storage,
            auth,
            hosted,
            challenge: config.hosted.challenge,
            token_realm: config.hosted.token_realm.clone(),
            scheme: if config.tls.is_some() { "https" } else { "http" },
            cluster,
        }))
    }
}

/// Says at start-up whether a crash left multipart uploads in the bucket (older than a day, so
/// none of a live replica's): `ferry cache verify` aborts them, the lifecycle rule too.
async fn report_abandoned_uploads(storage: Arc<dyn Storage>) {
    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    if let Ok(Some(keys)) = storage.abandoned_uploads(DAY, false).await {
        if !keys.is_empty() {
            tracing::warn!(
                uploads = keys.len(),
                "incomplete multipart uploads older than a day in the bucket: `ferry cache verify` aborts them \
                 (or set the AbortIncompleteMultipartUpload lifecycle rule)"
            );
        }
    }
}

/// Opens the store (`storage.root`, or the bucket) and removes what a previous run left
/// half-written.
fn open_storage(config: &Config) -> Result<Arc<dyn Storage>, StartError> {
    let storage_err = |err| StartError::Storage { path: config.storage.root.display().to_string(), err };
    let mapped = config.storage.mmap_hits && config.tls.is_none();
    crate::storage::open(&config.storage, mapped, true).map_err(storage_err)
}

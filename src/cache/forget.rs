//! `ferry cache forget IMAGE[:TAG]`: drops what Ferry knows about a proxied tag (or every tag
//! of a repository), so the next pull asks the upstream again. Manifests and blobs stay: they
//! are content-addressed and cannot be wrong. The stored tag records go first (with a cluster
//! they are in the shared bucket), then every replica's memory tier, through
//! `cluster::invalidate` (this replica's too, directly, in case Redis does not answer).

use std::io;
use std::sync::{Arc, Weak};

use tokio::sync::mpsc;

use super::Cache;
use crate::cluster::invalidate::Invalidation;
use crate::registry::Route;
use crate::storage::layout;

/// What a forget did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Forgotten {
    /// Stored tag records removed (a tag has up to two: for clients that accept an index, and
    /// for those that do not).
    pub records: usize,
    /// Whether the other replicas were told (always `true` without a cluster: there are none).
    pub every_replica: bool,
}

impl Cache {
    /// Forgets `tag` of `route`'s repository, or every tag of it.
    pub async fn forget(&self, route: &Route, tag: Option<&str>) -> io::Result<Forgotten> {
        let keys = match tag {
            Some(t) => vec![
                layout::tag_entry(&route.registry, &route.repo, t, true),
                layout::tag_entry(&route.registry, &route.repo, t, false),
            ],
            None => self.storage.list_objects(&layout::repo_tags_prefix(&route.registry, &route.repo)).await?,
        };
        let mut records = 0;
        for key in keys {
            if self.storage.delete_object(&key).await? {
                records += 1;
            }
        }
        let inv = Invalidation::Tags {
            registry: route.registry.clone(),
            repo: route.repo.to_string(),
            tag: tag.map(str::to_owned),
        };
        self.drop_from_memory(&inv);
        let every_replica = match &self.cluster {
            Some(cluster) => cluster.publish(&inv).await,
            None => true,
        };
        tracing::info!(registry = %route.registry, repo = %route.repo, tag = tag.unwrap_or("*"), records, every_replica, "tags forgotten");
        Ok(Forgotten { records, every_replica })
    }

    /// Drops the tags `inv` names from this replica's memory tier.
    fn drop_from_memory(&self, inv: &Invalidation) {
        match inv.clone() {
            Invalidation::Everything => self.tags.invalidate_all(),
            Invalidation::Tags { registry, repo, tag } => {
                let dropped = self.tags.invalidate_entries_if(move |k, _| {
                    k.registry == registry && k.repo.as_str() == repo && tag.as_ref().is_none_or(|t| *t == k.tag)
                });
                if let Err(e) = dropped {
                    // Only if the cache was built without closures: then drop every tag.
                    tracing::warn!(error = %e, "cannot drop single tags; dropping every tag from memory");
                    self.tags.invalidate_all();
                }
            }
        }
    }
}

/// Applies the invalidations other replicas publish, for as long as the cache lives.
pub(super) fn follow(cache: &Arc<Cache>, mut rx: mpsc::Receiver<Invalidation>) {
    let weak: Weak<Cache> = Arc::downgrade(cache);
    tokio::spawn(async move {
        while let Some(inv) = rx.recv().await {
            let Some(cache) = weak.upgrade() else { return };
            cache.drop_from_memory(&inv);
        }
    });
}

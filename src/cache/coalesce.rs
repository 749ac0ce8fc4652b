//! The manifest single-flight: concurrent misses for the same manifest (or tag) share one
//! upstream fetch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::distribution::{internal, Manifest, ProtocolError, Source};

/// What a manifest fetch ends with; cloned to every caller that shared it.
pub(super) type Outcome = Result<(Arc<Manifest>, Source), ProtocolError>;

type SharedOutcome = Shared<BoxFuture<'static, Outcome>>;

/// The manifest fetches in flight, by key (registry and digest, or registry, repository, tag
/// and index-ness).
#[derive(Default)]
pub(super) struct ManifestFlights {
    flights: Arc<Mutex<HashMap<String, SharedOutcome>>>,
}

impl ManifestFlights {
    /// Runs `work` once per key at a time; concurrent callers share its result, and `true`
    /// says this caller joined a flight already on. The work is a task of its own, so a caller
    /// that goes away does not cancel it for the others.
    pub(super) async fn run(
        &self,
        key: String,
        work: impl Future<Output = Outcome> + Send + 'static,
    ) -> (Outcome, bool) {
        let (shared, joined) = {
            let mut map = match self.flights.lock() {
                Ok(m) => m,
                Err(e) => return (Err(internal("lock poisoned", e)), false),
            };
            match map.get(&key) {
                Some(s) => (s.clone(), true),
                None => {
                    let done = RemoveOnDrop { flights: self.flights.clone(), key: key.clone() };
                    let handle = tokio::spawn(async move {
                        // Removed however the work ends, a panic included: a key left behind
                        // would answer every later request with the same failure.
                        let _done = done;
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
        (shared.await, joined)
    }
}

/// Removes a manifest fetch's key when its task ends, however it ends.
struct RemoveOnDrop {
    flights: Arc<Mutex<HashMap<String, SharedOutcome>>>,
    key: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Ok(mut m) = self.flights.lock() {
            m.remove(&self.key);
        }
    }
}

impl super::Cache {
    /// With a cluster, the one flight for `what` across replicas: while another replica's
    /// flight runs, waits (at most two lease TTLs) and serves what it stored, which
    /// `answered` reads from the shared store. `Ok(lease)`: do the flight here, holding the
    /// lease until it ends (`None`: no cluster, Redis down, or the wait ran out).
    pub(super) async fn across_cluster<F, Fut>(
        &self,
        what: &str,
        answered: F,
    ) -> Result<Option<crate::cluster::Lease>, Arc<Manifest>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Option<Arc<Manifest>>>,
    {
        use crate::cluster::Claim;
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let key = crate::cluster::lease::flight_key(what);
        let deadline = std::time::Instant::now() + cluster.lease_ttl() * 2;
        loop {
            if let Some(m) = answered().await {
                return Err(m);
            }
            match cluster.claim(key.clone()).await {
                Claim::Owner(lease) => {
                    // The last flight may have stored its answer between the look and the claim.
                    return match answered().await {
                        Some(m) => Err(m),
                        None => Ok(Some(lease)),
                    };
                }
                Claim::Alone => return Ok(None),
                Claim::Held(_) if std::time::Instant::now() >= deadline => return Ok(None),
                Claim::Held(_) => tokio::time::sleep(cluster.poll_interval()).await,
            }
        }
    }
}

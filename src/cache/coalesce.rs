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

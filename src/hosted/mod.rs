//! Private namespaces: a conforming OCI registry (distribution-spec 1.1) for repositories under
//! `hosted.namespaces`, on the same port and the same content-addressed blob store as the cache.
//!
//! What it keeps in storage (links, tags, referrers, marks) is laid out in
//! [`crate::storage::layout`].
//!
//! Per-repository links (as in Distribution) keep one team's private layer unreadable through
//! another repository even though the bytes are stored once. Repository components start with
//! `[a-z0-9]`, so the `_`-prefixed link directories can never collide with a nested repository.
//!
//! Ordering makes partial states invisible: bytes are committed before the links that make them
//! reachable, the mark before the blob (so eviction never sees an unmarked hosted blob), and a
//! tag moves last, after everything it points to is stored.
//!
//! Upload sessions live in memory (their data in staging files, never whole in memory, closed
//! between requests so an idle session holds no descriptor); a restart forgets them, which
//! clients see as `BLOB_UPLOAD_UNKNOWN` and answer by re-uploading. They are bounded per
//! process and per user, so one user with push rights cannot take them all. On a replica of a
//! cluster they live in Redis and the bucket instead, so every replica shares them.
//!
//! Every write that makes content reachable claims (or refreshes) the digest's mark first and
//! only then looks at what is stored, so a concurrent `gc` either sees the content young or has
//! already deleted it (and the push commits its own copy).
//!
//! * this file: the [`Hosted`] registry, the access decision and dispatch, storage helpers;
//! * `manifests`: manifests, their parsing and validation;
//! * `blobs`: reading and unlinking blobs;
//! * `uploads`: upload sessions, chunks and cross-repository mounts;
//! * `shared_uploads`: the sessions of a cluster, in Redis with their chunks in the bucket;
//! * `discovery`: tag lists, referrers and the catalog;
//! * `gc`: `ferry gc`, which sweeps what no manifest references;
//! * `tests` (tests only): whole requests through [`Hosted::handle`], races included.

mod blobs;
mod discovery;
mod gc;
mod manifests;
mod shared_uploads;
#[cfg(test)]
mod tests;
mod uploads;

pub use gc::{gc, GcReport};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::header::HeaderMap;
use http::Method;

use crate::auth::{Auth, Identity};
use crate::cluster::Cluster;
use crate::config::{Access, HostedConfig};
use crate::distribution::{internal, Answer, Digest, Endpoint, ErrorCode, Manifest, ProtocolError, RepoName};
use crate::storage::records::decode_manifest;
use crate::storage::{layout, marks, ByteStream, Storage};

use uploads::Session;

/// Default bound on the upload sessions one user may hold open at once (each is a staging file
/// kept for up to `hosted.upload_max_age`): one user with push rights cannot take every session.
pub const DEFAULT_MAX_UPLOAD_SESSIONS_PER_USER: usize = 64;

/// One request for a hosted repository, parsed by the server.
pub struct HostedRequest<'a> {
    /// HTTP method.
    pub method: &'a Method,
    /// The repository name as sent (validated here).
    pub name: &'a str,
    /// The endpoint.
    pub endpoint: Endpoint<'a>,
    /// The raw query string.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The authenticated client.
    pub who: &'a Identity,
    /// The request body.
    pub body: ByteStream,
}

/// The hosted registry.
pub struct Hosted {
    storage: Arc<dyn Storage>,
    auth: Arc<Auth>,
    config: HostedConfig,
    /// Open upload sessions by id (see `uploads`).
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Most upload sessions one user may hold open at once.
    max_sessions_per_user: usize,
    /// The upload sessions shared by the replicas of a cluster (see `shared_uploads`).
    shared: Option<Arc<shared_uploads::Shared>>,
}

impl Hosted {
    /// A hosted registry over `storage`, guarded by `auth`. One user may hold at most
    /// `max_upload_sessions_per_user` upload sessions open at once (the process-wide cap
    /// applies too); `0` refuses every session (only single-request uploads and mounts work).
    pub fn new(
        storage: Arc<dyn Storage>,
        auth: Arc<Auth>,
        config: HostedConfig,
        max_upload_sessions_per_user: usize,
    ) -> Arc<Hosted> {
        Hosted::in_cluster(storage, auth, config, max_upload_sessions_per_user, None)
    }

    /// [`Hosted::new`] on a replica of `cluster`: upload sessions live in Redis and the bucket,
    /// so any replica can take any request of a session (see `shared_uploads`).
    pub fn in_cluster(
        storage: Arc<dyn Storage>,
        auth: Arc<Auth>,
        config: HostedConfig,
        max_upload_sessions_per_user: usize,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Hosted> {
        let shared = cluster.map(|cluster| {
            Arc::new(shared_uploads::Shared {
                storage: storage.clone(),
                cluster,
                ttl: config.upload_max_age,
                max_per_user: max_upload_sessions_per_user,
            })
        });
        Arc::new(Hosted {
            storage,
            auth,
            config,
            sessions: Mutex::new(HashMap::new()),
            max_sessions_per_user: max_upload_sessions_per_user,
            shared,
        })
    }

    /// Whether a repository name (as sent) falls under a hosted namespace. Decided on the raw
    /// name, before any registry routing: `ns=` or a default registry never proxies it.
    pub fn is_hosted(&self, raw_name: &str) -> bool {
        self.config.namespace_of(raw_name).is_some()
    }

    /// The namespaces that accept pushes (for the refusal message of proxied namespaces).
    pub fn namespaces(&self) -> &[String] {
        &self.config.namespaces
    }

    /// Answers one hosted request: the access it needs is checked before anything is read.
    pub async fn handle(&self, req: HostedRequest<'_>) -> Result<Answer, ProtocolError> {
        let repo = RepoName::parse(req.name)?;
        let head = *req.method == Method::HEAD;
        let read = head || *req.method == Method::GET;
        let need = self.access_needed(req.method, req.endpoint, read)?;
        self.auth.check(req.who, repo.as_str(), need)?;
        match (req.method.clone(), req.endpoint) {
            (_, Endpoint::Manifest(r)) if read => self.get_manifest(&repo, r, head).await,
            (Method::PUT, Endpoint::Manifest(r)) => self.put_manifest(&repo, r, req.headers, req.body).await,
            (Method::DELETE, Endpoint::Manifest(r)) => self.delete_manifest(&repo, r).await,
            (_, Endpoint::Blob(d)) if read => self.get_blob(&repo, d, req.headers, head).await,
            (Method::DELETE, Endpoint::Blob(d)) => self.delete_blob(&repo, d).await,
            (Method::POST, Endpoint::Uploads("")) => self.start_upload(&repo, req.query, req.who, req.body).await,
            (Method::PATCH, Endpoint::Uploads(id)) if !id.is_empty() => {
                self.patch_upload(&repo, id, req.headers, req.body).await
            }
            (Method::PUT, Endpoint::Uploads(id)) if !id.is_empty() => {
                self.finish_upload(&repo, id, req.query, req.headers, req.body).await
            }
            (Method::GET, Endpoint::Uploads(id)) if !id.is_empty() => self.upload_status(&repo, id).await,
            (Method::DELETE, Endpoint::Uploads(id)) if !id.is_empty() => self.cancel_upload(&repo, id).await,
            (_, Endpoint::Tags) if read => self.tags(&repo, req.query, head).await,
            (_, Endpoint::Referrers(d)) if read => self.referrers(&repo, d, req.query, head).await,
            (m, _) => Err(ProtocolError::new(ErrorCode::Unsupported, format!("{m} is not allowed on this endpoint"))),
        }
    }

    /// The access a request needs, or a refusal no credentials would change (a disabled
    /// delete, a method no hosted endpoint takes).
    fn access_needed(&self, method: &Method, endpoint: Endpoint<'_>, read: bool) -> Result<Access, ProtocolError> {
        match (method, endpoint) {
            (m, Endpoint::Manifest(_) | Endpoint::Blob(_)) if *m == Method::DELETE => {
                if !self.config.delete {
                    return Err(ProtocolError::new(
                        ErrorCode::Unsupported,
                        "deletes are disabled on this registry (hosted.delete: false)",
                    ));
                }
                Ok(Access::Delete)
            }
            (_, Endpoint::Uploads(_)) => Ok(Access::Push),
            (m, Endpoint::Manifest(_)) if *m == Method::PUT => Ok(Access::Push),
            _ if read => Ok(Access::Pull),
            _ => Err(ProtocolError::new(ErrorCode::Unsupported, format!("{method} is not allowed here"))),
        }
    }

    // ----- links and marks -----

    /// A metadata object; `what` names it in the error if the store fails.
    async fn get(&self, key: &str, what: &str) -> Result<Option<Vec<u8>>, ProtocolError> {
        self.storage.get_object(key).await.map_err(|e| internal(what, e))
    }

    async fn exists(&self, key: &str) -> Result<bool, ProtocolError> {
        Ok(self.get(key, "cannot read metadata").await?.is_some())
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ProtocolError> {
        self.storage.put_object(key, bytes).await.map_err(|e| internal("cannot write metadata", e))
    }

    async fn delete(&self, key: &str) -> Result<bool, ProtocolError> {
        self.storage.delete_object(key).await.map_err(|e| internal("cannot delete metadata", e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ProtocolError> {
        self.storage.list_objects(prefix).await.map_err(|e| internal("cannot list metadata", e))
    }

    /// Claims `digest` for hosted content (a `kind` of `blob` or `manifest`), then says whether
    /// its content is already stored. The answer is looked up after the claim: a `gc` that reads
    /// the fresh mark keeps the content, while a "stored" seen before the claim may name a blob
    /// `gc` is deleting (the caller would link it instead of committing its own copy).
    async fn claim_stored(&self, digest: &Digest, kind: &str) -> Result<bool, ProtocolError> {
        let before = self.stored(digest, kind).await?;
        let created = marks::claim(&*self.storage, digest, kind).await.map_err(|e| internal("cannot write mark", e))?;
        if let Some(shared) = &self.shared {
            // A replica evicting these bytes right now either saw the mark (and keeps them) or
            // has deleted them by the time this returns (and the push stores its own copy).
            shared.cluster.wait_eviction(digest).await;
        }
        let stored = self.stored(digest, kind).await?;
        if created && before && stored {
            // Stored and unmarked, before the claim and after: the cache fetched it from an
            // upstream, so it is public and `gc` leaves its bytes to the cache. (Stored only
            // after the claim is a concurrent push of the same private content: it stays private.)
            marks::mark_public(&*self.storage, digest).await.map_err(|e| internal("cannot write mark", e))?;
        }
        Ok(stored)
    }

    async fn stored(&self, digest: &Digest, kind: &str) -> Result<bool, ProtocolError> {
        match kind {
            "manifest" => Ok(self.manifest_record(digest).await?.is_some()),
            _ => Ok(self.blob_size(digest).await?.is_some()),
        }
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ProtocolError> {
        self.storage.blob_size(digest).await.map_err(|e| internal("cannot read blob store", e))
    }

    /// The size of a blob this repository may serve, or `None`.
    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, ProtocolError> {
        if !self.exists(&layout::layer_link(repo, digest)).await? {
            return Ok(None);
        }
        self.blob_size(digest).await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), ProtocolError> {
        self.put(&layout::layer_link(repo, digest), digest.to_string().into_bytes()).await
    }

    async fn manifest_record(&self, digest: &Digest) -> Result<Option<Manifest>, ProtocolError> {
        let record = self.get(&layout::manifest_record(digest), "cannot read manifest").await?;
        Ok(record.and_then(|r| decode_manifest(digest, r)))
    }
}

/// The first value of `key` in a query string, percent-decoded.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

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
//! Upload sessions live in memory (their data in staging files, never whole in memory); a
//! restart forgets them, which clients see as `BLOB_UPLOAD_UNKNOWN` and answer by re-uploading.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use serde::Deserialize;

use crate::auth::{unauthorized, Auth, Identity};
use crate::config::{Access, HostedConfig};
use crate::distribution::{
    internal, range_header, Answer, BlobAnswer, Digest, DigestVerifier, Endpoint, ErrorCode, Manifest, ProtocolError,
    Reference, RepoName, Source, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};
use crate::storage::records::{decode_manifest, encode_manifest};
use crate::storage::{layout, marks, ByteStream, Staged, Storage};

/// Upload data is written in batches of about this size: few, large writes.
const WRITE_BATCH: usize = 1024 * 1024;

/// Most upload sessions open at once (each holds a staging file).
const MAX_SESSIONS: usize = 4096;

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

/// One upload session.
struct Session {
    repo: RepoName,
    /// Held for the whole of a chunk's transfer: chunks of one upload never interleave.
    state: Arc<tokio::sync::Mutex<UploadState>>,
    last_used: Mutex<Instant>,
}

struct UploadState {
    /// `None` once the session is finished or cancelled.
    staged: Option<Arc<Staged>>,
    written: u64,
    hasher: DigestVerifier,
}

impl Session {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }
}

/// The parts of a manifest Ferry reads: references, the subject, what referrers show.
/// Everything else is ignored; the stored bytes are always the client's exact bytes.
#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    subject: Option<Descriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    size: u64,
    /// Foreign (non-distributable) layers live elsewhere and are not pushed.
    #[serde(default)]
    urls: Vec<String>,
}

impl ManifestDoc {
    fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    /// Every digest this manifest keeps alive (for `gc`): config, layers, child manifests.
    fn references(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers).chain(&self.manifests)
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

/// `n` and `last` of a paginated list.
struct Page {
    n: Option<usize>,
    last: Option<String>,
}

impl Page {
    fn parse(query: Option<&str>) -> Result<Page, ProtocolError> {
        let n = match query_param(query, "n") {
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                ProtocolError::new(ErrorCode::Unsupported, format!("n={n:?} is not a non-negative integer"))
            })?),
            None => None,
        };
        Ok(Page { n, last: query_param(query, "last") })
    }

    /// The page of sorted `items` and, if more follow, the `last` value for the next page.
    fn apply(&self, items: Vec<String>) -> (Vec<String>, Option<String>) {
        let start = match &self.last {
            Some(last) => items.partition_point(|t| t.as_str() <= last.as_str()),
            None => 0,
        };
        let rest = &items[start..];
        match self.n {
            Some(n) if rest.len() > n => {
                let page = rest[..n].to_vec();
                let next = if n == 0 { None } else { page.last().cloned() };
                (page, next)
            }
            _ => (rest.to_vec(), None),
        }
    }
}

/// The hosted registry.
pub struct Hosted {
    storage: Arc<dyn Storage>,
    auth: Arc<Auth>,
    config: HostedConfig,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Hosted {
    /// A hosted registry over `storage`, guarded by `auth`.
    pub fn new(storage: Arc<dyn Storage>, auth: Arc<Auth>, config: HostedConfig) -> Arc<Hosted> {
        Arc::new(Hosted { storage, auth, config, sessions: Mutex::new(HashMap::new()) })
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

    /// Purges upload sessions idle longer than `upload_max_age`, forever (spawn it once).
    pub async fn purge_uploads_forever(self: Arc<Self>) {
        let max_age = self.config.upload_max_age;
        let every = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let purged = self.purge_uploads(max_age);
            if purged > 0 {
                tracing::info!(purged, "purged abandoned upload sessions");
            }
        }
    }

    /// Drops sessions idle longer than `max_age` (their staging files go with them); returns
    /// how many. A session in use right now is left alone.
    pub fn purge_uploads(&self, max_age: Duration) -> usize {
        let Ok(mut map) = self.sessions.lock() else { return 0 };
        let before = map.len();
        map.retain(|_, s| {
            let idle = s.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
            idle < max_age || s.state.try_lock().is_err()
        });
        before - map.len()
    }

    /// Answers one hosted request.
    pub async fn handle(&self, req: HostedRequest<'_>) -> Result<Answer, ProtocolError> {
        let repo = RepoName::parse(req.name)?;
        let head = *req.method == Method::HEAD;
        let read = head || *req.method == Method::GET;
        let need = match (req.method, req.endpoint) {
            (m, Endpoint::Manifest(_) | Endpoint::Blob(_)) if *m == Method::DELETE => {
                if !self.config.delete {
                    return Err(ProtocolError::new(
                        ErrorCode::Unsupported,
                        "deletes are disabled on this registry (hosted.delete: false)",
                    ));
                }
                Access::Delete
            }
            (_, Endpoint::Uploads(_)) => Access::Push,
            (m, Endpoint::Manifest(_)) if *m == Method::PUT => Access::Push,
            _ if read => Access::Pull,
            _ => return Err(ProtocolError::new(ErrorCode::Unsupported, format!("{} is not allowed here", req.method))),
        };
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
            (Method::DELETE, Endpoint::Uploads(id)) if !id.is_empty() => self.cancel_upload(&repo, id),
            (_, Endpoint::Tags) if read => self.tags(&repo, req.query, head).await,
            (_, Endpoint::Referrers(d)) if read => self.referrers(&repo, d, req.query, head).await,
            (m, _) => Err(ProtocolError::new(ErrorCode::Unsupported, format!("{m} is not allowed on this endpoint"))),
        }
    }

    // ----- links and marks -----

    async fn exists(&self, key: &str) -> Result<bool, ProtocolError> {
        Ok(self.storage.get_object(key).await.map_err(|e| internal("cannot read metadata", e))?.is_some())
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

    /// Marks `digest` as used by hosted content (before the content is committed).
    async fn claim(&self, digest: &Digest, kind: &str, already_stored: bool) -> Result<(), ProtocolError> {
        marks::claim(&*self.storage, digest, kind, already_stored).await.map_err(|e| internal("cannot write mark", e))
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
        let record = self
            .storage
            .get_object(&layout::manifest_record(digest))
            .await
            .map_err(|e| internal("cannot read manifest", e))?;
        Ok(record.and_then(|r| decode_manifest(digest, r)))
    }

    // ----- manifests -----

    async fn resolve(&self, repo: &RepoName, reference: &str) -> Result<Digest, ProtocolError> {
        let unknown =
            || ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {repo}:{reference} is unknown"));
        match Reference::parse(reference)? {
            Reference::Tag(t) => {
                let link = self
                    .storage
                    .get_object(&layout::hosted_tag(repo, &t))
                    .await
                    .map_err(|e| internal("cannot read tag", e))?
                    .ok_or_else(unknown)?;
                std::str::from_utf8(&link).ok().and_then(|s| Digest::parse(s).ok()).ok_or_else(unknown)
            }
            Reference::Digest(d) => match self.exists(&layout::revision_link(repo, &d)).await? {
                true => Ok(d),
                false => Err(unknown()),
            },
        }
    }

    async fn get_manifest(&self, repo: &RepoName, reference: &str, head: bool) -> Result<Answer, ProtocolError> {
        let digest = self.resolve(repo, reference).await?;
        let manifest = self.manifest_record(&digest).await?.ok_or_else(|| {
            ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {digest} is missing from storage"))
        })?;
        Ok(Answer::Manifest { manifest: Arc::new(manifest), source: Source::Hosted, head })
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        headers: &HeaderMap,
        mut body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        let reference = Reference::parse(reference)?;
        let too_large = || {
            let e = ProtocolError::new(
                ErrorCode::ManifestInvalid,
                format!("manifest larger than the {MAX_MANIFEST_BYTES}-byte limit"),
            );
            // The spec asks for 413 here, a status no error code maps to.
            Err(e.with_status(StatusCode::PAYLOAD_TOO_LARGE))
        };
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
            drain(&mut body).await;
            return too_large();
        }
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ProtocolError::new(ErrorCode::ManifestInvalid, format!("body: {e}")))?;
            if buf.len() + chunk.len() > MAX_MANIFEST_BYTES {
                drain(&mut body).await;
                return too_large();
            }
            buf.extend_from_slice(&chunk);
        }
        let bytes = Bytes::from(buf);
        let digest = Digest::of(&bytes);
        if let Reference::Digest(want) = &reference {
            if *want != digest {
                return Err(ProtocolError::new(
                    ErrorCode::DigestInvalid,
                    format!("the manifest's digest is {digest}, not {want}"),
                ));
            }
        }
        let invalid = |why: String| ProtocolError::new(ErrorCode::ManifestInvalid, why);
        let doc: ManifestDoc =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
        if doc.schema_version != Some(2) {
            return Err(invalid("schemaVersion must be 2".into()));
        }
        let known = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_V2, DOCKER_MANIFEST_LIST];
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| known.contains(&t.as_str()));
        let media_type = match (content_type, &doc.media_type) {
            (Some(ct), Some(mt)) if ct != *mt => {
                return Err(invalid(format!("Content-Type {ct} differs from the manifest's mediaType {mt}")))
            }
            (Some(ct), _) => ct,
            (None, Some(mt)) if known.contains(&mt.as_str()) => mt.clone(),
            _ => {
                return Err(invalid(format!("unsupported manifest media type; accepted: {}", known.join(", "))));
            }
        };
        let parse = |d: &Descriptor| {
            Digest::parse(&d.digest).map_err(|e| invalid(format!("descriptor digest {:?}: {}", d.digest, e.message)))
        };
        let missing = |what: &str, d: &Digest| {
            ProtocolError::new(ErrorCode::ManifestBlobUnknown, format!("{what} {d} is not in repository {repo}"))
                .with_detail(serde_json::json!({ "digest": d.to_string() }))
        };
        if ManifestDoc::is_index(&media_type) {
            for m in &doc.manifests {
                let d = parse(m)?;
                if !self.exists(&layout::revision_link(repo, &d)).await? {
                    return Err(missing("manifest", &d));
                }
            }
        } else {
            let config = doc.config.as_ref().ok_or_else(|| invalid("an image manifest needs a config".into()))?;
            for b in std::iter::once(config).chain(&doc.layers) {
                let d = parse(b)?;
                if !b.urls.is_empty() {
                    continue;
                }
                match self.linked_blob(repo, &d).await? {
                    Some(size) if size == b.size => {}
                    Some(size) => {
                        return Err(invalid(format!("blob {d} has {size} bytes, the manifest says {}", b.size)));
                    }
                    None => return Err(missing("blob", &d)),
                }
            }
        }
        let subject = doc.subject.as_ref().map(parse).transpose()?;

        // Store: content, then the links that make it reachable, the tag last.
        let record_stored = self.manifest_record(&digest).await?.is_some();
        self.claim(&digest, "manifest", record_stored).await?;
        if !record_stored {
            let record = encode_manifest(&Manifest {
                digest: digest.clone(),
                media_type: media_type.to_string(),
                bytes: bytes.clone(),
            });
            self.put(&layout::manifest_record(&digest), record).await?;
        }
        self.put(&layout::revision_link(repo, &digest), digest.to_string().into_bytes()).await?;
        if !self.exists(&layout::catalog_entry(repo)).await? {
            self.put(&layout::catalog_entry(repo), Vec::new()).await?;
        }
        if let Some(subject) = &subject {
            let artifact_type = doc.artifact_type.clone().or_else(|| {
                if ManifestDoc::is_index(&media_type) {
                    None
                } else {
                    doc.config.as_ref().and_then(|c| c.media_type.clone())
                }
            });
            let mut desc =
                serde_json::json!({ "mediaType": media_type, "digest": digest.to_string(), "size": bytes.len() });
            if let Some(t) = artifact_type {
                desc["artifactType"] = t.into();
            }
            if let Some(a) = &doc.annotations {
                desc["annotations"] = serde_json::Value::Object(a.clone());
            }
            let key = layout::referrer(repo, subject, &digest);
            self.put(&key, desc.to_string().into_bytes()).await?;
        }
        if let Reference::Tag(t) = &reference {
            self.put(&layout::hosted_tag(repo, t), digest.to_string().into_bytes()).await?;
        }
        tracing::info!(target: "ferry::hosted", %repo, reference = %reference, %digest, "manifest stored");
        Ok(Answer::Created { location: format!("/v2/{repo}/manifests/{digest}"), digest, subject })
    }

    async fn delete_manifest(&self, repo: &RepoName, reference: &str) -> Result<Answer, ProtocolError> {
        let unknown =
            || ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {repo}:{reference} is unknown"));
        match Reference::parse(reference)? {
            Reference::Tag(t) => {
                // Deleting by tag removes the tag only (distribution-spec 1.1).
                if !self.delete(&layout::hosted_tag(repo, &t)).await? {
                    return Err(unknown());
                }
            }
            Reference::Digest(d) => {
                if !self.exists(&layout::revision_link(repo, &d)).await? {
                    return Err(unknown());
                }
                // Tags first: no tag may point at a manifest that is no longer served.
                let prefix = layout::tags_dir(repo);
                for key in self.list(&prefix).await? {
                    let target = self.storage.get_object(&key).await.map_err(|e| internal("cannot read tag", e))?;
                    if target.as_deref() == Some(d.to_string().as_bytes()) {
                        self.delete(&key).await?;
                    }
                }
                if let Some(m) = self.manifest_record(&d).await? {
                    if let Ok(doc) = serde_json::from_slice::<ManifestDoc>(&m.bytes) {
                        if let Some(subject) = doc.subject.and_then(|s| Digest::parse(&s.digest).ok()) {
                            self.delete(&layout::referrer(repo, &subject, &d)).await?;
                        }
                    }
                }
                self.delete(&layout::revision_link(repo, &d)).await?;
                tracing::info!(target: "ferry::hosted", %repo, digest = %d, "manifest deleted");
            }
        }
        Ok(Answer::Status(StatusCode::ACCEPTED))
    }

    // ----- blobs -----

    async fn get_blob(
        &self,
        repo: &RepoName,
        d: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Answer, ProtocolError> {
        let digest = Digest::parse(d)?;
        let size = self
            .linked_blob(repo, &digest)
            .await?
            .ok_or_else(|| ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} is not in {repo}")))?;
        let span = match range_header(headers) {
            Some(r) => Some(r.span(size)?),
            None => None,
        };
        let body = if head {
            None
        } else {
            let (start, end) = span.map_or((0, size), |(s, e)| (s, e + 1));
            let stream = self
                .storage
                .read_blob(&digest, start, end)
                .await
                .map_err(|e| internal("cannot read blob", e))?
                .ok_or_else(|| ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} is gone")))?;
            Some(stream)
        };
        Ok(Answer::Blob { digest, blob: BlobAnswer { size: Some(size), range: span, body, source: Source::Hosted } })
    }

    async fn delete_blob(&self, repo: &RepoName, d: &str) -> Result<Answer, ProtocolError> {
        let digest = Digest::parse(d)?;
        // Only the link goes: the bytes may be shared, and `ferry gc` decides about them.
        if !self.delete(&layout::layer_link(repo, &digest)).await? {
            return Err(ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} is not in {repo}")));
        }
        Ok(Answer::Status(StatusCode::ACCEPTED))
    }

    // ----- uploads -----

    fn upload_reply(status: StatusCode, repo: &RepoName, id: &str, written: u64) -> Answer {
        Answer::Upload { status, location: format!("/v2/{repo}/blobs/uploads/{id}"), id: id.to_owned(), written }
    }

    fn blob_created(repo: &RepoName, digest: &Digest) -> Answer {
        Answer::Created { location: format!("/v2/{repo}/blobs/{digest}"), digest: digest.clone(), subject: None }
    }

    async fn start_upload(
        &self,
        repo: &RepoName,
        query: Option<&str>,
        who: &Identity,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        if let (Some(mount), Some(from)) = (query_param(query, "mount"), query_param(query, "from")) {
            if let Some(r) = self.try_mount(repo, &mount, &from, who).await? {
                return Ok(r);
            }
        }
        let staged = Arc::new(self.storage.stage().await.map_err(|e| internal("cannot create upload file", e))?);
        if let Some(d) = query_param(query, "digest") {
            // Single-POST monolithic upload.
            let digest = Digest::parse(&d)?;
            let mut state = UploadState { staged: Some(staged.clone()), written: 0, hasher: DigestVerifier::new() };
            append(&mut state, body, None).await?;
            self.commit_upload(repo, state, &digest).await?;
            return Ok(Hosted::blob_created(repo, &digest));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Arc::new(Session {
            repo: repo.clone(),
            state: Arc::new(tokio::sync::Mutex::new(UploadState {
                staged: Some(staged),
                written: 0,
                hasher: DigestVerifier::new(),
            })),
            last_used: Mutex::new(Instant::now()),
        });
        {
            let mut map = self.sessions.lock().map_err(|e| internal("lock poisoned", e))?;
            if map.len() >= MAX_SESSIONS {
                return Err(ProtocolError::new(
                    ErrorCode::TooManyRequests,
                    "too many uploads in progress; retry later",
                ));
            }
            map.insert(id.clone(), session);
        }
        Ok(Hosted::upload_reply(StatusCode::ACCEPTED, repo, &id, 0))
    }

    /// Cross-repository mount: `Some(201)` when `from` holds the blob and the user may read it,
    /// `None` to fall back to an ordinary upload (the spec's 202), never an error that would
    /// reveal what `from` holds.
    async fn try_mount(
        &self,
        repo: &RepoName,
        mount: &str,
        from: &str,
        who: &Identity,
    ) -> Result<Option<Answer>, ProtocolError> {
        let (Ok(digest), Ok(from)) = (Digest::parse(mount), RepoName::parse(from)) else { return Ok(None) };
        if !self.is_hosted(from.as_str()) || self.auth.check(who, from.as_str(), Access::Pull).is_err() {
            return Ok(None);
        }
        if self.linked_blob(&from, &digest).await?.is_none() {
            return Ok(None);
        }
        self.claim(&digest, "blob", true).await?;
        self.link_blob(repo, &digest).await?;
        Ok(Some(Hosted::blob_created(repo, &digest)))
    }

    fn session(&self, repo: &RepoName, id: &str) -> Result<Arc<Session>, ProtocolError> {
        let unknown = || ProtocolError::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is unknown"));
        let map = self.sessions.lock().map_err(|e| internal("lock poisoned", e))?;
        let s = map.get(id).cloned().ok_or_else(unknown)?;
        if s.repo != *repo {
            return Err(unknown());
        }
        s.touch();
        Ok(s)
    }

    fn forget(&self, id: &str) {
        if let Ok(mut map) = self.sessions.lock() {
            map.remove(id);
        }
    }

    async fn patch_upload(
        &self,
        repo: &RepoName,
        id: &str,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        let session = self.session(repo, id)?;
        let state = session.state.clone().lock_owned().await;
        let limit = chunk_limit(headers, state.written)?;
        let (state, result) = append_detached(state, body, limit).await?;
        session.touch();
        result?;
        Ok(Hosted::upload_reply(StatusCode::ACCEPTED, repo, id, state.written))
    }

    async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        let session = self.session(repo, id)?;
        let digest = query_param(query, "digest")
            .ok_or_else(|| ProtocolError::new(ErrorCode::DigestInvalid, "the closing PUT needs ?digest="))
            .and_then(|d| Digest::parse(&d))?;
        let state = session.state.clone().lock_owned().await;
        let limit = chunk_limit(headers, state.written)?;
        let (mut state, result) = append_detached(state, body, limit).await?;
        result?;
        let state =
            std::mem::replace(&mut *state, UploadState { staged: None, written: 0, hasher: DigestVerifier::new() });
        // Finished either way: a mismatch discards the data, nothing of it stays visible.
        self.forget(id);
        self.commit_upload(repo, state, &digest).await?;
        Ok(Hosted::blob_created(repo, &digest))
    }

    /// Verifies an upload against `digest` and makes it visible in `repo`.
    async fn commit_upload(&self, repo: &RepoName, state: UploadState, digest: &Digest) -> Result<(), ProtocolError> {
        let staged = state.staged.ok_or_else(|| ProtocolError::new(ErrorCode::BlobUploadUnknown, "upload finished"))?;
        let got = state.hasher.finish();
        if got != *digest {
            tracing::warn!(target: "ferry::hosted", %repo, expected = %digest, %got, "upload digest mismatch; discarded");
            return Err(ProtocolError::new(
                ErrorCode::DigestInvalid,
                format!("uploaded content has digest {got}, not {digest}"),
            ));
        }
        let stored = self.blob_size(digest).await?.is_some();
        self.claim(digest, "blob", stored).await?;
        if !stored {
            // Bytes past the verified length (a chunk cut off mid-write) must not be published.
            let (s, len) = (staged.clone(), state.written);
            tokio::task::spawn_blocking(move || s.set_len(len))
                .await
                .map_err(|e| internal("upload task failed", e))?
                .map_err(|e| internal("cannot trim upload file", e))?;
            self.storage.commit(staged, digest).await.map_err(|e| internal("cannot store blob", e))?;
        }
        self.link_blob(repo, digest).await?;
        tracing::debug!(target: "ferry::hosted", %repo, %digest, size = state.written, "blob stored");
        Ok(())
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<Answer, ProtocolError> {
        let session = self.session(repo, id)?;
        let state = session.state.lock().await;
        if state.staged.is_none() {
            return Err(ProtocolError::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is finished")));
        }
        Ok(Hosted::upload_reply(StatusCode::NO_CONTENT, repo, id, state.written))
    }

    fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<Answer, ProtocolError> {
        self.session(repo, id)?;
        self.forget(id);
        Ok(Answer::Status(StatusCode::NO_CONTENT))
    }

    // ----- discovery -----

    async fn tags(&self, repo: &RepoName, query: Option<&str>, head: bool) -> Result<Answer, ProtocolError> {
        if !self.exists(&layout::catalog_entry(repo)).await? {
            return Err(ProtocolError::new(ErrorCode::NameUnknown, format!("repository {repo} is unknown")));
        }
        let page = Page::parse(query)?;
        let prefix = layout::tags_dir(repo);
        let mut tags: Vec<String> =
            self.list(&prefix).await?.into_iter().filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned)).collect();
        tags.sort();
        let (tags, next) = page.apply(tags);
        let body = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
        let mut r = Answer::json("application/json", body, head);
        if let (Answer::Json { next: link, .. }, Some(last), Some(n)) = (&mut r, next, page.n) {
            let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
            *link = Some(format!("</v2/{repo}/tags/list?n={n}&last={last}>; rel=\"next\""));
        }
        Ok(r)
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        d: &str,
        query: Option<&str>,
        head: bool,
    ) -> Result<Answer, ProtocolError> {
        let subject = Digest::parse(d)?;
        let filter = query_param(query, "artifactType");
        let mut manifests = Vec::new();
        for key in self.list(&layout::referrers_dir(repo, &subject)).await? {
            let Some(bytes) = self.storage.get_object(&key).await.map_err(|e| internal("cannot read referrer", e))?
            else {
                continue;
            };
            let Ok(desc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if filter.as_deref().is_none_or(|f| desc["artifactType"].as_str() == Some(f)) {
                manifests.push(desc);
            }
        }
        let body = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let mut r = Answer::json(OCI_INDEX, body.to_string(), head);
        if let (Answer::Json { filters_applied, .. }, Some(_)) = (&mut r, &filter) {
            *filters_applied = Some("artifactType");
        }
        Ok(r)
    }

    /// `GET /v2/_catalog`: the hosted repositories `who` may pull, paginated like tags.
    pub async fn catalog(&self, who: &Identity, query: Option<&str>, head: bool) -> Result<Answer, ProtocolError> {
        if *who == Identity::Anonymous && self.auth.access(who, "").is_none() {
            return Err(unauthorized("authentication required to list repositories"));
        }
        let page = Page::parse(query)?;
        let mut repos: Vec<String> = self
            .list(layout::CATALOG_PREFIX)
            .await?
            .into_iter()
            .filter_map(|k| layout::repo_from_catalog_key(&k).map(str::to_owned))
            .filter(|repo| self.auth.access(who, repo).is_some())
            .collect();
        // By name, not by storage key: `a/b` sorts after `a-b` though `a/b/_repo` does not.
        repos.sort();
        let (repos, next) = page.apply(repos);
        let body = serde_json::json!({ "repositories": repos }).to_string();
        let mut r = Answer::json("application/json", body, head);
        if let (Answer::Json { next: link, .. }, Some(last), Some(n)) = (&mut r, next, page.n) {
            let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
            *link = Some(format!("</v2/_catalog?n={n}&last={last}>; rel=\"next\""));
        }
        Ok(r)
    }
}

/// Reads and discards what is left of a refused body, up to a bound, so that an HTTP/1 client
/// still busy sending reads the error instead of a connection reset.
async fn drain(body: &mut ByteStream) {
    const DRAIN_LIMIT: usize = 16 * 1024 * 1024;
    let mut seen = 0;
    while seen < DRAIN_LIMIT {
        match body.next().await {
            Some(Ok(b)) => seen += b.len(),
            _ => return,
        }
    }
}

/// How many bytes a chunk may carry, from its `Content-Range` (which must start where the
/// upload stands: anything else is out of order, 416) or `Content-Length`.
fn chunk_limit(headers: &HeaderMap, written: u64) -> Result<Option<u64>, ProtocolError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()));
    };
    let bad = || ProtocolError::new(ErrorCode::BlobUploadInvalid, "Content-Range must look like <start>-<end>");
    let text = v.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let span = text.split('/').next().unwrap_or("");
    let (a, b) = span.split_once('-').ok_or_else(bad)?;
    let (start, end): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if start != written || end < start {
        return Err(ProtocolError::new(
            ErrorCode::RangeInvalid,
            format!("chunk {start}-{end} is out of order: the upload has {written} bytes, the next chunk starts there"),
        )
        .with_detail(serde_json::json!({ "offset": written })));
    }
    // Saturating: `0-18446744073709551615` must not overflow (a panic on a request path).
    Ok(Some((end - start).saturating_add(1)))
}

type StateGuard = tokio::sync::OwnedMutexGuard<UploadState>;

/// [`append`] in a task of its own: when the client's connection breaks, the handler is dropped
/// but the bytes that did arrive are still written and counted, so the upload can resume.
async fn append_detached(
    mut state: StateGuard,
    body: ByteStream,
    limit: Option<u64>,
) -> Result<(StateGuard, Result<(), ProtocolError>), ProtocolError> {
    tokio::spawn(async move {
        let r = append(&mut state, body, limit).await;
        (state, r)
    })
    .await
    .map_err(|e| internal("upload task failed", e))
}

/// Streams `body` onto the end of the upload, hashing as it goes, at most `limit` bytes.
/// Bytes received before an error stay (the upload can resume from there, GET tells where).
async fn append(state: &mut UploadState, mut body: ByteStream, limit: Option<u64>) -> Result<(), ProtocolError> {
    let staged =
        state.staged.clone().ok_or_else(|| ProtocolError::new(ErrorCode::BlobUploadUnknown, "upload finished"))?;
    let mut received: u64 = 0;
    loop {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batch_len = 0usize;
        let mut failure = None;
        let mut ended = false;
        while batch_len < WRITE_BATCH {
            match body.next().await {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => {
                    failure = Some(ProtocolError::new(ErrorCode::BlobUploadInvalid, format!("upload broke off: {e}")));
                    break;
                }
                Some(Ok(b)) => {
                    if limit.is_some_and(|l| received + batch_len as u64 + b.len() as u64 > l) {
                        failure = Some(ProtocolError::new(
                            ErrorCode::SizeInvalid,
                            "the chunk is longer than its Content-Range or Content-Length",
                        ));
                        break;
                    }
                    batch_len += b.len();
                    batch.push(b);
                }
            }
        }
        if batch_len > 0 {
            let (s, at) = (staged.clone(), state.written);
            // A copy: if this is interrupted, the session's hasher still matches `written`.
            let mut hasher = state.hasher.clone();
            // Hash and write on the blocking pool; the bytes move there without a copy.
            let (hasher, res) = tokio::task::spawn_blocking(move || {
                for b in &batch {
                    hasher.update(b);
                }
                let res = s.write_all_at(&batch, at);
                (hasher, res)
            })
            .await
            .map_err(|e| internal("upload task failed", e))?;
            if let Err(e) = res {
                // The hasher saw bytes that may not be on disk: the session cannot continue.
                state.staged = None;
                return Err(internal("cannot write upload file", e));
            }
            state.hasher = hasher;
            state.written += batch_len as u64;
            received += batch_len as u64;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if ended {
            if limit.is_some_and(|l| received != l) {
                return Err(ProtocolError::new(
                    ErrorCode::SizeInvalid,
                    format!("received {received} bytes, the headers announced {}", limit.unwrap_or(0)),
                ));
            }
            return Ok(());
        }
    }
}

/// What `ferry gc` did (or would do, dry).
#[derive(Debug, Default)]
pub struct GcReport {
    /// Blobs deleted, with their sizes.
    pub removed_blobs: Vec<(Digest, u64)>,
    /// Manifest records deleted.
    pub removed_manifests: Vec<Digest>,
    /// Unreferenced digests whose bytes stay because the cache shares them (mark dropped only).
    pub released_shared: Vec<Digest>,
    /// Hosted digests still referenced.
    pub kept: usize,
    /// Unreferenced but younger than the grace period (maybe a push in progress).
    pub young: usize,
}

/// Removes hosted content no manifest references: mark every digest reachable from a manifest
/// revision of any hosted repository, then sweep marks that are unreferenced and older than
/// `grace`. Shared digests lose only their mark (the cache may be serving them). Run it while
/// pushes are quiet: a push that reuses an old unreferenced blob during the sweep can lose it.
pub async fn gc(storage: &dyn Storage, grace: Duration, dry_run: bool) -> io::Result<GcReport> {
    let mut report = GcReport::default();
    let mut live: HashSet<String> = HashSet::new();
    let mut layer_links: HashMap<String, Vec<String>> = HashMap::new();
    for key in storage.list_objects(layout::REPOS_PREFIX).await? {
        if let layout::RepoKey::Revision(hex) = layout::classify_repo_key(&key) {
            let Some(digest) = layout::digest_from_hex(hex) else { continue };
            live.insert(digest.hex().to_owned());
            let record = storage.get_object(&layout::manifest_record(&digest)).await?;
            let Some(Manifest { bytes, .. }) = record.and_then(|r| decode_manifest(&digest, r)) else {
                tracing::warn!(%digest, "manifest record missing or corrupt; its references are unknown");
                continue;
            };
            if let Ok(doc) = serde_json::from_slice::<ManifestDoc>(&bytes) {
                for d in doc.references() {
                    if let Ok(d) = Digest::parse(&d.digest) {
                        live.insert(d.hex().to_owned());
                    }
                }
            }
        } else if let layout::RepoKey::Layer(hex) = layout::classify_repo_key(&key) {
            layer_links.entry(hex.to_owned()).or_default().push(key.clone());
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for key in storage.list_objects(layout::MARKS_PREFIX).await? {
        let Some(hex) = key.strip_prefix(layout::MARKS_PREFIX) else { continue };
        let Some(digest) = layout::digest_from_hex(hex) else { continue };
        if live.contains(hex) {
            report.kept += 1;
            continue;
        }
        let Some(mark) = storage.get_object(&key).await? else { continue };
        // Undecodable: treated as young shared content, so it is never swept.
        let mark = marks::decode(&mark).unwrap_or(marks::Mark { kind: "blob".into(), shared: true, since: now });
        if now.saturating_sub(mark.since) < grace.as_secs() {
            report.young += 1;
            continue;
        }
        if dry_run {
            match (mark.shared, mark.kind.as_str()) {
                (true, _) => report.released_shared.push(digest),
                (false, "manifest") => report.removed_manifests.push(digest),
                (false, _) => {
                    let size = storage.blob_size(&digest).await?.unwrap_or(0);
                    report.removed_blobs.push((digest, size));
                }
            }
            continue;
        }
        // Links first, so no repository ever claims bytes that are gone.
        for link in layer_links.get(hex).into_iter().flatten() {
            storage.delete_object(link).await?;
        }
        match (mark.shared, mark.kind.as_str()) {
            (true, _) => report.released_shared.push(digest.clone()),
            (false, "manifest") => {
                storage.delete_object(&layout::manifest_record(&digest)).await?;
                report.removed_manifests.push(digest.clone());
            }
            (false, _) => {
                let size = storage.blob_size(&digest).await?.unwrap_or(0);
                if storage.delete_blob(&digest).await? {
                    report.removed_blobs.push((digest.clone(), size));
                }
            }
        }
        storage.delete_object(&key).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = |q: &str| Page::parse(Some(q)).unwrap().apply(items.clone());
        assert_eq!(p("n=2"), (vec!["a".to_string(), "b".into()], Some("b".into())));
        assert_eq!(p("n=2&last=b"), (vec!["c".to_string(), "d".into()], None));
        assert_eq!(p("last=c"), (vec!["d".to_string()], None));
        assert_eq!(p("n=0"), (vec![], None));
        assert_eq!(p("n=10"), (items.clone(), None));
        assert!(Page::parse(Some("n=x")).is_err());
    }

    #[tokio::test]
    async fn abandoned_uploads_are_purged_with_their_data() {
        let dir = std::env::temp_dir().join(format!("ferry-hosted-purge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::FsStorage::open(&dir).unwrap());
        let config =
            crate::config::Config::from_yaml("hosted:\n  namespaces: [internal]\n  htpasswd: /x\n").unwrap().hosted;
        let auth = Arc::new(Auth::new("", &config).unwrap());
        let hosted = Hosted::new(storage, auth, config);
        let repo = RepoName::parse("internal/app").unwrap();
        let body: ByteStream = Box::pin(futures_util::stream::empty());
        let reply = hosted.start_upload(&repo, None, &Identity::User("u".into()), body).await.unwrap();
        assert!(matches!(reply, Answer::Upload { status: StatusCode::ACCEPTED, .. }));
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 1, "the upload has a staging file");
        assert_eq!(hosted.purge_uploads(Duration::from_secs(3600)), 0, "a fresh upload stays");
        assert_eq!(hosted.purge_uploads(Duration::ZERO), 1);
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0, "its data went with it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunk_ranges() {
        let mut hm = HeaderMap::new();
        assert_eq!(chunk_limit(&hm, 0).unwrap(), None);
        hm.insert(header::CONTENT_RANGE, "0-9".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 0).unwrap(), Some(10));
        assert_eq!(chunk_limit(&hm, 5).unwrap_err().code, ErrorCode::RangeInvalid);
        hm.insert(header::CONTENT_RANGE, "bytes 10-19/*".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 10).unwrap(), Some(10));
        hm.insert(header::CONTENT_RANGE, "x".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 0).unwrap_err().code, ErrorCode::BlobUploadInvalid);
    }
}

//! Manifests: reading by tag or digest, pushing (bounded read, validation, store in an order
//! that never shows a partial state), deleting, and the few fields of a manifest Ferry reads.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap};
use http::StatusCode;
use serde::Deserialize;

use super::Hosted;
use crate::distribution::{
    internal, Answer, Digest, ErrorCode, Manifest, ProtocolError, Reference, RepoName, Source, DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};
use crate::storage::records::encode_manifest;
use crate::storage::{layout, marks, ByteStream};

/// The manifest media types a push may carry.
const KNOWN_MEDIA_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_V2, DOCKER_MANIFEST_LIST];

/// The parts of a manifest Ferry reads: references, the subject, what referrers show.
/// Everything else is ignored; the stored bytes are always the client's exact bytes.
#[derive(Debug, Deserialize)]
pub(super) struct ManifestDoc {
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

/// A content descriptor inside a manifest.
#[derive(Debug, Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    /// As written: validated only where a push depends on it.
    pub(super) digest: String,
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
    pub(super) fn references(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers).chain(&self.manifests)
    }

    /// Parses a pushed manifest; only schema version 2 is accepted.
    fn parse(bytes: &[u8]) -> Result<ManifestDoc, ProtocolError> {
        let doc: ManifestDoc =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
        if doc.schema_version != Some(2) {
            return Err(invalid("schemaVersion must be 2".into()));
        }
        Ok(doc)
    }

    /// The media type a push is stored under: the `Content-Type` when it names a known type
    /// (and agrees with the manifest's own `mediaType`), else the manifest's `mediaType`.
    fn media_type_of_push(&self, headers: &HeaderMap) -> Result<String, ProtocolError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| KNOWN_MEDIA_TYPES.contains(&t.as_str()));
        match (content_type, &self.media_type) {
            (Some(ct), Some(mt)) if ct != *mt => {
                Err(invalid(format!("Content-Type {ct} differs from the manifest's mediaType {mt}")))
            }
            (Some(ct), _) => Ok(ct),
            (None, Some(mt)) if KNOWN_MEDIA_TYPES.contains(&mt.as_str()) => Ok(mt.clone()),
            _ => Err(invalid(format!("unsupported manifest media type; accepted: {}", KNOWN_MEDIA_TYPES.join(", ")))),
        }
    }
}

/// A pushed manifest that passed validation, ready to store.
struct Validated {
    /// The client's exact bytes.
    bytes: Bytes,
    digest: Digest,
    media_type: String,
    doc: ManifestDoc,
    subject: Option<Digest>,
}

impl Validated {
    /// What the subject's referrers list shows of this manifest.
    fn referrer_descriptor(&self) -> serde_json::Value {
        let artifact_type = self.doc.artifact_type.clone().or_else(|| {
            if ManifestDoc::is_index(&self.media_type) {
                None
            } else {
                self.doc.config.as_ref().and_then(|c| c.media_type.clone())
            }
        });
        let mut desc = serde_json::json!({
            "mediaType": self.media_type, "digest": self.digest.to_string(), "size": self.bytes.len()
        });
        if let Some(t) = artifact_type {
            desc["artifactType"] = t.into();
        }
        if let Some(a) = &self.doc.annotations {
            desc["annotations"] = serde_json::Value::Object(a.clone());
        }
        desc
    }
}

fn invalid(why: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::ManifestInvalid, why)
}

fn manifest_unknown(repo: &RepoName, reference: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {repo}:{reference} is unknown"))
}

fn descriptor_digest(d: &Descriptor) -> Result<Digest, ProtocolError> {
    Digest::parse(&d.digest).map_err(|e| invalid(format!("descriptor digest {:?}: {}", d.digest, e.message)))
}

/// A manifest referencing content `repo` does not hold; the detail names the digest.
fn missing(repo: &RepoName, what: &str, d: &Digest) -> ProtocolError {
    ProtocolError::new(ErrorCode::ManifestBlobUnknown, format!("{what} {d} is not in repository {repo}"))
        .with_detail(serde_json::json!({ "digest": d.to_string() }))
}

impl Hosted {
    /// The manifest a read names. A reference that cannot be a tag names nothing: 404
    /// `MANIFEST_UNKNOWN`, as for any other absent manifest (only a PUT of one is invalid).
    async fn resolve(&self, repo: &RepoName, reference: &str) -> Result<Digest, ProtocolError> {
        let unknown = || manifest_unknown(repo, reference);
        match Reference::parse_to_read(reference)? {
            Reference::Tag(t) => {
                let link = self.get(&layout::hosted_tag(repo, &t), "cannot read tag").await?.ok_or_else(unknown)?;
                std::str::from_utf8(&link).ok().and_then(|s| Digest::parse(s).ok()).ok_or_else(unknown)
            }
            Reference::Digest(d) => match self.exists(&layout::revision_link(repo, &d)).await? {
                true => Ok(d),
                false => Err(unknown()),
            },
        }
    }

    pub(super) async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        head: bool,
    ) -> Result<Answer, ProtocolError> {
        let digest = self.resolve(repo, reference).await?;
        let manifest = self.manifest_record(&digest).await?.ok_or_else(|| {
            ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest {digest} is missing from storage"))
        })?;
        Ok(Answer::Manifest { manifest: Arc::new(manifest), source: Source::Hosted, head })
    }

    pub(super) async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        let reference = Reference::parse(reference)?;
        let bytes = read_manifest_body(headers, body).await?;
        let manifest = self.validate_manifest(repo, &reference, headers, bytes).await?;
        self.store_manifest(repo, &reference, &manifest).await?;
        let Validated { digest, subject, .. } = manifest;
        tracing::info!(target: "ferry::hosted", %repo, reference = %reference, %digest, "manifest stored");
        Ok(Answer::Created { location: format!("/v2/{repo}/manifests/{digest}"), digest, subject })
    }

    /// Checks a pushed manifest: its digest (when pushed by digest), its schema and media
    /// type, and that everything it references is already in `repo`.
    async fn validate_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        headers: &HeaderMap,
        bytes: Bytes,
    ) -> Result<Validated, ProtocolError> {
        let digest = Digest::of(&bytes);
        if let Reference::Digest(want) = reference {
            if *want != digest {
                return Err(ProtocolError::new(
                    ErrorCode::DigestInvalid,
                    format!("the manifest's digest is {digest}, not {want}"),
                ));
            }
        }
        let doc = ManifestDoc::parse(&bytes)?;
        let media_type = doc.media_type_of_push(headers)?;
        self.check_references(repo, &doc, &media_type).await?;
        let subject = doc.subject.as_ref().map(descriptor_digest).transpose()?;
        Ok(Validated { bytes, digest, media_type, doc, subject })
    }

    /// An index needs its child manifests in `repo`; an image manifest its config and layers
    /// (foreign layers excepted), each linked and of the size the manifest says.
    async fn check_references(
        &self,
        repo: &RepoName,
        doc: &ManifestDoc,
        media_type: &str,
    ) -> Result<(), ProtocolError> {
        if ManifestDoc::is_index(media_type) {
            for m in &doc.manifests {
                let d = descriptor_digest(m)?;
                if !self.exists(&layout::revision_link(repo, &d)).await? {
                    return Err(missing(repo, "manifest", &d));
                }
            }
            return Ok(());
        }
        let config = doc.config.as_ref().ok_or_else(|| invalid("an image manifest needs a config".into()))?;
        for b in std::iter::once(config).chain(&doc.layers) {
            let d = descriptor_digest(b)?;
            if !b.urls.is_empty() {
                continue;
            }
            // The mark is refreshed before the link and size are looked at for good: a `gc`
            // sweeping this unreferenced blob from then on sees it young and keeps it, so the
            // manifest never references deleted bytes. Only once `repo` is known to link it:
            // touching any digest named would let a push tell (by timing) what other
            // repositories hold, and keep their unreferenced content from `gc`.
            if self.exists(&layout::layer_link(repo, &d)).await? {
                marks::touch(&*self.storage, &d).await.map_err(|e| internal("cannot write mark", e))?;
            }
            match self.linked_blob(repo, &d).await? {
                Some(size) if size == b.size => {}
                Some(size) => return Err(invalid(format!("blob {d} has {size} bytes, the manifest says {}", b.size))),
                None => return Err(missing(repo, "blob", &d)),
            }
        }
        Ok(())
    }

    /// Stores a validated manifest: content, then the links that make it reachable, the tag
    /// last, so that no reader ever sees a tag or link to something not yet stored.
    async fn store_manifest(&self, repo: &RepoName, reference: &Reference, m: &Validated) -> Result<(), ProtocolError> {
        let digest = &m.digest;
        // Claimed before looking for the record, as an upload does (see `claim_stored`).
        if !self.claim_stored(digest, "manifest").await? {
            let record = encode_manifest(&Manifest {
                digest: digest.clone(),
                media_type: m.media_type.clone(),
                bytes: m.bytes.clone(),
            });
            self.put(&layout::manifest_record(digest), record).await?;
        }
        self.put(&layout::revision_link(repo, digest), digest.to_string().into_bytes()).await?;
        if !self.exists(&layout::catalog_entry(repo)).await? {
            self.put(&layout::catalog_entry(repo), Vec::new()).await?;
        }
        if let Some(subject) = &m.subject {
            let key = layout::referrer(repo, subject, digest);
            self.put(&key, m.referrer_descriptor().to_string().into_bytes()).await?;
        }
        if let Reference::Tag(t) = reference {
            self.put(&layout::hosted_tag(repo, t), digest.to_string().into_bytes()).await?;
        }
        Ok(())
    }

    pub(super) async fn delete_manifest(&self, repo: &RepoName, reference: &str) -> Result<Answer, ProtocolError> {
        match Reference::parse(reference)? {
            Reference::Tag(t) => {
                // Deleting by tag removes the tag only (distribution-spec 1.1).
                if !self.delete(&layout::hosted_tag(repo, &t)).await? {
                    return Err(manifest_unknown(repo, reference));
                }
            }
            Reference::Digest(d) => {
                if !self.exists(&layout::revision_link(repo, &d)).await? {
                    return Err(manifest_unknown(repo, reference));
                }
                // Tags first: no tag may point at a manifest that is no longer served.
                let prefix = layout::tags_dir(repo);
                for key in self.list(&prefix).await? {
                    let target = self.get(&key, "cannot read tag").await?;
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
}

/// The whole body of a manifest push, refused with 413 past [`MAX_MANIFEST_BYTES`] (by its
/// `Content-Length` before reading, or as it arrives).
async fn read_manifest_body(headers: &HeaderMap, mut body: ByteStream) -> Result<Bytes, ProtocolError> {
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
    Ok(Bytes::from(buf))
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

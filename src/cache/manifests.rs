//! Manifests: by digest (immutable: memory, then the disk record, then the upstreams) and by
//! tag (a tag→digest entry trusted for `tag_ttl`, then revalidated with one `HEAD`, and served
//! stale for up to `serve_stale` when no upstream answers).

use std::sync::Arc;

use bytes::Bytes;
use http::Method;

use super::coalesce::Outcome;
use super::Cache;
use crate::config::Capability;
use crate::distribution::{
    accept_or_all, accepts, Digest, ErrorCode, Manifest, ProtocolError, Reference, RepoName, Source,
    DOCKER_MANIFEST_LIST, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, OCI_INDEX,
};
use crate::registry::Route;
use crate::storage::layout;
use crate::storage::records::{decode_manifest, encode_manifest, TagEntry};
use crate::upstream::{read_bounded, Answer, Reason, UpstreamRequest};

/// A tag entry's key: one per registry, repository, tag and kind of answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct TagKey {
    pub(super) registry: String,
    pub(super) repo: RepoName,
    pub(super) tag: String,
    /// Clients that accept an index get the index; others may get a platform manifest. The
    /// two answers must not overwrite each other.
    pub(super) index: bool,
}

impl TagKey {
    fn object_key(&self) -> String {
        layout::tag_entry(&self.registry, &self.repo, &self.tag, self.index)
    }
}

/// The tag entry key of `tag` for a client that accepts `accept`.
fn tag_key(route: &Route, tag: &str, accept: &[String]) -> TagKey {
    TagKey {
        registry: route.registry.clone(),
        repo: route.repo.clone(),
        tag: tag.to_owned(),
        index: accepts(accept, OCI_INDEX) || accepts(accept, DOCKER_MANIFEST_LIST),
    }
}

impl Cache {
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
        self.remember_sizes(&m).await;
        self.manifests.insert(digest.clone(), m.clone()).await;
        Some(m)
    }

    /// Remembers the sizes `m` declares for its config and layers: the bound of their fetches.
    async fn remember_sizes(&self, m: &Manifest) {
        #[derive(serde::Deserialize)]
        struct Descriptor {
            digest: String,
            size: u64,
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            config: Option<Descriptor>,
            #[serde(default)]
            layers: Vec<Descriptor>,
        }
        let Ok(doc) = serde_json::from_slice::<Doc>(&m.bytes) else { return };
        for d in doc.config.iter().chain(&doc.layers) {
            if let Ok(digest) = Digest::parse(&d.digest) {
                self.declared.insert(digest, d.size).await;
            }
        }
    }

    async fn store_manifest(&self, m: &Arc<Manifest>) {
        self.remember_sizes(m).await;
        self.manifests.insert(m.digest.clone(), m.clone()).await;
        let key = layout::manifest_record(&m.digest);
        if let Err(e) = self.storage.put_object(&key, encode_manifest(m)).await {
            self.metrics.cache_write_errors.inc();
            tracing::warn!(digest = %m.digest, error = %e, "manifest served but not persisted");
        }
    }

    async fn manifest_by_digest(self: &Arc<Self>, route: &Route, digest: &Digest, accept: &[String]) -> Outcome {
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
        let key2 = key.clone();
        self.coalesce_manifest(key, async move {
            // A flight that ended while this request read the store left its answer in memory;
            // a store read (a bucket's GET) can take longer than a whole flight.
            if let Some(m) = this.manifests.get(&digest_owned).await {
                if this.servable(&route, &digest_owned, "manifests").await? {
                    this.count("manifest", "hit");
                    return Ok((m, Source::Cache));
                }
            }
            // Another replica's flight stores the record this one reads.
            let across = this.across_cluster(&format!("manifest\n{key2}"), || this.local_manifest(&digest_owned)).await;
            let _lease = match across {
                Ok(lease) => lease,
                Err(m) => {
                    this.count("manifest", "hit");
                    return Ok((m, Source::Cache));
                }
            };
            let reference = Reference::Digest(digest_owned);
            let (m, up) = this.fetch_manifest(&route, &reference, &accept, Capability::Pull).await?;
            this.store_manifest(&m).await;
            Ok((m, Source::Upstream(up)))
        })
        .await
    }

    /// Runs `work` as the one fetch for `key` (see [`super::coalesce`]), counting the callers
    /// that joined one already on.
    async fn coalesce_manifest(
        &self,
        key: String,
        work: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) -> Outcome {
        let (outcome, joined) = self.manifest_fetches.run(key, work).await;
        let (m, source) = outcome?;
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
        let req = UpstreamRequest::new(Method::GET, &route.repo, format!("manifests/{reference}"), cap)
            .with_accept(accept_or_all(accept));
        let mut attempts = pool.attempts(req);
        let what = format!("manifest {}:{reference}", route.repo);
        while let Some(answer) = attempts.next().await {
            let up = answer.upstream.clone();
            match read_manifest(answer, reference).await {
                Ok(m) => {
                    self.count("manifest", "miss");
                    return Ok((Arc::new(m), up.name().to_owned()));
                }
                Err(reason) => {
                    match &reason {
                        Reason::DigestMismatch => self.metrics.digest_mismatches.inc(),
                        Reason::InvalidManifest(_) => {
                            self.metrics.invalid_manifests.with_label_values(&[up.name()]).inc()
                        }
                        _ => {}
                    }
                    tracing::warn!(upstream = up.name(), %reason, %what, "bad manifest answer; trying the next upstream");
                    attempts.rejected(&up, reason);
                }
            }
        }
        Err(attempts.into_error(ErrorCode::ManifestUnknown, &what))
    }

    async fn manifest_by_tag(self: &Arc<Self>, route: &Route, tag: &str, accept: &[String]) -> Outcome {
        let key = tag_key(route, tag, accept);
        let entry = self.tag_entry(&key).await;
        if let Some(m) = self.fresh(&key, entry.as_ref(), accept).await {
            self.count("manifest", "hit");
            return Ok((m, Source::Cache));
        }
        self.tag_flight(route, tag, entry, accept).await
    }

    /// The one flight for a tag: resolves it upstream unless a flight that ended while the
    /// caller read `entry` from the store left a fresh answer in memory (a store read, a
    /// bucket's GET, can take longer than a whole flight).
    pub(super) async fn tag_flight(
        self: &Arc<Self>,
        route: &Route,
        tag: &str,
        entry: Option<TagEntry>,
        accept: &[String],
    ) -> Outcome {
        let key = tag_key(route, tag, accept);
        let this = self.clone();
        let (route, accept) = (route.clone(), accept.to_vec());
        let coalesce_key = format!("{}\n{}\n{}\n{}", key.registry, key.repo, key.tag, key.index);
        let flight = format!("tag\n{coalesce_key}");
        self.coalesce_manifest(coalesce_key, async move {
            let entry = match this.tags.get(&key).await {
                Some(e) => Some(e),
                None => entry,
            };
            if let Some(m) = this.fresh(&key, entry.as_ref(), &accept).await {
                this.count("manifest", "hit");
                return Ok((m, Source::Cache));
            }
            // Another replica may have revalidated it within the TTL: the store is shared.
            let _lease = match this.across_cluster(&flight, || this.stored_fresh_tag(&key, &accept)).await {
                Ok(lease) => lease,
                Err(m) => {
                    this.count("manifest", "hit");
                    return Ok((m, Source::Cache));
                }
            };
            this.resolve_tag(&route, key, entry, &accept).await
        })
        .await
    }

    /// The manifest `entry` names if it is fresh and the client accepts its type.
    async fn fresh(&self, key: &TagKey, entry: Option<&TagEntry>, accept: &[String]) -> Option<Arc<Manifest>> {
        let e = entry?;
        if self.age(e) >= self.tag_ttl(key).as_secs() || !accepts(accept, &e.media_type) {
            return None;
        }
        self.local_by_str(&e.digest).await
    }

    /// How long `key`'s answer is trusted: the first matching `cache.tag_policies` entry's
    /// TTL, or `cache.tag_ttl`.
    pub(super) fn tag_ttl(&self, key: &TagKey) -> std::time::Duration {
        if self.policies.is_empty() {
            return self.config.tag_ttl;
        }
        let image = format!("{}/{}:{}", key.registry, key.repo, key.tag);
        self.policies.iter().find(|(glob, _)| glob.matches(&image)).map_or(self.config.tag_ttl, |(_, ttl)| *ttl)
    }

    /// Seconds since the tag entry was last confirmed by an upstream (by the cache's clock).
    fn age(&self, entry: &TagEntry) -> u64 {
        self.clock.now_secs().saturating_sub(entry.validated_at)
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

    /// The manifest the stored tag entry names, if that entry is fresh (bypassing memory: with
    /// a cluster, another replica may have revalidated the tag since).
    async fn stored_fresh_tag(&self, key: &TagKey, accept: &[String]) -> Option<Arc<Manifest>> {
        self.cluster.as_ref()?;
        let raw = self.storage.get_object(&key.object_key()).await.ok()??;
        let e = TagEntry::decode(&raw)?;
        let m = self.fresh(key, Some(&e), accept).await?;
        self.tags.insert(key.clone(), e).await;
        Some(m)
    }

    async fn save_tag(&self, key: &TagKey, m: &Manifest) {
        let validated_at = self.clock.now_secs();
        let e = TagEntry { digest: m.digest.to_string(), media_type: m.media_type.clone(), validated_at };
        self.tags.insert(key.clone(), e.clone()).await;
        if let Err(err) = self.storage.put_object(&key.object_key(), e.encode()).await {
            self.metrics.cache_write_errors.inc();
            tracing::warn!(error = %err, "tag mapping not persisted");
        }
    }

    /// Revalidates a known tag with a HEAD (no body moves when the digest is unchanged), or
    /// fetches it; with every upstream down, serves the last known answer as stale.
    async fn resolve_tag(&self, route: &Route, key: TagKey, entry: Option<TagEntry>, accept: &[String]) -> Outcome {
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
                Err(e) if e.code == ErrorCode::ManifestUnknown && self.config.keep_deleted_tags => {
                    return Ok(self.keep_deleted(&key, m).await);
                }
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

    /// Stale-if-error: the last known answer while it is at most `serve_stale` old, or `why`.
    fn serve_stale(&self, key: &TagKey, entry: Option<&TagEntry>, m: &Arc<Manifest>, why: ProtocolError) -> Outcome {
        let age = entry.map_or_else(|| self.clock.now_secs(), |e| self.age(e));
        if age > self.config.serve_stale.as_secs() {
            return Err(why);
        }
        // A gateway that lost its upstreams keeps serving what it knows.
        tracing::warn!(repo = %key.repo, tag = %key.tag, digest = %m.digest, error = %why.message, "serving stale tag");
        self.count("manifest", "stale");
        Ok((m.clone(), Source::Stale))
    }

    /// `cache.keep_deleted_tags`: the resolving upstream says the tag is gone, but clusters may
    /// still run it; the last good answer is served, and trusted for another TTL (the upstream
    /// is asked once per TTL, so a tag that comes back is seen then).
    async fn keep_deleted(&self, key: &TagKey, m: &Arc<Manifest>) -> (Arc<Manifest>, Source) {
        self.save_tag(key, m).await;
        tracing::warn!(registry = %key.registry, repo = %key.repo, tag = %key.tag, digest = %m.digest,
            "the upstream no longer has this tag; serving the last good digest (cache.keep_deleted_tags)");
        self.count("manifest", "kept_deleted");
        (m.clone(), Source::Stale)
    }

    /// The tag's current digest according to the resolve-capable upstreams (`None` if the
    /// upstream answered without a digest header).
    async fn head_tag(&self, route: &Route, tag: &str, accept: &[String]) -> Result<Option<Digest>, ProtocolError> {
        let pool = self.pool(&route.registry)?;
        let req = UpstreamRequest::new(Method::HEAD, &route.repo, format!("manifests/{tag}"), Capability::Resolve)
            .with_accept(accept_or_all(accept));
        let mut attempts = pool.attempts(req);
        let Some(answer) = attempts.next().await else {
            return Err(attempts.into_error(ErrorCode::ManifestUnknown, &format!("manifest {}:{tag}", route.repo)));
        };
        Ok(answer
            .response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok()))
    }
}

/// Reads a manifest body (bounded) and checks it against the digest it was asked by.
async fn read_manifest(answer: Answer, reference: &Reference) -> Result<Manifest, Reason> {
    let resp = answer.response;
    if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
        return Err(Reason::Body(format!("manifest larger than {MAX_MANIFEST_BYTES} bytes")));
    }
    let header_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let buf = read_bounded(resp, MAX_MANIFEST_BYTES).await?;
    let bytes = Bytes::from(buf);
    let digest = Digest::of(&bytes);
    if let Reference::Digest(want) = reference {
        if *want != digest {
            return Err(Reason::DigestMismatch);
        }
    }
    let media_type = manifest_media_type(header_type, &bytes)?;
    Ok(Manifest { digest, media_type, bytes })
}

/// The media type to serve a manifest with: its `Content-Type`, or the `mediaType` it names.
/// A body that is not a JSON object, or whose `mediaType` contradicts a manifest
/// `Content-Type`, is an upstream fault (a captive portal, a broken mirror): never cached.
fn manifest_media_type(header: Option<String>, bytes: &[u8]) -> Result<String, Reason> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| Reason::InvalidManifest(format!("not a JSON object: {e}")))?;
    let header = header.filter(|t| !t.is_empty() && !t.contains('\n'));
    let essence = header.as_deref().map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
    if let (Some(ct), Some(mt)) = (&essence, &probe.media_type) {
        if MANIFEST_MEDIA_TYPES.contains(&ct.as_str()) && ct != mt {
            return Err(Reason::InvalidManifest(format!("Content-Type {ct} but mediaType {mt}")));
        }
    }
    Ok(header.or(probe.media_type).unwrap_or_else(|| "application/json".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_must_be_json_and_agree_with_its_content_type() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let ct = |t: &str| Some(t.to_owned());
        assert_eq!(manifest_media_type(ct(OCI_MANIFEST_TYPE), oci).unwrap(), OCI_MANIFEST_TYPE);
        assert_eq!(manifest_media_type(None, oci).unwrap(), OCI_MANIFEST_TYPE, "sniffed");
        assert!(manifest_media_type(ct("application/json; charset=utf-8"), oci).is_ok(), "a generic type is no claim");
        let contradicts = manifest_media_type(ct("application/vnd.oci.image.index.v1+json"), oci).unwrap_err();
        assert_eq!(contradicts.label(), "invalid_manifest");
        assert_eq!(manifest_media_type(ct(OCI_MANIFEST_TYPE), b"<html>").unwrap_err().label(), "invalid_manifest");
        assert!(manifest_media_type(None, b"[1,2]").is_err(), "an array is no manifest");
    }

    const OCI_MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
}

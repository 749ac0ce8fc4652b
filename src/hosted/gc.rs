//! `ferry gc`: removes hosted content that no manifest of a hosted repository references.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use super::manifests::ManifestDoc;
use crate::distribution::{Digest, Manifest};
use crate::storage::records::decode_manifest;
use crate::storage::{layout, marks, Storage};

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

/// What the hosted repositories hold: the hex of every digest a manifest revision keeps alive
/// (the revisions themselves included), and every repository's layer links by digest hex.
#[derive(Default)]
struct Reachable {
    live: HashSet<String>,
    layer_links: HashMap<String, Vec<String>>,
}

/// Removes hosted content no manifest references: mark every digest reachable from a manifest
/// revision of any hosted repository, then sweep marks that are unreferenced and older than
/// `grace`. Shared digests lose only their mark (the cache may be serving them). Run it while
/// pushes are quiet: a push that reuses an old unreferenced blob during the sweep can lose it.
pub async fn gc(storage: &dyn Storage, grace: Duration, dry_run: bool) -> io::Result<GcReport> {
    let reachable = reachable(storage).await?;
    let mut report = GcReport::default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for key in storage.list_objects(layout::MARKS_PREFIX).await? {
        let Some(hex) = key.strip_prefix(layout::MARKS_PREFIX) else { continue };
        let Some(digest) = layout::digest_from_hex(hex) else { continue };
        if reachable.live.contains(hex) {
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
        let links = reachable.layer_links.get(hex).map(Vec::as_slice).unwrap_or_default();
        sweep(storage, &key, digest, &mark, links, dry_run, &mut report).await?;
    }
    Ok(report)
}

/// Walks every repository's keys: revisions (and what their manifests reference) are live.
async fn reachable(storage: &dyn Storage) -> io::Result<Reachable> {
    let mut found = Reachable::default();
    for key in storage.list_objects(layout::REPOS_PREFIX).await? {
        match layout::classify_repo_key(&key) {
            layout::RepoKey::Revision(hex) => {
                let Some(digest) = layout::digest_from_hex(hex) else { continue };
                found.live.insert(digest.hex().to_owned());
                let record = storage.get_object(&layout::manifest_record(&digest)).await?;
                let Some(Manifest { bytes, .. }) = record.and_then(|r| decode_manifest(&digest, r)) else {
                    tracing::warn!(%digest, "manifest record missing or corrupt; its references are unknown");
                    continue;
                };
                if let Ok(doc) = serde_json::from_slice::<ManifestDoc>(&bytes) {
                    for d in doc.references() {
                        if let Ok(d) = Digest::parse(&d.digest) {
                            found.live.insert(d.hex().to_owned());
                        }
                    }
                }
            }
            layout::RepoKey::Layer(hex) => found.layer_links.entry(hex.to_owned()).or_default().push(key.clone()),
            layout::RepoKey::Other => {}
        }
    }
    Ok(found)
}

/// Sweeps one unreferenced, old mark (`mark_key`) and what it owns; dry, only reports.
async fn sweep(
    storage: &dyn Storage,
    mark_key: &str,
    digest: Digest,
    mark: &marks::Mark,
    links: &[String],
    dry_run: bool,
    report: &mut GcReport,
) -> io::Result<()> {
    if !dry_run {
        // Links first, so no repository ever claims bytes that are gone.
        for link in links {
            storage.delete_object(link).await?;
        }
    }
    match (mark.shared, mark.kind.as_str()) {
        (true, _) => report.released_shared.push(digest),
        (false, "manifest") => {
            if !dry_run {
                storage.delete_object(&layout::manifest_record(&digest)).await?;
            }
            report.removed_manifests.push(digest);
        }
        (false, _) => {
            let size = storage.blob_size(&digest).await?.unwrap_or(0);
            if dry_run || storage.delete_blob(&digest).await? {
                report.removed_blobs.push((digest, size));
            }
        }
    }
    if !dry_run {
        storage.delete_object(mark_key).await?;
    }
    Ok(())
}

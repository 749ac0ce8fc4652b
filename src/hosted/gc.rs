//! `ferry gc`: removes hosted content that no manifest of a hosted repository references.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Unreferenced digests whose bytes stay because the cache shares them: their mark and the
    /// repositories' links to them are dropped (a link must never outlive its mark, see
    /// [`sweep`]), the bytes are left to the cache's eviction.
    pub released_shared: Vec<Digest>,
    /// Hosted digests still referenced (including those a push referenced during the sweep).
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

impl Reachable {
    fn links(&self, hex: &str) -> &[String] {
        self.layer_links.get(hex).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Removes hosted content no manifest references: mark every digest reachable from a manifest
/// revision of any hosted repository, then sweep marks that are unreferenced and older than
/// `grace`. Shared digests lose only their mark and links (the cache may be serving them).
///
/// Pushes may run meanwhile: they claim (refresh) a digest's mark before they look at what is
/// stored or link it, and before deleting anything this re-lists the repositories (content a
/// push linked or referenced since the first listing stays) and re-reads each mark (one a
/// push refreshed stays). Only a push that claims in the instant between that re-read and the
/// delete can still lose its blob, so quiet times remain the best time to run it.
///
/// A revision whose manifest record is missing or corrupt stops it before anything is deleted:
/// what that manifest references is unknown and would look unreferenced.
pub async fn gc(storage: &dyn Storage, grace: Duration, dry_run: bool) -> io::Result<GcReport> {
    let first = reachable(storage).await?;
    let mut report = GcReport::default();
    let mut candidates = Vec::new();
    for key in storage.list_objects(layout::MARKS_PREFIX).await? {
        let Some(hex) = key.strip_prefix(layout::MARKS_PREFIX) else { continue };
        let Some(digest) = layout::digest_from_hex(hex) else { continue };
        if first.live.contains(hex) {
            report.kept += 1;
            continue;
        }
        match old_mark(storage, &digest, grace).await? {
            Some(mark) => candidates.push((digest, mark)),
            None => report.young += 1,
        }
    }
    // Links and revisions pushed since the first listing keep their content.
    let second = reachable(storage).await?;
    for (digest, mark) in candidates {
        let hex = digest.hex();
        let links = second.links(hex);
        if second.live.contains(hex) || links.iter().any(|l| !first.links(hex).contains(l)) {
            report.kept += 1;
            continue;
        }
        // Re-read right before deleting: a push that claimed the digest since made it young.
        if old_mark(storage, &digest, grace).await?.is_none() {
            report.young += 1;
            continue;
        }
        sweep(storage, &digest, &mark, links, grace, dry_run, &mut report).await?;
    }
    Ok(report)
}

/// The mark of `digest` if it is older than `grace`; `None` if it is young (or gone, or
/// undecodable: treated as young shared content, so it is never swept).
async fn old_mark(storage: &dyn Storage, digest: &Digest, grace: Duration) -> io::Result<Option<marks::Mark>> {
    let Some(raw) = storage.get_object(&layout::mark(digest)).await? else { return Ok(None) };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(marks::decode(&raw).filter(|m| now.saturating_sub(m.since) >= grace.as_secs()))
}

/// Walks every repository's keys: revisions (and what their manifests reference) are live. A
/// revision whose record is missing or corrupt is an error: its references are unknown.
async fn reachable(storage: &dyn Storage) -> io::Result<Reachable> {
    let mut found = Reachable::default();
    for key in storage.list_objects(layout::REPOS_PREFIX).await? {
        match layout::classify_repo_key(&key) {
            layout::RepoKey::Revision(hex) => {
                let Some(digest) = layout::digest_from_hex(hex) else { continue };
                found.live.insert(digest.hex().to_owned());
                for d in references(storage, &digest, &key).await? {
                    found.live.insert(d.hex().to_owned());
                }
            }
            layout::RepoKey::Layer(hex) => found.layer_links.entry(hex.to_owned()).or_default().push(key.clone()),
            layout::RepoKey::Other => {}
        }
    }
    Ok(found)
}

/// What manifest `digest` (linked by revision link `link`) references.
async fn references(storage: &dyn Storage, digest: &Digest, link: &str) -> io::Result<Vec<Digest>> {
    let unknown = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "manifest {digest} (revision link {link}) {what}: what it references is unknown, so gc stopped \
                 before deleting anything; push the manifest again or delete it, then rerun gc"
            ),
        )
    };
    let record = storage.get_object(&layout::manifest_record(digest)).await?.ok_or_else(|| unknown("is missing"))?;
    let Manifest { bytes, .. } = decode_manifest(digest, record).ok_or_else(|| unknown("has a corrupt record"))?;
    let doc = serde_json::from_slice::<ManifestDoc>(&bytes).map_err(|_| unknown("is not a manifest Ferry can read"))?;
    // Descriptor digests were validated when the manifest was pushed.
    Ok(doc.references().filter_map(|d| Digest::parse(&d.digest).ok()).collect())
}

/// Sweeps one unreferenced, old mark and what it owns; dry, only reports.
///
/// Links go even for shared content whose bytes stay: a link without a mark would let a later
/// manifest reference bytes that the cache's eviction (which spares only marked blobs) may
/// delete at any time, and nothing would mark them again.
async fn sweep(
    storage: &dyn Storage,
    digest: &Digest,
    mark: &marks::Mark,
    links: &[String],
    grace: Duration,
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
        (true, _) => report.released_shared.push(digest.clone()),
        (false, "manifest") => {
            if !dry_run {
                storage.delete_object(&layout::manifest_record(digest)).await?;
            }
            report.removed_manifests.push(digest.clone());
        }
        (false, _) => {
            let size = storage.blob_size(digest).await?.unwrap_or(0);
            if dry_run || storage.delete_blob(digest).await? {
                report.removed_blobs.push((digest.clone(), size));
            }
        }
    }
    // The mark goes last, and only if still old: a push that claimed the digest meanwhile
    // found the content gone and is committing its own copy, which must stay marked.
    if !dry_run && old_mark(storage, digest, grace).await?.is_some() {
        marks::remove(storage, digest).await?;
    }
    Ok(())
}

//! Hosted ownership marks: which digests pushed content uses. They are storage-level facts
//! that both sides read: the cache must not evict a marked blob (it may be the only copy of
//! something pushed here) nor serve a private one on a proxied path; hosted namespaces claim
//! digests and `gc` sweeps unreferenced ones. Living here, beside the layout, they let `cache`
//! and `hosted` both stand on `storage` without knowing each other.

use std::collections::HashSet;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{layout, Storage};
use crate::distribution::Digest;

/// What a mark records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mark {
    /// `blob` or `manifest`.
    pub kind: String,
    /// The content was already stored (by the cache) when hosted content first used it, or an
    /// upstream has since confirmed it: it is public, and `gc` drops only the mark and leaves
    /// the bytes to the cache's eviction.
    pub shared: bool,
    /// Unix seconds when first used; `gc` leaves young marks alone (pushes in progress).
    pub since: u64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Decodes a stored mark (`None` if it is not one; each caller picks its safe reading).
pub fn decode(raw: &[u8]) -> Option<Mark> {
    serde_json::from_slice(raw).ok()
}

/// Whether this digest is known only from a push (a private image's own layer or manifest),
/// not from any upstream. The proxied side must not serve such content to whoever names its
/// digest, unless an upstream confirms it is public (then [`mark_public`]).
pub async fn is_private(storage: &dyn Storage, digest: &Digest) -> io::Result<bool> {
    let Some(raw) = storage.get_object(&layout::mark(digest)).await? else { return Ok(false) };
    Ok(decode(&raw).is_none_or(|m| !m.shared))
}

/// Records that an upstream serves this digest too: it is public, and (as shared content) `gc`
/// leaves its bytes to the cache.
pub async fn mark_public(storage: &dyn Storage, digest: &Digest) -> io::Result<()> {
    let Some(raw) = storage.get_object(&layout::mark(digest)).await? else { return Ok(()) };
    let Some(mut mark) = decode(&raw) else { return Ok(()) };
    if mark.shared {
        return Ok(());
    }
    mark.shared = true;
    storage.put_object(&layout::mark(digest), serde_json::to_vec(&mark).map_err(io::Error::other)?).await
}

/// Marks `digest` as used by hosted content now, before the caller looks at what is stored
/// and long before it links anything: a `gc` that reads the mark afterwards sees it young and
/// keeps the content, and content is never committed unmarked (eviction would not spare it).
///
/// An existing mark is refreshed: a blob deleted from one repository and uploaded again to
/// another is as young as the new upload (a stale `since` let `gc` remove a blob pushed a
/// second earlier); its kind and sharing stay (public stays public, and a private blob pushed
/// again stays private). A new mark is private; returns `true` when there was none, so that a
/// caller that finds the content stored both before and after the claim records that the cache
/// had it first ([`mark_public`]). Stored only before may be a blob `gc` was deleting, stored
/// only after a concurrent push of the same private content: neither is public.
pub async fn claim(storage: &dyn Storage, digest: &Digest, kind: &str) -> io::Result<bool> {
    let key = layout::mark(digest);
    let previous = storage.get_object(&key).await?.as_deref().and_then(decode);
    let created = previous.is_none();
    let mark = match previous {
        Some(m) => Mark { since: now_secs(), ..m },
        None => Mark { kind: kind.to_owned(), shared: false, since: now_secs() },
    };
    storage.put_object(&key, serde_json::to_vec(&mark).map_err(io::Error::other)?).await?;
    Ok(created)
}

/// Refreshes an existing mark's `since` (a manifest push about to reference the digest), so
/// that a `gc` sweeping now sees it young; without a mark there is nothing `gc` would sweep,
/// and none is created (the digest may name nothing stored).
pub async fn touch(storage: &dyn Storage, digest: &Digest) -> io::Result<()> {
    let key = layout::mark(digest);
    let Some(mark) = storage.get_object(&key).await?.as_deref().and_then(decode) else { return Ok(()) };
    let mark = Mark { since: now_secs(), ..mark };
    storage.put_object(&key, serde_json::to_vec(&mark).map_err(io::Error::other)?).await
}

/// The hex digests of everything hosted content uses: one listing, for the cache's start-up
/// inventory (instead of one lookup per blob).
pub async fn hosted_digests(storage: &dyn Storage) -> io::Result<HashSet<String>> {
    let keys = storage.list_objects(layout::MARKS_PREFIX).await?;
    Ok(keys.into_iter().filter_map(|k| k.strip_prefix(layout::MARKS_PREFIX).map(str::to_owned)).collect())
}

/// Whether hosted content uses this digest (a blob or a manifest record). The cache's eviction
/// must skip such blobs: they are the only copy of something pushed here.
pub async fn is_hosted(storage: &dyn Storage, digest: &Digest) -> io::Result<bool> {
    Ok(storage.get_object(&layout::mark(digest)).await?.is_some())
}

/// Removes the mark of `digest` (`gc`).
pub async fn remove(storage: &dyn Storage, digest: &Digest) -> io::Result<bool> {
    storage.delete_object(&layout::mark(digest)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claim_refreshes_the_mark_and_keeps_private_content_private() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::FsStorage::open(dir.path()).unwrap();
        let d = Digest::of(b"blob");
        let old = Mark { kind: "blob".into(), shared: false, since: 1 };
        storage.put_object(&layout::mark(&d), serde_json::to_vec(&old).unwrap()).await.unwrap();
        assert!(!claim(&storage, &d, "blob").await.unwrap(), "the mark existed");
        let raw = storage.get_object(&layout::mark(&d)).await.unwrap().unwrap();
        let now = decode(&raw).unwrap();
        assert!(now.since > 1, "a re-claim makes the mark young again");
        assert!(!now.shared && is_private(&storage, &d).await.unwrap(), "and never makes private content public");
        let fresh = Digest::of(b"new");
        assert!(claim(&storage, &fresh, "blob").await.unwrap(), "a first claim creates the mark");
        assert!(is_private(&storage, &fresh).await.unwrap(), "private until known otherwise");
        mark_public(&storage, &fresh).await.unwrap();
        claim(&storage, &fresh, "blob").await.unwrap();
        assert!(!is_private(&storage, &fresh).await.unwrap(), "public stays public");
    }

    #[tokio::test]
    async fn a_touch_refreshes_only_existing_marks() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::FsStorage::open(dir.path()).unwrap();
        let d = Digest::of(b"blob");
        let old = Mark { kind: "manifest".into(), shared: true, since: 1 };
        storage.put_object(&layout::mark(&d), serde_json::to_vec(&old).unwrap()).await.unwrap();
        touch(&storage, &d).await.unwrap();
        let now = decode(&storage.get_object(&layout::mark(&d)).await.unwrap().unwrap()).unwrap();
        assert_eq!((now.kind.as_str(), now.shared), ("manifest", true));
        assert!(now.since > 1);
        let none = Digest::of(b"unmarked");
        touch(&storage, &none).await.unwrap();
        assert!(!is_hosted(&storage, &none).await.unwrap(), "a touch never creates a mark");
    }
}

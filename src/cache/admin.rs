//! Offline cache maintenance behind `ferry cache stats|verify|prune`. These work on the store
//! directly and never touch staging files, so they are safe beside a running Ferry (whose own
//! inventory then notices removed blobs when it next reads them and fetches them again).

use std::io;

use futures_util::StreamExt;

use crate::distribution::{Digest, DigestVerifier};
use crate::storage::records::decode_manifest;
use crate::storage::{layout, Storage};

/// What is stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Committed blobs.
    pub blobs: usize,
    /// Their total size in bytes.
    pub blob_bytes: u64,
    /// Manifest records.
    pub manifests: usize,
    /// Tag mappings.
    pub tags: usize,
}

/// Counts blobs, bytes, manifests and tags.
pub async fn stats(storage: &dyn Storage) -> io::Result<Stats> {
    let blobs = storage.list_blobs().await?;
    Ok(Stats {
        blobs: blobs.len(),
        blob_bytes: blobs.iter().map(|b| b.size).sum(),
        manifests: storage.list_objects(layout::MANIFESTS_PREFIX).await?.len(),
        tags: storage.list_objects(layout::TAGS_PREFIX).await?.len(),
    })
}

/// The outcome of a verification pass.
#[derive(Debug, Default)]
pub struct Verified {
    /// Blobs whose bytes hash to their name.
    pub good_blobs: usize,
    /// Blobs that did not, now quarantined.
    pub bad_blobs: Vec<Digest>,
    /// Manifest records that did not decode or match their digest, now removed.
    pub bad_manifests: Vec<String>,
    /// Keys of incomplete multipart uploads a crash left (S3), now aborted; `None` if the
    /// store's server cannot list them.
    pub abandoned_uploads: Option<Vec<String>>,
}

/// Re-hashes every blob (quarantining mismatches), checks every manifest record, and aborts
/// multipart uploads begun more than `abandoned_after` ago (a fetch running longer than that
/// in a live Ferry would lose its upload and store the blob afresh at its commit).
pub async fn verify(storage: &dyn Storage, abandoned_after: std::time::Duration) -> io::Result<Verified> {
    let mut out =
        Verified { abandoned_uploads: storage.abandoned_uploads(abandoned_after, true).await?, ..Verified::default() };
    for blob in storage.list_blobs().await? {
        let Some(mut stream) = storage.read_blob(&blob.digest, 0, blob.size).await? else { continue };
        let mut hasher = DigestVerifier::new();
        let mut len = 0u64;
        let mut broken = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    len += c.len() as u64;
                    hasher.update(&c);
                }
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken || len != blob.size || hasher.finish() != blob.digest {
            storage.quarantine_blob(&blob.digest).await?;
            out.bad_blobs.push(blob.digest);
        } else {
            out.good_blobs += 1;
        }
    }
    for key in storage.list_objects(layout::MANIFESTS_PREFIX).await? {
        let hex = key.strip_prefix(layout::MANIFESTS_PREFIX).unwrap_or_default();
        let valid = match (layout::digest_from_hex(hex), storage.get_object(&key).await?) {
            (Some(d), Some(record)) => decode_manifest(&d, record).is_some(),
            _ => false,
        };
        if !valid {
            // A bad record is simply refetched on the next pull; keeping it would only mislead.
            storage.delete_object(&key).await?;
            out.bad_manifests.push(key);
        }
    }
    Ok(out)
}

/// Removes the oldest cached blobs until the cache is at most `max` bytes; pushed (hosted)
/// content is neither counted nor removed (it is the only copy). Returns `(removed, bytes)`.
pub async fn prune(storage: &dyn Storage, max: u64) -> io::Result<(usize, u64)> {
    let hosted = crate::storage::marks::hosted_digests(storage).await?;
    let mut blobs: Vec<_> =
        storage.list_blobs().await?.into_iter().filter(|b| !hosted.contains(b.digest.hex())).collect();
    blobs.sort_by_key(|b| b.modified);
    let mut total: u64 = blobs.iter().map(|b| b.size).sum();
    let (mut removed, mut freed) = (0, 0);
    for b in blobs {
        if total <= max {
            break;
        }
        storage.delete_blob(&b.digest).await?;
        total -= b.size;
        freed += b.size;
        removed += 1;
    }
    Ok((removed, freed))
}

//! The content-addressed store: blobs by digest, plus small metadata objects (manifest records,
//! tag mappings, hosted links and marks), behind the narrow [`Storage`] trait so that an
//! S3-compatible backend can replace the local filesystem without the cache noticing.
//!
//! Nothing half-written is ever visible: data is staged in a temp file on the same filesystem,
//! verified by the caller, then fsynced and renamed into place (and the directory fsynced).
//!
//! * [`layout`]: every key and path, with the tree of the whole store.
//! * [`records`]: the manifest record and tag entry formats.
//! * [`marks`]: hosted ownership marks (shared facts of the cache and hosted namespaces).
//! * [`fs`]: the filesystem backend; `mapped`: its cache hits as slices of a memory map.
//! * [`s3`]: the S3-compatible backend (local staging); `multipart`: the upload alongside a
//!   fetch; `hot`: its local copy of hot blobs; `abandoned`: uploads a crash left behind.
//! * [`Metered`]: either backend with its operations timed and its failures counted.

mod abandoned;
pub mod fs;
mod hot;
pub mod layout;
mod mapped;
pub mod marks;
mod metered;
mod multipart;
pub mod records;
pub mod s3;

pub use fs::{file_stream, FsStorage, HIT_CHUNK};
pub use metered::Metered;
pub use s3::S3Storage;

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;

use crate::distribution::Digest;

/// Size of each read on the cache-hit path: large reads mean few syscalls and few task hops.
pub const READ_CHUNK: usize = 512 * 1024;

pub use crate::distribution::ByteStream;

/// What the cache needs from a store. Blobs are staged locally (the fetch writes and readers
/// tail the staged file while it grows), then committed under their verified digest.
pub trait Storage: Send + Sync + 'static {
    /// The size of a committed blob, or `None` if it is not stored.
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<u64>>>;
    /// Bytes `start..end` of a committed blob, or `None` if it is not stored.
    fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> BoxFuture<'_, io::Result<Option<ByteStream>>>;
    /// A new, empty staging file.
    fn stage(&self) -> BoxFuture<'_, io::Result<Staged>>;
    /// A new staging file for a fetch of `digest`, whose durable bytes the store may start
    /// copying before the commit (the S3 backend's multipart upload alongside the fetch).
    fn stage_blob(&self, _digest: &Digest) -> BoxFuture<'_, io::Result<Staged>> {
        self.stage()
    }
    /// Makes a staged file durable and visible as `digest`. The caller has verified it.
    fn commit(&self, staged: Arc<Staged>, digest: &Digest) -> BoxFuture<'_, io::Result<()>>;
    /// A small metadata object, or `None`.
    fn get_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<Vec<u8>>>>;
    /// Atomically writes a small metadata object.
    fn put_object(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>>;
    /// Publishes a staging file whole as the object `key` (a chunk of an upload shared by the
    /// replicas of a cluster): visible whole or not at all, like every object.
    fn put_staged(&self, key: &str, staged: Arc<Staged>) -> BoxFuture<'_, io::Result<()>>;
    /// An object's bytes as a stream (for objects too large for [`Storage::get_object`]), or
    /// `None` if there is none.
    fn read_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<ByteStream>>>;
    /// Every committed blob with its size and last-modified time (the start-up inventory).
    fn list_blobs(&self) -> BoxFuture<'_, io::Result<Vec<BlobInfo>>>;
    /// Moves a blob that failed verification out of the store, keeping it for inspection.
    fn quarantine_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<()>>;
    /// Every object key under `prefix` (a "directory" ending in `/`), at any depth, sorted.
    /// Hosted namespaces list tags, repositories and links with it (an S3 prefix listing).
    fn list_objects(&self, prefix: &str) -> BoxFuture<'_, io::Result<Vec<String>>>;
    /// Removes a metadata object; `false` if there was none.
    fn delete_object(&self, key: &str) -> BoxFuture<'_, io::Result<bool>>;
    /// Removes a committed blob; `false` if there was none. Readers holding it open finish.
    fn delete_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<bool>>;
    /// A URL the client may fetch a committed blob from directly (a presigned GET, for
    /// `storage.s3.redirect`), or `None` to have Ferry stream it.
    fn blob_url(&self, _digest: &Digest) -> BoxFuture<'_, io::Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
    /// Keys of incomplete multipart uploads under this store begun more than `older_than`
    /// ago, aborted if `abort`; `None` if the store's server cannot list them. A store with no
    /// such uploads (the filesystem) has none.
    fn abandoned_uploads(
        &self,
        _older_than: std::time::Duration,
        _abort: bool,
    ) -> BoxFuture<'_, io::Result<Option<Vec<String>>>> {
        Box::pin(async { Ok(Some(Vec::new())) })
    }
    /// What is wrong with a part of the store Ferry can serve without (the bucket of the S3
    /// backend: blobs then stream uncached from the upstreams), or `None` if all is well.
    /// Checked by `/readyz` after [`Storage::probe`].
    fn degraded(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
    /// Proves the store is writable now (the readiness probe): writes and removes a probe.
    fn probe(&self) -> BoxFuture<'_, io::Result<()>>;
}

/// Opens the store `config` describes: the filesystem under `root`, or a bucket with local
/// staging (and hot tier) under `root`. `mapped`: cache hits from disk as memory maps.
/// `serving`: this is the server, which may remove staging leftovers of a previous run (an
/// admin command running beside it must not delete its fetches in progress) and loads the
/// hot tier's inventory.
pub fn open(config: &crate::config::StorageConfig, mapped: bool, serving: bool) -> io::Result<Arc<dyn Storage>> {
    let fs = FsStorage::open(&config.root)?.with_mapped_reads(mapped);
    let leftovers = if serving { fs.remove_staging_leftovers()? } else { 0 };
    if leftovers > 0 {
        tracing::info!(leftovers, "removed unfinished staging files of a previous run");
    }
    let Some(s3) = &config.s3 else { return Ok(Arc::new(fs)) };
    let store = S3Storage::open(s3, fs, config.hot_tier.map(|b| b.as_u64()))?;
    if serving {
        store.load_hot_tier()?;
    }
    Ok(Arc::new(store))
}

/// One entry of the blob inventory.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written (committed).
    pub modified: std::time::SystemTime,
}

/// A staging file. Positional reads and writes let one writer and many readers share it without
/// sharing a file offset; readers keep working after it is renamed into place.
pub struct Staged {
    file: std::fs::File,
    path: PathBuf,
    /// Told how far the file is durable ([`Staged::durable`]); dropped with the file.
    follower: Option<Arc<dyn Follower>>,
}

/// Something a store attaches to a staging file to follow it as it becomes durable.
pub trait Follower: Send + Sync + 'static {
    /// Bytes below `len` are written and will not change.
    fn durable(&self, len: u64);
    /// For the store that attached it to find its own type again.
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

impl Staged {
    /// Writes all of `bufs` at `offset` (blocking: call from `spawn_blocking`).
    pub fn write_all_at(&self, bufs: &[Bytes], mut offset: u64) -> io::Result<()> {
        for b in bufs {
            self.file.write_all_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }

    /// Says that bytes below `len` are written and final (the fetch's writer, per batch).
    pub fn durable(&self, len: u64) {
        if let Some(f) = &self.follower {
            f.durable(len);
        }
    }

    /// Cuts the file to `len` bytes (blocking): an upload drops bytes past what it verified.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// Reads up to `len` bytes at `offset` (blocking: call from `spawn_blocking`).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        read_chunk(&self.file, offset, len)
    }

    /// Closes the file but keeps it on disk, owned by the returned handle: an upload session
    /// idle between chunks (for up to a day) then holds no file descriptor.
    pub fn park(mut self) -> ParkedStaged {
        // The path moves to the parked handle; an empty one tells `drop` there is nothing left
        // to remove (the file closes as `self` drops).
        ParkedStaged { path: std::mem::take(&mut self.path) }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a successful commit the path no longer exists; otherwise this removes an
        // abandoned or failed fetch. Either way nothing half-written stays behind.
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A staging file closed between uses ([`Staged::park`]): only its path is held. It is still
/// owned: dropping the handle removes the file, so nothing half-written stays behind.
pub struct ParkedStaged {
    path: PathBuf,
}

impl ParkedStaged {
    /// Reopens the file for reading and writing (blocking: call from `spawn_blocking`). The
    /// handle becomes the [`Staged`] (one owner of the file at any time: closing that one after
    /// a chunk must not remove what a parked handle still names); park it again when done. If
    /// the file cannot be reopened it is removed: its bytes cannot be trusted any more.
    pub fn resume(mut self) -> io::Result<Staged> {
        // Never created afresh: a missing file lost the bytes already counted.
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(Staged { file, path: std::mem::take(&mut self.path), follower: None })
    }
}

impl Drop for ParkedStaged {
    fn drop(&mut self) {
        // Empty once resumed: the `Staged` owns the file now.
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(crate) fn read_chunk(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_parked_staging_file_is_closed_kept_and_still_owned() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let staged = storage.stage().await.unwrap();
        staged.write_all_at(&[Bytes::from_static(b"hello ")], 0).unwrap();
        let path = staged.path.clone();
        let parked = staged.park();
        assert!(path.exists(), "parking keeps the file");
        let staged = parked.resume().unwrap();
        staged.write_all_at(&[Bytes::from_static(b"world")], 6).unwrap();
        assert_eq!(&staged.read_at(0, 64).unwrap()[..], b"hello world", "a resumed file keeps its bytes");
        drop(staged.park());
        assert!(!path.exists(), "a dropped parked handle removes its file");
        let parked = storage.stage().await.unwrap().park();
        let path = std::fs::read_dir(dir.path().join(layout::STAGING_DIR)).unwrap().next().unwrap().unwrap().path();
        std::fs::remove_file(&path).unwrap();
        assert!(parked.resume().is_err(), "a lost file is never created afresh");
        assert!(!path.exists());
    }
}

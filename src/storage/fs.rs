//! The embedded default backend: a directory tree laid out as [`super::layout`] describes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};

use super::{layout, BlobInfo, ByteStream, Staged, Storage};
use crate::distribution::Digest;

/// Cache-hit reads: larger than [`READ_CHUNK`] since nothing else competes for the buffer, so
/// fewer hand-offs to the blocking pool per GiB.
pub const HIT_CHUNK: usize = 1024 * 1024;

/// Streams `start..end` of a file that this stream alone reads, in [`HIT_CHUNK`] pieces, each
/// read on the blocking pool. The file is read sequentially from `start` (one seek), and each
/// chunk is read into fresh, uninitialised capacity (`read_to_end` does not zero it first: a
/// memset per chunk was a tenth of a warm read's CPU).
pub fn file_stream(file: std::fs::File, start: u64, end: u64) -> ByteStream {
    let file = Arc::new(file);
    stream::try_unfold((start, false), move |(pos, positioned)| {
        let file = file.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let len = (end - pos).min(HIT_CHUNK as u64);
            let chunk = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = &*file;
                if !positioned {
                    f.seek(SeekFrom::Start(pos))?;
                }
                let mut buf = Vec::with_capacity(len as usize);
                f.take(len).read_to_end(&mut buf)?;
                Ok(buf)
            })
            .await
            .map_err(io::Error::other)??;
            if chunk.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than expected"));
            }
            let next = pos + chunk.len() as u64;
            Ok(Some((Bytes::from(chunk), (next, true))))
        }
    })
    .boxed()
}

/// The embedded default: a directory tree (see [`super::layout`] for the whole of it).
pub struct FsStorage {
    root: PathBuf,
    counter: AtomicU64,
    /// Blob reads are slices of a memory map (see [`super::mapped`]) instead of read chunks.
    mapped_reads: bool,
}

impl FsStorage {
    /// Opens (creating if needed) a store under `root`.
    pub fn open(root: &Path) -> io::Result<FsStorage> {
        for dir in [layout::BLOBS_DIR, layout::OBJECTS_DIR, layout::STAGING_DIR, layout::QUARANTINE_DIR] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        Ok(FsStorage { root: root.to_owned(), counter: AtomicU64::new(0), mapped_reads: false })
    }

    /// Serves blob reads from a memory map of the file (`storage.mmap_hits`): one copy less
    /// per byte. Only for a server whose responses leave through the kernel untouched (no
    /// TLS): see [`super::mapped`] for why.
    pub fn with_mapped_reads(mut self, on: bool) -> FsStorage {
        self.mapped_reads = on;
        self
    }

    /// Removes staging leftovers of a previous run: a crash mid-fetch leaves only unverified
    /// temp files, never a visible blob. Only the serving process may call this (an admin
    /// command running beside it would delete its fetches in progress).
    pub fn remove_staging_leftovers(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(self.root.join(layout::STAGING_DIR))? {
            if std::fs::remove_file(entry?.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every committed blob (blocking: start-up inventories).
    pub fn scan_blobs(&self) -> io::Result<Vec<super::BlobInfo>> {
        scan_blobs(&self.root.join(layout::BLOBS_DIR))
    }

    /// Where a committed blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(layout::blob_path(digest))
    }

    fn object_path(&self, key: &str) -> io::Result<PathBuf> {
        layout::check_object_key(key)?;
        Ok(self.root.join(layout::OBJECTS_DIR).join(key))
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.root.join(layout::staging_file(n))
    }
}

/// fsync a file, rename it into place, fsync the directory: the classic durable publish.
fn publish(file: &std::fs::File, from: &Path, to: &Path) -> io::Result<()> {
    file.sync_all()?;
    let dir = to.parent().ok_or_else(|| io::Error::other("target has no parent"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::rename(from, to)?;
    std::fs::File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Storage for FsStorage {
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<u64>>> {
        let path = self.blob_path(digest);
        Box::pin(async move { not_found_is_none(tokio::fs::metadata(path).await).map(|m| m.map(|m| m.len())) })
    }

    fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        let path = self.blob_path(digest);
        Box::pin(async move {
            let file = blocking(move || not_found_is_none(std::fs::File::open(path))).await?;
            Ok(file.map(|f| match self.mapped_reads {
                // A file that cannot be mapped (an odd filesystem) is read as before.
                true => super::mapped::mapped_stream(&f, start, end).unwrap_or_else(|_| file_stream(f, start, end)),
                false => file_stream(f, start, end),
            }))
        })
    }

    fn stage(&self) -> BoxFuture<'_, io::Result<Staged>> {
        let path = self.temp_path();
        Box::pin(async move {
            blocking(move || {
                let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
                Ok(Staged { file, path, follower: None })
            })
            .await
        })
    }

    fn commit(&self, staged: Arc<Staged>, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        let to = self.blob_path(digest);
        Box::pin(async move { blocking(move || publish(&staged.file, &staged.path, &to)).await })
    }

    fn get_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<Vec<u8>>>> {
        let path = self.object_path(key);
        Box::pin(async move { not_found_is_none(tokio::fs::read(path?).await) })
    }

    fn put_object(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        let to = self.object_path(key);
        let tmp = self.temp_path();
        Box::pin(async move {
            let to = to?;
            blocking(move || {
                let mut file = std::fs::File::create_new(&tmp)?;
                let result = io::Write::write_all(&mut file, &bytes).and_then(|_| publish(&file, &tmp, &to));
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result
            })
            .await
        })
    }

    fn put_staged(&self, key: &str, staged: Arc<Staged>) -> BoxFuture<'_, io::Result<()>> {
        let to = self.object_path(key);
        Box::pin(async move {
            let to = to?;
            blocking(move || publish(&staged.file, &staged.path, &to)).await
        })
    }

    fn read_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        let path = self.object_path(key);
        Box::pin(async move {
            let path = path?;
            let Some(file) = blocking(move || not_found_is_none(std::fs::File::open(path))).await? else {
                return Ok(None);
            };
            let len = file.metadata()?.len();
            Ok(Some(file_stream(file, 0, len)))
        })
    }

    fn list_blobs(&self) -> BoxFuture<'_, io::Result<Vec<BlobInfo>>> {
        let root = self.root.join(layout::BLOBS_DIR);
        Box::pin(blocking(move || scan_blobs(&root)))
    }

    fn quarantine_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        let from = self.blob_path(digest);
        let to = self.root.join(layout::QUARANTINE_DIR).join(digest.hex());
        Box::pin(blocking(move || std::fs::rename(from, to)))
    }

    fn list_objects(&self, prefix: &str) -> BoxFuture<'_, io::Result<Vec<String>>> {
        let base = prefix.strip_suffix('/').map(|p| self.object_path(p));
        let prefix = prefix.to_owned();
        Box::pin(async move {
            let base = base.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "prefix must end with /"))??;
            blocking(move || {
                let mut keys = Vec::new();
                let mut dirs = vec![(base, prefix)];
                while let Some((dir, key)) = dirs.pop() {
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(e) => e,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    for entry in entries {
                        let entry = entry?;
                        // Object keys are UTF-8 (built by Ferry); anything else is not ours.
                        let Ok(name) = entry.file_name().into_string() else { continue };
                        if entry.file_type()?.is_dir() {
                            dirs.push((entry.path(), format!("{key}{name}/")));
                        } else {
                            keys.push(format!("{key}{name}"));
                        }
                    }
                }
                keys.sort();
                Ok(keys)
            })
            .await
        })
    }

    fn delete_object(&self, key: &str) -> BoxFuture<'_, io::Result<bool>> {
        let path = self.object_path(key);
        Box::pin(async move { not_found_is_none(tokio::fs::remove_file(path?).await).map(|r| r.is_some()) })
    }

    fn delete_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<bool>> {
        let path = self.blob_path(digest);
        Box::pin(async move { not_found_is_none(tokio::fs::remove_file(path).await).map(|r| r.is_some()) })
    }

    fn probe(&self) -> BoxFuture<'_, io::Result<()>> {
        let probe = self.root.join(layout::readiness_probe());
        Box::pin(async move {
            let written = tokio::fs::write(&probe, b"ok").await;
            let _ = tokio::fs::remove_file(&probe).await;
            written
        })
    }
}

fn scan_blobs(root: &Path) -> io::Result<Vec<BlobInfo>> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(root)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(shard.path())? {
            let entry = entry?;
            let name = entry.file_name();
            // Anything not named like a blob is not ours to count or evict.
            let Some(digest) = layout::digest_from_hex(&name.to_string_lossy()) else { continue };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(BlobInfo { digest, size: meta.len(), modified: meta.modified()? });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::READ_CHUNK;
    use futures_util::TryStreamExt;

    #[tokio::test]
    async fn stage_commit_read() {
        let dir = std::env::temp_dir().join(format!("ferry-storage-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(dir.join("tmp/leftover"), b"x").unwrap();
        let s = FsStorage::open(&dir).unwrap();
        assert!(dir.join("tmp/leftover").exists(), "open alone never touches staging");
        assert_eq!(s.remove_staging_leftovers().unwrap(), 1);
        assert!(!dir.join("tmp/leftover").exists(), "leftovers removed at start-up");

        let data = Bytes::from(vec![7u8; READ_CHUNK * 2 + 5]);
        let d = Digest::of(&data);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        let staged = Arc::new(s.stage().await.unwrap());
        staged.write_all_at(&[data.slice(..10), data.slice(10..)], 0).unwrap();
        s.commit(staged, &d).await.unwrap();
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(data.len() as u64));
        let listed = s.list_blobs().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].digest.clone(), listed[0].size), (d.clone(), data.len() as u64));
        let got: Vec<Bytes> =
            s.read_blob(&d, 3, data.len() as u64).await.unwrap().unwrap().try_collect().await.unwrap();
        assert_eq!(got.concat(), data[3..]);
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0, "nothing left in tmp");

        s.put_object("a/b", b"hello".to_vec()).await.unwrap();
        assert_eq!(s.get_object("a/b").await.unwrap().unwrap(), b"hello");
        assert!(s.get_object("a/../x").await.is_err());
        assert_eq!(s.get_object("nope").await.unwrap(), None);
        s.put_object("a/c/d", b"x".to_vec()).await.unwrap();
        assert_eq!(s.list_objects("a/").await.unwrap(), ["a/b", "a/c/d"]);
        assert_eq!(s.list_objects("none/").await.unwrap(), Vec::<String>::new());
        assert!(s.delete_object("a/b").await.unwrap());
        assert!(!s.delete_object("a/b").await.unwrap());
        assert!(s.delete_blob(&d).await.unwrap());
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

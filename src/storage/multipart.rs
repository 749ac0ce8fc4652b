//! The multipart upload that runs alongside a cold fetch on the S3 backend: every full part that
//! is durable in the staging file goes to the bucket while the fetch still receives, so the
//! commit after the digest verdict only uploads the tail and completes the upload.
//!
//! The upload is created under the blob's final key, which S3 makes visible only when the
//! upload completes: before the verdict nothing is visible, a mismatch or a failed fetch aborts
//! it (the staging file is dropped, which closes the follower's channel), and a crash leaves an
//! incomplete upload for the bucket's lifecycle rule, never an object.
//!
//! The same follower uploads a file that is already whole (a hosted upload, whose digest is
//! known only at its end, or a fetch whose follower gave up): it is then finished at once.
//!
//! The follower reads parts back from its own handle on the staging file (not from the fetch's
//! memory), so it never slows the fetch; a bucket slower than the upstream just leaves more to
//! upload at the commit. Memory is bounded across all uploads by one semaphore of part permits.

use std::any::Any;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::Follower;

/// How far the staging file is durable, and whether the blob is complete (verified).
#[derive(Clone, Copy, Default)]
struct Durable {
    len: u64,
    finished: bool,
}

/// What the follower had uploaded when the blob was finished.
pub(super) enum Uploaded {
    /// Nothing: the blob fits in one part (the commit PUTs it whole).
    Nothing,
    /// Every part is uploaded; the commit completes the upload.
    Parts(Box<dyn MultipartUpload>),
}

/// Shared parts of every follower of one store.
#[derive(Clone)]
pub(super) struct Uploads {
    pub store: Arc<AmazonS3>,
    pub part_size: usize,
    /// One permit per part in memory, across every upload of the process.
    pub parts: Arc<Semaphore>,
}

/// A staging file's follower (see the module docs), held by the [`super::Staged`].
pub(super) struct Alongside {
    durable: watch::Sender<Durable>,
    task: Mutex<Option<JoinHandle<io::Result<Uploaded>>>>,
}

impl Follower for Alongside {
    fn durable(&self, len: u64) {
        self.durable.send_if_modified(|d| {
            let grew = len > d.len && !d.finished;
            if grew {
                d.len = len;
            }
            grew
        });
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl Alongside {
    /// Starts following `file` (a second handle on the staging file) for an upload to `key`.
    pub(super) fn start(uploads: Uploads, key: Path, file: std::fs::File) -> Alongside {
        let (tx, rx) = watch::channel(Durable::default());
        let task = tokio::spawn(async move {
            let mut follow = Follow { uploads, key, file: Arc::new(file), upload: None, next: 0 };
            let result = follow.run(rx).await;
            if result.is_err() {
                follow.abort().await;
            }
            result.map(|()| follow.upload.map_or(Uploaded::Nothing, Uploaded::Parts))
        });
        Alongside { durable: tx, task: Mutex::new(Some(task)) }
    }

    /// The blob is verified and `len` bytes long: uploads what is left and hands over the
    /// upload to complete. An error means the follower gave up (its upload is aborted); the
    /// caller uploads the file afresh.
    pub(super) async fn finish(&self, len: u64) -> io::Result<Uploaded> {
        self.durable.send_replace(Durable { len, finished: true });
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(task) = task else { return Err(io::Error::other("the upload was already finished")) };
        task.await.map_err(io::Error::other)?
    }
}

/// The follower's state: the upload (created with the first full part) and the next offset.
struct Follow {
    uploads: Uploads,
    key: Path,
    file: Arc<std::fs::File>,
    upload: Option<Box<dyn MultipartUpload>>,
    next: u64,
}

impl Follow {
    /// Uploads full parts as they become durable, and the rest once finished. Ends with an
    /// error if the staging file is dropped unfinished (the fetch failed) or S3 refuses.
    async fn run(&mut self, mut rx: watch::Receiver<Durable>) -> io::Result<()> {
        let part = self.uploads.part_size as u64;
        let mut parts = FuturesUnordered::new();
        loop {
            let d = *rx.borrow_and_update();
            if d.finished && self.upload.is_none() && d.len <= part {
                return Ok(());
            }
            while self.next + part <= d.len || (d.finished && self.next < d.len) {
                // Parts in flight only progress while polled: poll them while waiting for room.
                let busy = !parts.is_empty();
                let permit = tokio::select! {
                    permit = self.uploads.parts.clone().acquire_owned() => permit.map_err(io::Error::other)?,
                    Some(done) = parts.next(), if busy => {
                        done?;
                        continue;
                    }
                };
                let n = (d.len - self.next).min(part);
                let sending = self.send_part(self.next, n as usize, permit).await?;
                parts.push(sending);
                self.next += n;
            }
            if d.finished {
                while let Some(done) = parts.next().await {
                    done?;
                }
                return Ok(());
            }
            let busy = !parts.is_empty();
            tokio::select! {
                changed = rx.changed() => {
                    changed.map_err(|_| io::Error::other("the fetch ended without a verified blob"))?;
                }
                Some(done) = parts.next(), if busy => done?,
            }
        }
    }

    /// Reads one part from the file and starts its upload; the permit is held until it is sent.
    async fn send_part(
        &mut self,
        at: u64,
        len: usize,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<futures_util::future::BoxFuture<'static, io::Result<()>>> {
        let file = self.file.clone();
        let bytes = tokio::task::spawn_blocking(move || -> io::Result<bytes::Bytes> {
            let mut buf = BytesMut::zeroed(len);
            file.read_exact_at(&mut buf, at)?;
            Ok(buf.freeze())
        })
        .await
        .map_err(io::Error::other)??;
        let upload = match &mut self.upload {
            Some(u) => u,
            None => self.upload.insert(self.uploads.store.put_multipart(&self.key).await.map_err(super::s3::to_io)?),
        };
        let sending = upload.put_part(PutPayload::from_bytes(bytes));
        Ok(Box::pin(async move {
            let result = sending.await.map_err(super::s3::to_io);
            drop(permit);
            result
        }))
    }

    async fn abort(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            // Best effort: the bucket's lifecycle rule removes what an abort that fails leaves.
            if let Err(e) = upload.abort().await {
                tracing::warn!(error = %e, "could not abort a multipart upload");
            }
        }
    }
}

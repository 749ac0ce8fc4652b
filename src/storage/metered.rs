//! Every store operation timed, its failures counted and logged (at most once a minute per
//! operation: a bucket that is down fails every request), and blob bytes counted both ways: a
//! decorator around whichever backend the config chose, so both report alike.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::StreamExt;

use super::{BlobInfo, ByteStream, Staged, Storage};
use crate::distribution::Digest;
use crate::metrics::Metrics;
use crate::throttle::Throttle;

/// The operations, as the `op` label names them (a closed set).
const OPS: [&str; 11] =
    ["stat", "read", "stage", "commit", "get", "put", "list", "quarantine", "delete", "sign", "probe"];

/// A store with metrics (see the module docs).
pub struct Metered {
    inner: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    logs: [Throttle; OPS.len()],
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, metrics: Arc<Metrics>) -> Metered {
        Metered { inner, metrics, logs: std::array::from_fn(|_| Throttle::new(Duration::from_secs(60))) }
    }

    fn op<'a, T: Send + 'a>(
        &'a self,
        op: usize,
        fut: impl Future<Output = io::Result<T>> + Send + 'a,
    ) -> BoxFuture<'a, io::Result<T>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = fut.await;
            self.metrics.storage_duration.with_label_values(&[OPS[op]]).observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                self.failed(op, e);
            }
            result
        })
    }

    fn failed(&self, op: usize, e: &io::Error) {
        self.metrics.storage_errors.with_label_values(&[OPS[op]]).inc();
        if let Some(left_out) = self.logs[op].allow() {
            tracing::warn!(op = OPS[op], error = %e, left_out, "storage operation failed");
        }
    }
}

const STAT: usize = 0;
const READ: usize = 1;
const STAGE: usize = 2;
const COMMIT: usize = 3;
const GET: usize = 4;
const PUT: usize = 5;
const LIST: usize = 6;
const QUARANTINE: usize = 7;
const DELETE: usize = 8;
const SIGN: usize = 9;
const PROBE: usize = 10;

impl Storage for Metered {
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<u64>>> {
        self.op(STAT, self.inner.blob_size(digest))
    }

    fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        let opened = self.op(READ, self.inner.read_blob(digest, start, end));
        Box::pin(async move {
            let Some(stream) = opened.await? else { return Ok(None) };
            let (bytes, errors) = (self.metrics.storage_bytes.with_label_values(&["read"]), self.metrics.clone());
            Ok(Some(
                stream
                    .inspect(move |item| match item {
                        Ok(b) => bytes.inc_by(b.len() as u64),
                        Err(_) => errors.storage_errors.with_label_values(&[OPS[READ]]).inc(),
                    })
                    .boxed(),
            ))
        })
    }

    fn blob_url(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<String>>> {
        self.op(SIGN, self.inner.blob_url(digest))
    }

    fn stage(&self) -> BoxFuture<'_, io::Result<Staged>> {
        self.op(STAGE, self.inner.stage())
    }

    fn stage_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Staged>> {
        self.op(STAGE, self.inner.stage_blob(digest))
    }

    fn commit(&self, staged: Arc<Staged>, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        let len = staged.file.metadata().map(|m| m.len()).unwrap_or(0);
        let committed = self.op(COMMIT, self.inner.commit(staged, digest));
        Box::pin(async move {
            committed.await?;
            self.metrics.storage_bytes.with_label_values(&["written"]).inc_by(len);
            Ok(())
        })
    }

    fn get_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<Vec<u8>>>> {
        self.op(GET, self.inner.get_object(key))
    }

    fn put_object(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        self.op(PUT, self.inner.put_object(key, bytes))
    }

    fn put_staged(&self, key: &str, staged: Arc<Staged>) -> BoxFuture<'_, io::Result<()>> {
        self.op(PUT, self.inner.put_staged(key, staged))
    }

    fn read_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        self.op(READ, self.inner.read_object(key))
    }

    fn list_blobs(&self) -> BoxFuture<'_, io::Result<Vec<BlobInfo>>> {
        self.op(LIST, self.inner.list_blobs())
    }

    fn quarantine_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        self.op(QUARANTINE, self.inner.quarantine_blob(digest))
    }

    fn list_objects(&self, prefix: &str) -> BoxFuture<'_, io::Result<Vec<String>>> {
        self.op(LIST, self.inner.list_objects(prefix))
    }

    fn delete_object(&self, key: &str) -> BoxFuture<'_, io::Result<bool>> {
        self.op(DELETE, self.inner.delete_object(key))
    }

    fn delete_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<bool>> {
        self.op(DELETE, self.inner.delete_blob(digest))
    }

    fn probe(&self) -> BoxFuture<'_, io::Result<()>> {
        self.op(PROBE, self.inner.probe())
    }

    fn abandoned_uploads(&self, older_than: Duration, abort: bool) -> BoxFuture<'_, io::Result<Option<Vec<String>>>> {
        self.op(LIST, self.inner.abandoned_uploads(older_than, abort))
    }

    fn degraded(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let found = self.inner.degraded().await;
            if found.is_some() {
                self.metrics.storage_errors.with_label_values(&[OPS[PROBE]]).inc();
            }
            found
        })
    }
}

//! The staging writer of one blob fetch: it hashes the received frames and writes them to the
//! staging file one batch at a time on the blocking pool, while the next batch gathers behind
//! it, so hashing and the disk overlap with receiving and cost one hand-off per batch, not one
//! per frame.
//!
//! Batches are at least [`MIN_BATCH`] bytes when the writer is idle (fewer hand-offs) and at
//! most [`MAX_PENDING`] while it is busy: then the fetch stops receiving until the batch in
//! flight is done, which is how the hashing rate paces the upstream (TCP flow control does the
//! rest). So at most `MAX_PENDING` bytes wait behind one batch of at most that size.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::distribution::{internal, Digest, DigestVerifier, ProtocolError};
use crate::storage::Staged;

/// Smallest batch handed to an idle writer (unless the body ended).
pub(super) const MIN_BATCH: u64 = 256 * 1024;

/// Most bytes gathered behind a batch in flight before receiving pauses.
pub(super) const MAX_PENDING: u64 = 2 * 1024 * 1024;

/// What became of a batch.
pub(super) enum Outcome {
    /// Hashed and in the staging file: bytes below `end` are durable.
    Durable { end: u64 },
    /// Hashed only: there is no staging file (any more).
    Hashed,
    /// The disk refused the batch starting at `at`: it and everything after is hashed only.
    Refused { at: u64, error: io::Error },
}

/// A batch done on the blocking pool.
struct Done {
    hasher: DigestVerifier,
    at: u64,
    len: u64,
    /// `None`: hashed only.
    write: Option<io::Result<()>>,
}

/// Hashes and stages the bytes of one fetch, in order.
pub(super) struct StagingWriter {
    /// Where batches go; `None` from the start (no staging file) or once the disk refused one.
    staged: Option<Arc<Staged>>,
    /// Away (`None`) while a batch is in flight: batches are hashed strictly in order.
    hasher: Option<DigestVerifier>,
    pending: Vec<Bytes>,
    pending_len: u64,
    /// Where the pending batch starts in the blob.
    pending_at: u64,
    job: Option<JoinHandle<Done>>,
}

impl StagingWriter {
    /// A writer into `staged`, or (`None`) one that only hashes.
    pub(super) fn new(staged: Option<Arc<Staged>>) -> StagingWriter {
        StagingWriter {
            staged,
            hasher: Some(DigestVerifier::new()),
            pending: Vec::new(),
            pending_len: 0,
            pending_at: 0,
            job: None,
        }
    }

    /// Appends received bytes (their length is `len`) to the pending batch.
    pub(super) fn add(&mut self, bufs: Vec<Bytes>, len: u64) {
        self.pending.extend(bufs);
        self.pending_len += len;
    }

    /// A batch is in flight.
    pub(super) fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// So much waits behind the batch in flight that receiving should pause.
    pub(super) fn full(&self) -> bool {
        self.pending_len >= MAX_PENDING
    }

    /// Hands the pending batch to the blocking pool if the writer is idle and at least `min`
    /// bytes wait. Returns how many bytes go to the staging file (for the evictor).
    pub(super) fn start(&mut self, min: u64) -> u64 {
        if self.job.is_some() || self.pending_len == 0 || self.pending_len < min {
            return 0;
        }
        let Some(mut hasher) = self.hasher.take() else { return 0 };
        let bufs = std::mem::take(&mut self.pending);
        let (at, len) = (self.pending_at, std::mem::take(&mut self.pending_len));
        self.pending_at += len;
        let staged = self.staged.clone();
        let staging = if staged.is_some() { len } else { 0 };
        self.job = Some(tokio::task::spawn_blocking(move || {
            bufs.iter().for_each(|b| hasher.update(b));
            let write = staged.map(|s| s.write_all_at(&bufs, at));
            Done { hasher, at, len, write }
        }));
        staging
    }

    /// Waits for the batch in flight, if any. Cancel-safe: if the wait is dropped the batch
    /// stays in flight and the next wait picks it up.
    pub(super) async fn wait(&mut self) -> Result<Option<Outcome>, ProtocolError> {
        let Some(job) = self.job.as_mut() else { return Ok(None) };
        let done = job.await;
        self.job = None;
        let Done { hasher, at, len, write } = done.map_err(|e| internal("hash task failed", e))?;
        self.hasher = Some(hasher);
        Ok(Some(match write {
            None => Outcome::Hashed,
            Some(Ok(())) => {
                if let Some(staged) = &self.staged {
                    staged.durable(at + len);
                }
                Outcome::Durable { end: at + len }
            }
            Some(Err(error)) => {
                // Later batches are hashed only: the file has a hole now.
                self.staged = None;
                Outcome::Refused { at, error }
            }
        }))
    }

    /// The digest of every byte added, once the last batch is done (`None` while one is in
    /// flight or bytes are pending).
    pub(super) fn digest(self) -> Option<Digest> {
        if self.job.is_some() || self.pending_len > 0 {
            return None;
        }
        self.hasher.map(DigestVerifier::finish)
    }
}

//! Upload sessions shared by the replicas of a cluster: the session in Redis
//! ([`crate::cluster::uploads`]), each chunk an object in the bucket
//! (`storage::layout::upload_chunk`). A chunked push whose PATCHes land on different replicas
//! completes, and a session survives the replica that opened it.
//!
//! A chunk is received into a local staging file, published whole as its object, and only then
//! recorded in the session by a compare-and-set; a chunk that loses the race is removed again
//! and answered 416, like any chunk out of order. The closing PUT marks the session closing
//! (no chunk may join it then), streams the chunks in order into one staging file while
//! hashing them, and hands that to the same commit as a local upload: digest check, mark, blob,
//! link. With Redis unreachable new sessions are local to their replica (see `uploads`), and
//! requests for shared ones answer 503 until it is back.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::HeaderMap;

use super::uploads::{append, chunk_limit, write_batch, UploadState, WRITE_BATCH};
use crate::cluster::uploads::{Chunk, Opened, SharedUpload};
use crate::cluster::Cluster;
use crate::distribution::{internal, ErrorCode, ProtocolError, RepoName};
use crate::storage::{layout, ByteStream, Staged, Storage};

/// The cluster's half of the upload sessions.
pub(super) struct Shared {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) cluster: Arc<Cluster>,
    /// How long a session lives after its last change (`hosted.upload_max_age`).
    pub(super) ttl: Duration,
    /// Most sessions one user may hold open at once, across the cluster.
    pub(super) max_per_user: usize,
}

fn unknown(id: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is unknown"))
}

fn unreachable_state() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Unavailable,
        "this upload's state is kept by the cluster, which does not answer right now; retry shortly",
    )
}

fn changed_meanwhile(written: u64) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::RangeInvalid,
        format!("another request changed this upload meanwhile; it has {written} bytes, the next chunk starts there"),
    )
    .with_detail(serde_json::json!({ "offset": written }))
}

fn new_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Shared {
    /// Opens a session of `owner` in `repo`: its id, or `None` when Redis does not answer (the
    /// caller opens a local one).
    pub(super) async fn open(&self, repo: &RepoName, owner: &str) -> Option<Result<String, ProtocolError>> {
        let id = new_name();
        let upload = SharedUpload {
            repo: repo.to_string(),
            owner: owner.to_owned(),
            written: 0,
            chunks: Vec::new(),
            closing: false,
        };
        Some(match self.cluster.open_upload(&id, &upload, self.ttl, self.max_per_user).await? {
            Opened::Open => Ok(id),
            Opened::Full { held } => Err(ProtocolError::new(
                ErrorCode::TooManyRequests,
                format!(
                    "user {owner:?} has {held} uploads in progress, the most one user may have open at once \
                     (max_upload_sessions_per_user: {}); finish or cancel one, or retry later",
                    self.max_per_user
                ),
            )),
        })
    }

    /// Session `id` of `repo` with its exact text (another repository's is as good as unknown).
    pub(super) async fn get(&self, repo: &RepoName, id: &str) -> Result<(SharedUpload, String), ProtocolError> {
        if !layout::is_upload_id(id) {
            return Err(unknown(id));
        }
        match self.cluster.read_upload(id).await {
            None => Err(unreachable_state()),
            Some(Some((up, text))) if up.repo == repo.as_str() && !up.closing => Ok((up, text)),
            Some(_) => Err(unknown(id)),
        }
    }

    /// Appends the chunk `body` to session `id` (its headers say where it starts and how long
    /// it is) and returns the session as it now stands. Runs in a task of its own: when the
    /// client's connection breaks the bytes that arrived are still recorded, so the upload can
    /// resume from there (GET tells where); the error is returned after that.
    pub(super) async fn append(
        self: &Arc<Self>,
        repo: &RepoName,
        id: &str,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<SharedUpload, ProtocolError> {
        let (up, text) = self.get(repo, id).await?;
        let limit = chunk_limit(headers, up.written)?;
        let (this, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move { this.append_detached(&id, up, text, body, limit).await })
            .await
            .map_err(|e| internal("upload task failed", e))?
    }

    async fn append_detached(
        &self,
        id: &str,
        up: SharedUpload,
        text: String,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<SharedUpload, ProtocolError> {
        let staged = self.storage.stage().await.map_err(|e| internal("cannot create upload file", e))?;
        let mut chunk = UploadState::new(Some(staged.park()));
        let received = append(&mut chunk, body, limit).await;
        if chunk.written == 0 {
            return received.map(|()| up);
        }
        let parked = chunk.parked.take().ok_or_else(|| internal("upload file lost", "no staging file"))?;
        let staged = tokio::task::spawn_blocking(move || parked.resume())
            .await
            .map_err(|e| internal("upload task failed", e))?
            .map_err(|e| internal("cannot reopen upload file", e))?;
        let piece = Chunk { start: up.written, len: chunk.written, name: new_name() };
        let key = layout::upload_chunk(id, piece.start, &piece.name);
        self.storage.put_staged(&key, Arc::new(staged)).await.map_err(|e| internal("cannot store upload chunk", e))?;
        let mut next = up.clone();
        next.written += piece.len;
        next.chunks.push(piece);
        match self.cluster.swap_upload(id, &text, &next, self.ttl).await {
            Some(true) => received.map(|()| next),
            lost => {
                self.remove_chunks(id, &next.chunks[next.chunks.len() - 1..]).await;
                match lost {
                    None => Err(unreachable_state()),
                    Some(_) => Err(match self.cluster.read_upload(id).await {
                        Some(Some((now, _))) if !now.closing => changed_meanwhile(now.written),
                        _ => unknown(id),
                    }),
                }
            }
        }
    }

    /// Closes session `up` (as `text`) for good and streams its chunks, in order, into one
    /// staging file, hashing them: the state a local upload would have reached.
    pub(super) async fn assemble(&self, id: &str, up: &SharedUpload, text: &str) -> Result<UploadState, ProtocolError> {
        let mut closing = up.clone();
        closing.closing = true;
        match self.cluster.swap_upload(id, text, &closing, self.ttl).await {
            None => return Err(unreachable_state()),
            Some(false) => return Err(unknown(id)),
            Some(true) => {}
        }
        let assembled = self.concatenate(id, &up.chunks).await;
        // Finished either way, as a local upload is: nothing of it stays.
        self.cluster.close_upload(id, &up.owner, None).await;
        self.remove_chunks(id, &up.chunks).await;
        assembled
    }

    async fn concatenate(&self, id: &str, chunks: &[Chunk]) -> Result<UploadState, ProtocolError> {
        let mut staged = self.storage.stage().await.map_err(|e| internal("cannot create upload file", e))?;
        let mut state = UploadState::new(None);
        for c in chunks {
            let key = layout::upload_chunk(id, c.start, &c.name);
            let stream = self.storage.read_object(&key).await.map_err(|e| internal("cannot read upload chunk", e))?;
            let stream = stream.ok_or_else(|| internal("upload chunk missing", &key))?;
            staged = copy_chunk(&mut state, staged, stream).await?;
            if state.written != c.start + c.len {
                return Err(internal("upload chunk has the wrong length", &key));
            }
        }
        state.parked = Some(staged.park());
        Ok(state)
    }

    /// Bytes received by session `id` of `repo` so far.
    pub(super) async fn status(&self, repo: &RepoName, id: &str) -> Result<u64, ProtocolError> {
        Ok(self.get(repo, id).await?.0.written)
    }

    /// Cancels session `id` of `repo`, removing its chunks.
    pub(super) async fn cancel(&self, repo: &RepoName, id: &str) -> Result<(), ProtocolError> {
        let (up, text) = self.get(repo, id).await?;
        match self.cluster.close_upload(id, &up.owner, Some(&text)).await {
            None => Err(unreachable_state()),
            Some(false) => Err(unknown(id)),
            Some(true) => {
                self.remove_chunks(id, &up.chunks).await;
                Ok(())
            }
        }
    }

    /// Removes chunks no session needs any more. A failure leaves them to the orphan purge.
    async fn remove_chunks(&self, id: &str, chunks: &[Chunk]) {
        for c in chunks {
            let key = layout::upload_chunk(id, c.start, &c.name);
            if let Err(e) = self.storage.delete_object(&key).await {
                tracing::debug!(error = %e, key, "could not remove an upload chunk; the purge will");
            }
        }
    }

    /// Removes the chunks of sessions Redis no longer holds (expired, or whose replica died
    /// while closing them); returns how many. Nothing while Redis does not answer.
    pub(super) async fn purge_orphans(&self) -> io::Result<usize> {
        let keys = self.storage.list_objects(layout::UPLOADS_PREFIX).await?;
        let (mut purged, mut last): (usize, Option<(&str, bool)>) = (0, None);
        for key in &keys {
            let Some(id) = layout::upload_of_chunk(key) else { continue };
            let orphan = match last {
                Some((seen, orphan)) if seen == id => orphan,
                _ => match self.cluster.upload_exists(id).await {
                    Some(exists) => !exists,
                    None => return Ok(purged),
                },
            };
            last = Some((id, orphan));
            if orphan && self.storage.delete_object(key).await? {
                purged += 1;
            }
        }
        Ok(purged)
    }
}

/// Streams one chunk onto the end of `staged`, in batches, hashing it (see `write_batch`).
async fn copy_chunk(
    state: &mut UploadState,
    mut staged: Staged,
    mut stream: ByteStream,
) -> Result<Staged, ProtocolError> {
    let mut bufs: Vec<Bytes> = Vec::new();
    let mut len = 0;
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(b) = next {
            let b = b.map_err(|e| internal("cannot read upload chunk", e))?;
            len += b.len();
            bufs.push(b);
        }
        if (done || len >= WRITE_BATCH) && len > 0 {
            staged = write_batch(state, staged, std::mem::take(&mut bufs)).await?;
            len = 0;
        }
        if done {
            return Ok(staged);
        }
    }
}

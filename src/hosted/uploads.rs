//! Blob uploads: sessions (monolithic, chunked, resumable), cross-repository mounts, and the
//! purge of abandoned sessions.
//!
//! A session's data lives in a staging file, hashed as it arrives, so finishing an upload is
//! a digest comparison and a rename, never a second read of the bytes. Between requests the
//! file is closed ([`ParkedStaged`]): a session idle for hours holds a path, not a descriptor,
//! and sessions are bounded per user as well as per process.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap};
use http::StatusCode;

use super::shared_uploads::Shared;
use super::{query_param, Hosted};
use crate::auth::Identity;
use crate::config::Access;
use crate::distribution::{internal, Answer, Digest, DigestVerifier, ErrorCode, ProtocolError, RepoName};
use crate::storage::{layout, ByteStream, ParkedStaged, Staged};

/// Upload data is written in batches of about this size: few, large writes.
pub(super) const WRITE_BATCH: usize = 1024 * 1024;

/// Most upload sessions open at once, whoever holds them (each keeps a staging file on disk).
const MAX_SESSIONS: usize = 4096;

/// One upload session.
pub(super) struct Session {
    repo: RepoName,
    /// Who opened it (the bound per user counts by this).
    owner: String,
    /// Held for the whole of a chunk's transfer: chunks of one upload never interleave.
    state: Arc<tokio::sync::Mutex<UploadState>>,
    last_used: Mutex<Instant>,
}

/// An upload's data: its staging file, how much of it is written, the hash so far.
pub(super) struct UploadState {
    /// The staging file, closed between requests. `None` once the session is finished or
    /// cancelled, or broken (a failed write or reopen: its bytes can no longer be trusted).
    pub(super) parked: Option<ParkedStaged>,
    pub(super) written: u64,
    hasher: DigestVerifier,
}

impl UploadState {
    pub(super) fn new(parked: Option<ParkedStaged>) -> UploadState {
        UploadState { parked, written: 0, hasher: DigestVerifier::new() }
    }
}

fn upload_finished() -> ProtocolError {
    ProtocolError::new(ErrorCode::BlobUploadUnknown, "upload finished")
}

impl Session {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }
}

fn upload_reply(status: StatusCode, repo: &RepoName, id: &str, written: u64) -> Answer {
    Answer::Upload { status, location: format!("/v2/{repo}/blobs/uploads/{id}"), id: id.to_owned(), written }
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Answer {
    Answer::Created { location: format!("/v2/{repo}/blobs/{digest}"), digest: digest.clone(), subject: None }
}

impl Hosted {
    /// Purges upload sessions idle longer than `upload_max_age`, forever (spawn it once).
    pub async fn purge_uploads_forever(self: Arc<Self>) {
        let max_age = self.config.upload_max_age;
        let every = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let purged = self.purge_uploads(max_age);
            if purged > 0 {
                tracing::info!(purged, "purged abandoned upload sessions");
            }
            if let Some(shared) = &self.shared {
                match shared.purge_orphans().await {
                    Ok(0) => {}
                    Ok(chunks) => tracing::info!(chunks, "purged chunks of expired shared upload sessions"),
                    Err(e) => tracing::warn!(error = %e, "could not purge chunks of expired upload sessions"),
                }
            }
        }
    }

    /// Drops sessions idle longer than `max_age` (their staging files go with them); returns
    /// how many. A session in use right now is left alone.
    pub fn purge_uploads(&self, max_age: Duration) -> usize {
        let Ok(mut map) = self.sessions.lock() else { return 0 };
        let before = map.len();
        map.retain(|_, s| {
            let idle = s.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
            idle < max_age || s.state.try_lock().is_err()
        });
        before - map.len()
    }

    pub(super) async fn start_upload(
        &self,
        repo: &RepoName,
        query: Option<&str>,
        who: &Identity,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        if let Some(mount) = query_param(query, "mount") {
            let from = query_param(query, "from");
            if let Some(r) = self.try_mount(repo, &mount, from.as_deref(), who).await? {
                return Ok(r);
            }
        }
        if let Some(d) = query_param(query, "digest") {
            // Single-POST monolithic upload: no session, nothing left open after the request.
            let digest = Digest::parse(&d)?;
            let mut state = UploadState::new(Some(self.stage().await?));
            append(&mut state, body, None).await?;
            self.commit_upload(repo, state, &digest).await?;
            return Ok(blob_created(repo, &digest));
        }
        if let Some(shared) = &self.shared {
            // In a cluster sessions are shared; with Redis unreachable, local to this replica.
            if let Some(opened) = shared.open(repo, who.name()).await {
                return Ok(upload_reply(StatusCode::ACCEPTED, repo, &opened?, 0));
            }
        }
        // Refused before a staging file is made; checked again as the session is added, since
        // other requests of the same user may have added theirs meanwhile.
        self.admit(who.name(), &*self.sessions.lock().map_err(|e| internal("lock poisoned", e))?)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Arc::new(Session {
            repo: repo.clone(),
            owner: who.name().to_owned(),
            state: Arc::new(tokio::sync::Mutex::new(UploadState::new(Some(self.stage().await?)))),
            last_used: Mutex::new(Instant::now()),
        });
        let mut map = self.sessions.lock().map_err(|e| internal("lock poisoned", e))?;
        // Refused here, the session drops and its staging file goes with it.
        self.admit(who.name(), &map)?;
        map.insert(id.clone(), session);
        Ok(upload_reply(StatusCode::ACCEPTED, repo, &id, 0))
    }

    /// A new, parked staging file.
    async fn stage(&self) -> Result<ParkedStaged, ProtocolError> {
        Ok(self.storage.stage().await.map_err(|e| internal("cannot create upload file", e))?.park())
    }

    /// `Ok` if one more session fits: under the process-wide cap, and under the bound per user
    /// (so that one user with push rights cannot hold every session).
    fn admit(&self, user: &str, sessions: &HashMap<String, Arc<Session>>) -> Result<(), ProtocolError> {
        if sessions.len() >= MAX_SESSIONS {
            return Err(ProtocolError::new(ErrorCode::TooManyRequests, "too many uploads in progress; retry later"));
        }
        let held = sessions.values().filter(|s| s.owner == user).count();
        let limit = self.max_sessions_per_user;
        if held >= limit {
            return Err(ProtocolError::new(
                ErrorCode::TooManyRequests,
                format!(
                    "user {user:?} has {held} uploads in progress, the most one user may have open at once \
                     (max_upload_sessions_per_user: {limit}); finish or cancel one, or retry later"
                ),
            ));
        }
        Ok(())
    }

    /// Cross-repository mount: `Some(201)` when `from` (or, without `from`, any hosted
    /// repository: distribution-spec 1.1's automatic content discovery) links the blob and the
    /// user may pull it there; `None` to fall back to an ordinary upload (the spec's 202), never
    /// an error that would reveal what another repository holds.
    async fn try_mount(
        &self,
        repo: &RepoName,
        mount: &str,
        from: Option<&str>,
        who: &Identity,
    ) -> Result<Option<Answer>, ProtocolError> {
        let Ok(digest) = Digest::parse(mount) else { return Ok(None) };
        let found = match from {
            Some(from) => match RepoName::parse(from) {
                Ok(from) => self.may_mount_from(&from, &digest, who).await?,
                Err(_) => false,
            },
            None => self.discover_source(&digest, who).await?.is_some(),
        };
        // Claimed before the last look at the bytes, as an upload does: a `gc` deleting them
        // now either sees the fresh mark or has deleted them before this finds them gone.
        if !found || !self.claim_stored(&digest, "blob").await? {
            return Ok(None);
        }
        self.link_blob(repo, &digest).await?;
        Ok(Some(blob_created(repo, &digest)))
    }

    /// Whether `who` may mount `digest` from `from`: a hosted repository they may pull, linking it.
    async fn may_mount_from(&self, from: &RepoName, digest: &Digest, who: &Identity) -> Result<bool, ProtocolError> {
        if !self.is_hosted(from.as_str()) || self.auth.check(who, from.as_str(), Access::Pull).is_err() {
            return Ok(false);
        }
        Ok(self.linked_blob(from, digest).await?.is_some())
    }

    /// A hosted repository that links `digest` and that `who` may pull, found through every
    /// repository's layer links (a blob pushed to a repository without a manifest yet counts).
    /// Repositories `who` may not pull are skipped as if they did not hold it.
    async fn discover_source(&self, digest: &Digest, who: &Identity) -> Result<Option<RepoName>, ProtocolError> {
        for key in self.list(layout::REPOS_PREFIX).await? {
            if layout::classify_repo_key(&key) != layout::RepoKey::Layer(digest.hex()) {
                continue;
            }
            let name = key.strip_prefix(layout::REPOS_PREFIX).and_then(|k| k.split_once("/_layers/"));
            let Some(repo) = name.and_then(|(name, _)| RepoName::parse(name).ok()) else { continue };
            // `layout` stays the one authority on keys: the name read back must build this key.
            if layout::layer_link(&repo, digest) == key && self.may_mount_from(&repo, digest, who).await? {
                return Ok(Some(repo));
            }
        }
        Ok(None)
    }

    /// The session `id` of `repo` (another repository's session is as good as unknown).
    fn session(&self, repo: &RepoName, id: &str) -> Result<Arc<Session>, ProtocolError> {
        let unknown = || ProtocolError::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is unknown"));
        let map = self.sessions.lock().map_err(|e| internal("lock poisoned", e))?;
        let s = map.get(id).cloned().ok_or_else(unknown)?;
        if s.repo != *repo {
            return Err(unknown());
        }
        s.touch();
        Ok(s)
    }

    /// The cluster's sessions, when `id` is not one of this replica's own.
    fn shared_session(&self, id: &str) -> Option<&Arc<Shared>> {
        let local = self.sessions.lock().map_or(true, |map| map.contains_key(id));
        self.shared.as_ref().filter(|_| !local)
    }

    fn forget(&self, id: &str) {
        if let Ok(mut map) = self.sessions.lock() {
            map.remove(id);
        }
    }

    pub(super) async fn patch_upload(
        &self,
        repo: &RepoName,
        id: &str,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        if let Some(shared) = self.shared_session(id) {
            let up = shared.append(repo, id, headers, body).await?;
            return Ok(upload_reply(StatusCode::ACCEPTED, repo, id, up.written));
        }
        let session = self.session(repo, id)?;
        let state = session.state.clone().lock_owned().await;
        let limit = chunk_limit(headers, state.written)?;
        let (state, result) = self.append_chunk(id, state, body, limit).await?;
        session.touch();
        result?;
        Ok(upload_reply(StatusCode::ACCEPTED, repo, id, state.written))
    }

    pub(super) async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: ByteStream,
    ) -> Result<Answer, ProtocolError> {
        let digest = query_param(query, "digest")
            .ok_or_else(|| ProtocolError::new(ErrorCode::DigestInvalid, "the closing PUT needs ?digest="))
            .and_then(|d| Digest::parse(&d));
        if let Some(shared) = self.shared_session(id) {
            let digest = digest?;
            let up = shared.append(repo, id, headers, body).await?;
            let state = shared.assemble(id, &up, &up.encode()).await?;
            self.commit_upload(repo, state, &digest).await?;
            return Ok(blob_created(repo, &digest));
        }
        let session = self.session(repo, id)?;
        let digest = digest?;
        let state = session.state.clone().lock_owned().await;
        let limit = chunk_limit(headers, state.written)?;
        let (mut state, result) = self.append_chunk(id, state, body, limit).await?;
        result?;
        let state = std::mem::replace(&mut *state, UploadState::new(None));
        // Finished either way: a mismatch discards the data, nothing of it stays visible.
        self.forget(id);
        self.commit_upload(repo, state, &digest).await?;
        Ok(blob_created(repo, &digest))
    }

    /// Appends a chunk to session `id` ([`append_detached`]). A session that broke doing so
    /// (a failed write or reopen, or its task died) is forgotten at once: it can never
    /// succeed, and it would hold its user's session slot until the idle purge.
    async fn append_chunk(
        &self,
        id: &str,
        state: StateGuard,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(StateGuard, Result<(), ProtocolError>), ProtocolError> {
        let appended = append_detached(state, body, limit).await;
        if appended.as_ref().map_or(true, |(state, _)| state.parked.is_none()) {
            self.forget(id);
        }
        appended
    }

    /// Verifies an upload against `digest` and makes it visible in `repo`.
    async fn commit_upload(&self, repo: &RepoName, state: UploadState, digest: &Digest) -> Result<(), ProtocolError> {
        let UploadState { parked, written, hasher } = state;
        let parked = parked.ok_or_else(upload_finished)?;
        let got = hasher.finish();
        if got != *digest {
            tracing::warn!(target: "ferry::hosted", %repo, expected = %digest, %got, "upload digest mismatch; discarded");
            return Err(ProtocolError::new(
                ErrorCode::DigestInvalid,
                format!("uploaded content has digest {got}, not {digest}"),
            ));
        }
        // Claimed before looking for the blob: a `gc` that sees the fresh mark keeps it, and
        // one that deleted it already leaves it missing here, so these bytes are committed.
        if !self.claim_stored(digest, "blob").await? {
            let staged = tokio::task::spawn_blocking(move || -> io::Result<Staged> {
                let staged = parked.resume()?;
                // Bytes past the verified length (a chunk cut off mid-write) must not be published.
                staged.set_len(written)?;
                Ok(staged)
            })
            .await
            .map_err(|e| internal("upload task failed", e))?
            .map_err(|e| internal("cannot trim upload file", e))?;
            self.storage.commit(Arc::new(staged), digest).await.map_err(|e| internal("cannot store blob", e))?;
        }
        self.link_blob(repo, digest).await?;
        tracing::debug!(target: "ferry::hosted", %repo, %digest, size = written, "blob stored");
        Ok(())
    }

    pub(super) async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<Answer, ProtocolError> {
        if let Some(shared) = self.shared_session(id) {
            let written = shared.status(repo, id).await?;
            return Ok(upload_reply(StatusCode::NO_CONTENT, repo, id, written));
        }
        let session = self.session(repo, id)?;
        let state = session.state.lock().await;
        if state.parked.is_none() {
            return Err(ProtocolError::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is finished")));
        }
        Ok(upload_reply(StatusCode::NO_CONTENT, repo, id, state.written))
    }

    pub(super) async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<Answer, ProtocolError> {
        if let Some(shared) = self.shared_session(id) {
            shared.cancel(repo, id).await?;
            return Ok(Answer::Status(StatusCode::NO_CONTENT));
        }
        self.session(repo, id)?;
        self.forget(id);
        Ok(Answer::Status(StatusCode::NO_CONTENT))
    }
}

/// How many bytes a chunk may carry, from its `Content-Range` (which must start where the
/// upload stands: anything else is out of order, 416) or `Content-Length`.
pub(super) fn chunk_limit(headers: &HeaderMap, written: u64) -> Result<Option<u64>, ProtocolError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()));
    };
    let bad = || ProtocolError::new(ErrorCode::BlobUploadInvalid, "Content-Range must look like <start>-<end>");
    let text = v.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let span = text.split('/').next().unwrap_or("");
    let (a, b) = span.split_once('-').ok_or_else(bad)?;
    let (start, end): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if start != written || end < start {
        return Err(ProtocolError::new(
            ErrorCode::RangeInvalid,
            format!("chunk {start}-{end} is out of order: the upload has {written} bytes, the next chunk starts there"),
        )
        .with_detail(serde_json::json!({ "offset": written })));
    }
    // Saturating: `0-18446744073709551615` must not overflow (a panic on a request path).
    Ok(Some((end - start).saturating_add(1)))
}

type StateGuard = tokio::sync::OwnedMutexGuard<UploadState>;

/// [`append`] in a task of its own: when the client's connection breaks, the handler is dropped
/// but the bytes that did arrive are still written and counted, so the upload can resume.
async fn append_detached(
    mut state: StateGuard,
    body: ByteStream,
    limit: Option<u64>,
) -> Result<(StateGuard, Result<(), ProtocolError>), ProtocolError> {
    tokio::spawn(async move {
        let r = append(&mut state, body, limit).await;
        (state, r)
    })
    .await
    .map_err(|e| internal("upload task failed", e))
}

/// Streams `body` onto the end of the upload, hashing as it goes, at most `limit` bytes.
/// Bytes received before an error stay (the upload can resume from there, GET tells where).
/// The staging file is open only meanwhile; a failed write or reopen leaves the session
/// without one (broken: the caller forgets it).
pub(super) async fn append(state: &mut UploadState, body: ByteStream, limit: Option<u64>) -> Result<(), ProtocolError> {
    let parked = state.parked.take().ok_or_else(upload_finished)?;
    let staged = tokio::task::spawn_blocking(move || parked.resume())
        .await
        .map_err(|e| internal("upload task failed", e))?
        .map_err(|e| internal("cannot reopen upload file", e))?;
    let (staged, result) = stream_into(state, staged, body, limit).await;
    state.parked = staged.map(Staged::park);
    result
}

/// [`append`] with the file open: gives the file back unless a write failed.
async fn stream_into(
    state: &mut UploadState,
    mut staged: Staged,
    mut body: ByteStream,
    limit: Option<u64>,
) -> (Option<Staged>, Result<(), ProtocolError>) {
    let mut received: u64 = 0;
    loop {
        // `received` never passes `limit`: a batch that would is cut short with an error.
        let batch = next_batch(&mut body, limit.map(|l| l - received)).await;
        if batch.len > 0 {
            staged = match write_batch(state, staged, batch.bufs).await {
                Ok(staged) => staged,
                Err(e) => return (None, Err(e)),
            };
            received += batch.len as u64;
        }
        let result = match batch.stop {
            None => continue,
            Some(Err(e)) => Err(e),
            Some(Ok(())) if limit.is_some_and(|l| received != l) => Err(ProtocolError::new(
                ErrorCode::SizeInvalid,
                format!("received {received} bytes, the headers announced {}", limit.unwrap_or(0)),
            )),
            Some(Ok(())) => Ok(()),
        };
        return (Some(staged), result);
    }
}

/// Up to [`WRITE_BATCH`] bytes read off an upload's body.
struct Batch {
    bufs: Vec<Bytes>,
    len: usize,
    /// Why reading stopped short of a full batch: `Ok` at the body's end, or the failure
    /// (what was read before it is still written).
    stop: Option<Result<(), ProtocolError>>,
}

/// Reads the next batch, refusing bytes past `room` (what the chunk's headers still allow).
async fn next_batch(body: &mut ByteStream, room: Option<u64>) -> Batch {
    let mut batch = Batch { bufs: Vec::new(), len: 0, stop: None };
    while batch.len < WRITE_BATCH {
        match body.next().await {
            None => {
                batch.stop = Some(Ok(()));
                break;
            }
            Some(Err(e)) => {
                let e = ProtocolError::new(ErrorCode::BlobUploadInvalid, format!("upload broke off: {e}"));
                batch.stop = Some(Err(e));
                break;
            }
            Some(Ok(b)) if room.is_some_and(|r| batch.len as u64 + b.len() as u64 > r) => {
                let e = ProtocolError::new(
                    ErrorCode::SizeInvalid,
                    "the chunk is longer than its Content-Range or Content-Length",
                );
                batch.stop = Some(Err(e));
                break;
            }
            Some(Ok(b)) => {
                batch.len += b.len();
                batch.bufs.push(b);
            }
        }
    }
    batch
}

/// Hashes and writes a batch at the end of the upload, on the blocking pool (the bytes move
/// there without a copy), and counts it. On a failed write the file is dropped (and removed):
/// the hasher saw bytes that may not be on disk, so the session cannot continue.
pub(super) async fn write_batch(
    state: &mut UploadState,
    staged: Staged,
    bufs: Vec<Bytes>,
) -> Result<Staged, ProtocolError> {
    let at = state.written;
    let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    // A copy: if this is interrupted, the session's hasher still matches `written`.
    let mut hasher = state.hasher.clone();
    let (staged, hasher, res) = tokio::task::spawn_blocking(move || {
        let res = hash_and_write(&staged, &bufs, at, &mut hasher);
        (staged, hasher, res)
    })
    .await
    .map_err(|e| internal("upload task failed", e))?;
    res.map_err(|e| internal("cannot write upload file", e))?;
    state.hasher = hasher;
    state.written += len;
    Ok(staged)
}

fn hash_and_write(staged: &Staged, bufs: &[Bytes], at: u64, hasher: &mut DigestVerifier) -> io::Result<()> {
    bufs.iter().for_each(|b| hasher.update(b));
    staged.write_all_at(bufs, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;
    use crate::storage::Storage;

    #[tokio::test]
    async fn abandoned_uploads_are_purged_with_their_data() {
        let dir = std::env::temp_dir().join(format!("ferry-hosted-purge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::FsStorage::open(&dir).unwrap());
        let config =
            crate::config::Config::from_yaml("hosted:\n  namespaces: [internal]\n  htpasswd: /x\n").unwrap().hosted;
        let auth = Arc::new(Auth::new("", &config).unwrap());
        let hosted = Hosted::new(storage, auth, config, crate::hosted::DEFAULT_MAX_UPLOAD_SESSIONS_PER_USER);
        let repo = RepoName::parse("internal/app").unwrap();
        let body: ByteStream = Box::pin(futures_util::stream::empty());
        let reply = hosted.start_upload(&repo, None, &Identity::User("u".into()), body).await.unwrap();
        assert!(matches!(reply, Answer::Upload { status: StatusCode::ACCEPTED, .. }));
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 1, "the upload has a staging file");
        assert_eq!(hosted.purge_uploads(Duration::from_secs(3600)), 0, "a fresh upload stays");
        assert_eq!(hosted.purge_uploads(Duration::ZERO), 1);
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0, "its data went with it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunk_ranges() {
        let mut hm = HeaderMap::new();
        assert_eq!(chunk_limit(&hm, 0).unwrap(), None);
        hm.insert(header::CONTENT_RANGE, "0-9".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 0).unwrap(), Some(10));
        assert_eq!(chunk_limit(&hm, 5).unwrap_err().code, ErrorCode::RangeInvalid);
        hm.insert(header::CONTENT_RANGE, "bytes 10-19/*".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 10).unwrap(), Some(10));
        hm.insert(header::CONTENT_RANGE, "x".parse().unwrap());
        assert_eq!(chunk_limit(&hm, 0).unwrap_err().code, ErrorCode::BlobUploadInvalid);
    }

    proptest::proptest! {
        #[test]
        fn any_content_range_on_a_chunk_is_answered_without_panic(v in "[ -~]{0,60}", written in 0u64..u64::MAX) {
            let mut hm = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                hm.insert(header::CONTENT_RANGE, v);
            }
            if let Ok(Some(limit)) = chunk_limit(&hm, written) {
                proptest::prop_assert!(limit >= 1);
            }
        }
    }
}

//! The reader of a blob fetch in progress (or just finished): it follows the fetch's
//! [`Progress`], reading the staging file up to what is written and, once the disk refused the
//! blob, the in-memory relay past that.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch};

use super::fetch::{BlobFetch, Progress, Relayed};
use crate::storage::{ByteStream, READ_CHUNK};

/// Streams `start..end` of an in-progress (or finished) fetch as the bytes become available.
/// The final byte waits for the digest verdict; a failed fetch ends the stream with an error,
/// which aborts the client's response instead of completing it. When the disk refused the
/// blob, the bytes past what reached the staging file come from the in-memory relay.
pub(super) fn tail_stream(
    fetch: Arc<BlobFetch>,
    relay: broadcast::Receiver<Relayed>,
    start: u64,
    end: Option<u64>,
) -> ByteStream {
    let rx = fetch.progress.clone();
    let tail = Tail { fetch, rx, relay, pos: start, end };
    stream::try_unfold(tail, |mut tail| async move { Ok(tail.next_chunk().await?.map(|chunk| (chunk, tail))) }).boxed()
}

/// One reader's place in a fetch.
struct Tail {
    fetch: Arc<BlobFetch>,
    rx: watch::Receiver<Progress>,
    relay: broadcast::Receiver<Relayed>,
    /// The next byte to send.
    pos: u64,
    /// Where to stop (exclusive); `None`: the end of the blob.
    end: Option<u64>,
}

impl Tail {
    /// The next chunk, waiting for the fetch to write it; `None` once everything up to `end`
    /// was sent and verified.
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let (written, done, relay_from) = {
                let p = self.rx.borrow_and_update();
                (p.written, p.done.clone(), p.relay_from)
            };
            let verified = match done {
                Some(Err(e)) => return Err(io::Error::other(e.message)),
                Some(Ok(())) => true,
                None => false,
            };
            if verified && self.pos >= self.end.unwrap_or(written) {
                return Ok(None);
            }
            // Until the verdict the last written byte is held back: a client must not see a
            // corrupt blob complete.
            let file_limit = match relay_from {
                Some(r) => r,
                None if verified => written,
                None => written.saturating_sub(1),
            };
            let limit = self.end.map_or(file_limit, |e| e.min(file_limit));
            if self.pos < limit {
                return self.read_file(limit).await.map(Some);
            }
            if relay_from.is_some_and(|r| self.pos >= r) {
                match self.read_relay(verified).await? {
                    Some(piece) => return Ok(Some(piece)),
                    None => continue,
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(io::Error::other("blob fetch ended without a verdict"));
            }
        }
    }

    /// The next chunk below `limit` from the staging file.
    async fn read_file(&mut self, limit: u64) -> io::Result<Bytes> {
        let Some(staged) = self.fetch.staged.clone() else {
            return Err(io::Error::other("no staging file to read"));
        };
        let pos = self.pos;
        let len = (limit - pos).min(READ_CHUNK as u64) as usize;
        let chunk = tokio::task::spawn_blocking(move || staged.read_at(pos, len)).await.map_err(io::Error::other)??;
        if chunk.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "staging file shorter than published"));
        }
        self.pos += chunk.len() as u64;
        Ok(chunk)
    }

    /// The relayed bytes at `pos`. `None`: nothing for this reader in what arrived (the
    /// progress changed, or the batch was one it already has): look again.
    async fn read_relay(&mut self, verified: bool) -> io::Result<Option<Bytes>> {
        let msg = if verified {
            // Everything was relayed before the verdict: it is queued or lost.
            match self.relay.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Lagged(_)) => Err(RecvError::Lagged(0)),
                Err(_) => Err(RecvError::Closed),
            }
        } else {
            tokio::select! {
                m = self.relay.recv() => m,
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return Err(io::Error::other("blob fetch ended without a verdict"));
                    }
                    return Ok(None);
                }
            }
        };
        let (off, bytes) = match msg {
            Ok(m) => m,
            Err(RecvError::Lagged(_)) => {
                return Err(io::Error::other("client too slow for an uncached (disk full) stream"))
            }
            Err(RecvError::Closed) => return Err(io::Error::other("relayed bytes missing")),
        };
        if off + bytes.len() as u64 <= self.pos {
            return Ok(None);
        }
        if off > self.pos {
            return Err(io::Error::other("relayed bytes missing"));
        }
        let mut piece = bytes.slice((self.pos - off) as usize..);
        if let Some(e) = self.end {
            piece.truncate(usize::try_from(e - self.pos).unwrap_or(usize::MAX));
        }
        self.pos += piece.len() as u64;
        Ok(Some(piece))
    }
}

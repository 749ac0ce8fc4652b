//! The reader of a blob fetch in progress (or just finished): it follows the fetch's
//! [`Progress`] and takes the frames the fetch received from its ring, the same refcounted
//! bytes every other reader gets; only a reader that fell behind the ring (or joined late)
//! reads the staging file, in large chunks, until it has caught up.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::watch;

use super::fetch::{BlobFetch, Progress};
use super::ring::{ReaderId, Slice};
use crate::storage::{ByteStream, HIT_CHUNK};

/// Most bytes one reader takes from the ring at a time. What it took stays alive until it is
/// sent, even once the ring let go of it, so this bounds what a slow reader pins.
const TAKE: u64 = 256 * 1024;

/// A reader of a fetch, known to its ring from when the fetch was joined until it is dropped
/// (a relaying ring keeps the frames its readers still need, and waits for them).
pub(super) struct Reader {
    fetch: Arc<BlobFetch>,
    id: ReaderId,
}

impl Reader {
    /// Joins `fetch`'s readers; `None` when it is relaying and its ring already let go of
    /// bytes the staging file lacks (see [`FrameRing::join`]).
    ///
    /// [`FrameRing::join`]: super::ring::FrameRing::join
    pub(super) fn join(fetch: &Arc<BlobFetch>) -> Option<Reader> {
        let id = fetch.ring.join()?;
        Some(Reader { fetch: fetch.clone(), id })
    }

    /// The fetch's progress.
    pub(super) fn progress(&self) -> watch::Receiver<Progress> {
        self.fetch.progress.clone()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.fetch.ring.leave(self.id);
    }
}

/// Streams `start..end` of an in-progress (or finished) fetch as the bytes become available.
/// The final byte waits for the digest verdict; a failed fetch ends the stream with an error,
/// which aborts the client's response instead of completing it.
pub(super) fn tail_stream(reader: Reader, start: u64, end: Option<u64>) -> ByteStream {
    reader.fetch.ring.seek(reader.id, start, end);
    let rx = reader.fetch.progress.clone();
    let tail = Tail { reader, rx, pos: start, end, taken: VecDeque::new() };
    stream::try_unfold(tail, |mut tail| async move { Ok(tail.next_chunk().await?.map(|chunk| (chunk, tail))) }).boxed()
}

/// One reader's place in a fetch.
struct Tail {
    reader: Reader,
    rx: watch::Receiver<Progress>,
    /// The next byte to take (from the ring or the file).
    pos: u64,
    /// Where to stop (exclusive); `None`: the end of the blob.
    end: Option<u64>,
    /// Frames taken from the ring and not yet sent (below `pos`).
    taken: VecDeque<Bytes>,
}

impl Tail {
    /// The next chunk, waiting for the fetch to receive it; `None` once everything up to `end`
    /// was sent and verified.
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if let Some(frame) = self.taken.pop_front() {
                return Ok(Some(frame));
            }
            let (received, done) = {
                let p = self.rx.borrow_and_update();
                (p.received, p.done.clone())
            };
            let verified = match done {
                Some(Err(e)) => return Err(io::Error::other(e.message)),
                Some(Ok(())) => true,
                None => false,
            };
            if verified && self.pos >= self.end.unwrap_or(received) {
                return Ok(None);
            }
            // Until the verdict the last received byte is held back: a client must not see a
            // corrupt blob complete.
            let available = if verified { received } else { received.saturating_sub(1) };
            let limit = self.end.map_or(available, |e| e.min(available));
            if self.pos < limit {
                match self.reader.fetch.ring.slice(self.reader.id, self.pos, limit, TAKE) {
                    Slice::Frames(frames) if !frames.is_empty() => {
                        self.pos += frames.iter().map(|f| f.len() as u64).sum::<u64>();
                        self.taken.extend(frames);
                        continue;
                    }
                    // The ring is never behind the published length; look again after a change.
                    Slice::Frames(_) => {}
                    Slice::Behind { durable } => return self.read_file(limit.min(durable)).await.map(Some),
                    Slice::Gone => {
                        return Err(io::Error::other(
                            "bytes of an uncached (disk full) stream left memory before this reader came",
                        ))
                    }
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(io::Error::other("blob fetch ended without a verdict"));
            }
        }
    }

    /// The next chunk below `limit` from the staging file: large reads, since a reader here
    /// is catching up.
    async fn read_file(&mut self, limit: u64) -> io::Result<Bytes> {
        let Some(staged) = self.reader.fetch.staged.clone() else {
            return Err(io::Error::other("no staging file to read"));
        };
        let pos = self.pos;
        let len = (limit - pos).min(HIT_CHUNK as u64) as usize;
        let chunk = tokio::task::spawn_blocking(move || staged.read_at(pos, len)).await.map_err(io::Error::other)??;
        if chunk.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "staging file shorter than published"));
        }
        self.pos += chunk.len() as u64;
        Ok(chunk)
    }
}

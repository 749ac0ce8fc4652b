//! The frame ring of one blob fetch: the most recent body frames the fetch received, shared as
//! the same refcounted [`Bytes`] by every reader that keeps up, so the bytes of a cold pull are
//! copied once in (the staging write) and once out (the client's socket), never read back.
//!
//! A frame leaves the ring (oldest first) once the ring holds more than its share and the frame
//! is durable, i.e. in the staging file: a reader that falls behind the ring, or joins late,
//! then reads the file. Frames not yet durable are the batch being hashed and written and the
//! one gathering behind it, so they are bounded by the fetch's batching, not by the ring.
//! When the disk refused the blob nothing past the refusal becomes durable, so the ring is the
//! only copy: then a frame leaves once every reader has taken it, and the fetch waits (see
//! [`FrameRing::room`]) while a reader is more than `per_fetch` behind. Only in that degraded
//! mode does a slow reader slow the fetch, and no longer than `limits.send_stall_timeout`, after
//! which its connection is closed and it lets go.
//!
//! Memory: at most `per_fetch` bytes of durable frames per fetch, and `total` across all fetches
//! ([`RingBudget`]); a slow reader holds nothing (it copies no frames it has not sent). A
//! relaying ring holds at most `per_fetch` plus one batch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// What all the rings of a cache may hold together, in bytes (`limits.fetch_ring_total`).
#[derive(Debug)]
pub struct RingBudget {
    limit: u64,
    held: AtomicU64,
}

impl RingBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<RingBudget> {
        Arc::new(RingBudget { limit, held: AtomicU64::new(0) })
    }

    /// Bytes held by every ring now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.held() > self.limit
    }
}

/// The recent frames of one fetch.
pub(super) struct FrameRing {
    state: Mutex<State>,
    per_fetch: u64,
    budget: Arc<RingBudget>,
    /// Woken when a reader of a relaying ring moved on or left (the fetch may have room).
    room: Notify,
}

/// A reader of one ring (see [`FrameRing::join`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ReaderId(u64);

/// What one reader still wants: `pos..end`.
struct Wants {
    pos: u64,
    end: u64,
}

struct State {
    /// `(offset in the blob, frame)`, contiguous and in order.
    frames: VecDeque<(u64, Bytes)>,
    /// Bytes in `frames`.
    bytes: u64,
    /// The end of the last frame: every byte below was received.
    end: u64,
    /// Bytes below this offset are in the staging file (readable there).
    durable: u64,
    /// Set when the disk refused the blob: nothing becomes durable any more.
    relaying: bool,
    /// Every reader's next byte, so a relaying ring keeps the frames someone still needs.
    readers: HashMap<ReaderId, Wants>,
    next_reader: u64,
}

impl State {
    /// Whether a reader still needs the bytes `at..end`.
    fn needed(&self, at: u64, end: u64) -> bool {
        self.readers.values().any(|w| w.pos < end && at < w.end)
    }
}

/// What a reader at some offset gets from the ring.
#[derive(Debug)]
pub(super) enum Slice {
    /// Frames from the offset on (sliced to it and to the limit, not copied).
    Frames(Vec<Bytes>),
    /// The reader is behind the ring: bytes from its offset up to `durable` are in the
    /// staging file.
    Behind { durable: u64 },
    /// The reader is behind the ring and the bytes it needs are in neither: the disk refused
    /// the blob and the frames left the ring before this reader joined.
    Gone,
}

impl FrameRing {
    /// An empty ring keeping up to `per_fetch` bytes of durable frames, within `budget`.
    pub(super) fn new(per_fetch: u64, budget: Arc<RingBudget>) -> FrameRing {
        let state = State {
            frames: VecDeque::new(),
            bytes: 0,
            end: 0,
            durable: 0,
            relaying: false,
            readers: HashMap::new(),
            next_reader: 0,
        };
        FrameRing { state: Mutex::new(state), per_fetch, budget, room: Notify::new() }
    }

    /// A new reader, wanting everything until it [`seek`](Self::seek)s; `None` when a relaying
    /// ring already let go of bytes that are not in the staging file (a newcomer could not be
    /// given them). Join when the fetch is joined, before waiting for its first answer, so no
    /// frame leaves a relaying ring unseen.
    pub(super) fn join(&self) -> Option<ReaderId> {
        let mut s = self.lock();
        let start = s.frames.front().map_or(s.end, |(at, _)| *at);
        if s.relaying && start > s.durable {
            return None;
        }
        let id = ReaderId(s.next_reader);
        s.next_reader += 1;
        s.readers.insert(id, Wants { pos: 0, end: u64::MAX });
        Some(id)
    }

    /// The reader wants `pos..end` (`None`: to the end of the blob).
    pub(super) fn seek(&self, id: ReaderId, pos: u64, end: Option<u64>) {
        let mut s = self.lock();
        s.readers.insert(id, Wants { pos, end: end.unwrap_or(u64::MAX) });
        self.moved(&mut s);
    }

    /// The reader is gone: what only it needed may leave.
    pub(super) fn leave(&self, id: ReaderId) {
        let mut s = self.lock();
        s.readers.remove(&id);
        self.moved(&mut s);
    }

    /// Waits while the ring is relaying and a reader is more than `per_fetch` behind its end:
    /// those bytes exist nowhere else, so the fetch must not outrun the reader by more.
    pub(super) async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before looking, so a reader moving on in between is not missed.
            notified.as_mut().enable();
            if !self.full() {
                return;
            }
            notified.await;
        }
    }

    fn full(&self) -> bool {
        let s = self.lock();
        s.relaying && s.readers.values().any(|w| w.pos < w.end && w.pos.saturating_add(self.per_fetch) < s.end)
    }

    /// After a reader moved: frames of a relaying ring nobody needs leave, and the fetch may
    /// go on.
    fn moved(&self, s: &mut State) {
        if s.relaying {
            self.trim(s);
            self.room.notify_waiters();
        }
    }

    /// Appends frames received at the ring's end. Returns the new end.
    pub(super) fn push(&self, frames: &[Bytes]) -> u64 {
        let mut s = self.lock();
        let mut added = 0;
        for f in frames.iter().filter(|f| !f.is_empty()) {
            let at = s.end;
            s.frames.push_back((at, f.clone()));
            s.end += f.len() as u64;
            added += f.len() as u64;
        }
        s.bytes += added;
        self.budget.held.fetch_add(added, Ordering::Relaxed);
        self.trim(&mut s);
        s.end
    }

    /// Bytes below `offset` are in the staging file now.
    pub(super) fn durable_to(&self, offset: u64) {
        let mut s = self.lock();
        if !s.relaying {
            s.durable = s.durable.max(offset);
        }
        self.trim(&mut s);
    }

    /// The disk refused the blob: bytes from here on are only in memory.
    pub(super) fn relay(&self) {
        let mut s = self.lock();
        s.relaying = true;
        self.moved(&mut s);
    }

    /// The fetch ended: frames that are in the staging file leave now, whatever the room, so
    /// a reader that stalled does not pin them until its connection is closed (it reads the
    /// file when it wakes). A relaying ring keeps its frames: they are all a reader has.
    pub(super) fn release(&self) {
        let mut s = self.lock();
        while let Some((at, frame)) = s.frames.front() {
            if s.relaying || at + frame.len() as u64 > s.durable {
                break;
            }
            self.drop_oldest(&mut s);
        }
    }

    /// Up to `max` bytes from `from`, below `limit`, for reader `id` (who then wants what
    /// follows them).
    pub(super) fn slice(&self, id: ReaderId, from: u64, limit: u64, max: u64) -> Slice {
        let mut s = self.lock();
        let start = s.frames.front().map_or(s.end, |(at, _)| *at);
        if from < start {
            return if from < s.durable { Slice::Behind { durable: s.durable } } else { Slice::Gone };
        }
        let limit = limit.min(from.saturating_add(max));
        // The frame holding `from`: the last one starting at or before it.
        let first = s.frames.partition_point(|(at, _)| *at <= from).saturating_sub(1);
        let mut out = Vec::new();
        for (at, frame) in s.frames.iter().skip(first) {
            let (at, frame_end) = (*at, *at + frame.len() as u64);
            if at >= limit {
                break;
            }
            if frame_end <= from {
                continue;
            }
            let lo = from.saturating_sub(at) as usize;
            let hi = (limit.min(frame_end) - at) as usize;
            out.push(frame.slice(lo..hi));
        }
        let taken: u64 = out.iter().map(|f| f.len() as u64).sum();
        if let Some(w) = s.readers.get_mut(&id) {
            w.pos = from + taken;
        }
        if taken > 0 {
            self.moved(&mut s);
        }
        Slice::Frames(out)
    }

    /// Drops the oldest frames while the ring (or all rings) hold too much and the frame can
    /// be read elsewhere, or, once relaying, while no reader needs the frame.
    fn trim(&self, s: &mut State) {
        while let Some((at, frame)) = s.frames.front() {
            let end = at + frame.len() as u64;
            let droppable = if s.relaying {
                !s.needed(*at, end)
            } else {
                (s.bytes > self.per_fetch || self.budget.over()) && end <= s.durable
            };
            if !droppable {
                break;
            }
            self.drop_oldest(s);
        }
    }

    /// Lets go of the oldest frame, and gives its bytes back to the budget.
    fn drop_oldest(&self, s: &mut State) {
        if let Some((_, frame)) = s.frames.pop_front() {
            let len = frame.len() as u64;
            s.bytes -= len;
            self.budget.held.fetch_sub(len, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code holding this lock can panic midway (plain arithmetic and deque moves), so a
        // poisoned lock still guards consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FrameRing {
    fn drop(&mut self) {
        let s = self.lock();
        self.budget.held.fetch_sub(s.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn frames(sizes: &[usize]) -> Vec<Bytes> {
        let mut n = 0u8;
        sizes
            .iter()
            .map(|&s| {
                n += 1;
                Bytes::from(vec![n; s])
            })
            .collect()
    }

    fn concat(slice: Slice) -> Vec<u8> {
        match slice {
            Slice::Frames(f) => f.concat(),
            other => panic!("expected frames, got {other:?}"),
        }
    }

    /// An id for calls whose reader tracking does not matter (an unknown id is ignored).
    const NOBODY: ReaderId = ReaderId(u64::MAX);

    #[test]
    fn slices_share_frames_across_boundaries() {
        let ring = FrameRing::new(1 << 20, RingBudget::new(1 << 30));
        assert_eq!(ring.push(&frames(&[10, 10, 10])), 30);
        let got = concat(ring.slice(NOBODY, 5, 25, 100));
        assert_eq!(got, [vec![1; 5], vec![2; 10], vec![3; 5]].concat());
        // `max` bounds what one call returns.
        assert_eq!(concat(ring.slice(NOBODY, 0, 30, 12)).len(), 12);
        // Nothing past the limit, nothing at the end.
        assert!(concat(ring.slice(NOBODY, 30, 30, 100)).is_empty());
    }

    #[test]
    fn only_durable_frames_leave_and_a_late_reader_is_sent_to_the_file() {
        let budget = RingBudget::new(1 << 30);
        let ring = FrameRing::new(20, budget.clone());
        ring.push(&frames(&[10, 10, 10, 10]));
        // Over its share but nothing durable: everything stays (those bytes are nowhere else).
        assert_eq!(concat(ring.slice(NOBODY, 0, 40, 100)).len(), 40);
        ring.durable_to(25);
        // The first two frames are in the file; the third is not whole there and stays.
        assert!(matches!(ring.slice(NOBODY, 0, 40, 100), Slice::Behind { durable: 25 }));
        assert_eq!(concat(ring.slice(NOBODY, 20, 40, 100)).len(), 20);
        assert_eq!(budget.held(), 20);
        drop(ring);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn the_shared_budget_trims_a_ring_within_its_own_share() {
        let budget = RingBudget::new(15);
        let ring = FrameRing::new(1 << 20, budget.clone());
        ring.push(&frames(&[10, 10]));
        ring.durable_to(20);
        assert_eq!(budget.held(), 10);
    }

    #[test]
    fn a_relaying_ring_keeps_what_a_reader_needs_and_the_fetch_waits_for_the_slowest() {
        let budget = RingBudget::new(1 << 30);
        let ring = FrameRing::new(20, budget.clone());
        let (slow, fast) = (ring.join().unwrap(), ring.join().unwrap());
        ring.push(&frames(&[10]));
        ring.durable_to(10);
        ring.relay();
        ring.push(&frames(&[10, 10, 10]));
        // Nobody took anything: every frame stays, and the fetch, 40 ahead of its readers with
        // a share of 20, must wait.
        assert_eq!(budget.held(), 40);
        assert!(ring.room().now_or_never().is_none(), "the fetch outran a relaying reader");
        assert_eq!(concat(ring.slice(fast, 0, 40, 100)).len(), 40);
        assert!(ring.room().now_or_never().is_none(), "the fetch outran the slower reader");

        // The slow reader takes 25: frame 1 and 2 are no one's any more, and it is 15 behind.
        assert_eq!(concat(ring.slice(slow, 0, 40, 25)).len(), 25);
        assert_eq!(budget.held(), 20);
        assert!(ring.room().now_or_never().is_some(), "the fetch still waits");
        // A reader that is gone holds nothing back.
        ring.push(&frames(&[10, 10]));
        assert!(ring.room().now_or_never().is_none());
        ring.leave(slow);
        assert!(ring.room().now_or_never().is_some());
        assert_eq!(budget.held(), 20, "only the fast reader's frames stay");
        // Nothing becomes durable once relaying, and no one may join now that bytes 10..40
        // are gone: a reader at 15 is told.
        ring.durable_to(60);
        assert!(ring.join().is_none());
        assert!(matches!(ring.slice(NOBODY, 15, 60, 100), Slice::Gone));
        assert!(matches!(ring.slice(NOBODY, 0, 60, 100), Slice::Behind { durable: 10 }));
    }

    #[tokio::test]
    async fn a_waiting_fetch_wakes_when_its_reader_moves_on() {
        let ring = Arc::new(FrameRing::new(20, RingBudget::new(1 << 30)));
        let reader = ring.join().unwrap();
        ring.relay();
        ring.push(&frames(&[10, 10, 10]));
        let waiting = tokio::spawn({
            let ring = ring.clone();
            async move { ring.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(concat(ring.slice(reader, 0, 30, 15)).len(), 15);
        tokio::time::timeout(std::time::Duration::from_secs(20), waiting).await.expect("not woken").unwrap();
    }
}

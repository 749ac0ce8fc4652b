//! The frame ring of one blob fetch: the most recent body frames the fetch received, shared as
//! the same refcounted [`Bytes`] by every reader that keeps up, so the bytes of a cold pull are
//! copied once in (the staging write) and once out (the client's socket), never read back.
//!
//! A frame leaves the ring (oldest first) once the ring holds more than its share and the frame
//! is durable, i.e. in the staging file: a reader that falls behind the ring, or joins late,
//! then reads the file. Frames not yet durable are the batch being hashed and written and the
//! one gathering behind it, so they are bounded by the fetch's batching, not by the ring.
//! When the disk refused the blob nothing past the refusal becomes durable: frames then leave
//! on size alone, and a reader left behind cannot be served (see [`Slice::Gone`]).
//!
//! Memory: at most `per_fetch` bytes of durable frames per fetch, and `total` across all fetches
//! ([`RingBudget`]); a slow reader holds nothing (it copies no frames it has not sent).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

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
    /// the blob and the frames left the ring before this reader took them.
    Gone,
}

impl FrameRing {
    /// An empty ring keeping up to `per_fetch` bytes of durable frames, within `budget`.
    pub(super) fn new(per_fetch: u64, budget: Arc<RingBudget>) -> FrameRing {
        let state = State { frames: VecDeque::new(), bytes: 0, end: 0, durable: 0, relaying: false };
        FrameRing { state: Mutex::new(state), per_fetch, budget }
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
        self.trim(&mut s);
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

    /// Up to `max` bytes from `from`, below `limit`.
    pub(super) fn slice(&self, from: u64, limit: u64, max: u64) -> Slice {
        let s = self.lock();
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
        Slice::Frames(out)
    }

    /// Drops the oldest frames while the ring (or all rings) hold too much and the frame can
    /// be read elsewhere, or, once relaying, while the ring holds more than its share.
    fn trim(&self, s: &mut State) {
        while let Some((at, frame)) = s.frames.front() {
            let len = frame.len() as u64;
            let over = s.bytes > self.per_fetch || self.budget.over();
            let evictable = if s.relaying { s.bytes > self.per_fetch } else { at + len <= s.durable };
            if !(over && evictable) {
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

    #[test]
    fn slices_share_frames_across_boundaries() {
        let ring = FrameRing::new(1 << 20, RingBudget::new(1 << 30));
        assert_eq!(ring.push(&frames(&[10, 10, 10])), 30);
        let got = concat(ring.slice(5, 25, 100));
        assert_eq!(got, [vec![1; 5], vec![2; 10], vec![3; 5]].concat());
        // `max` bounds what one call returns.
        assert_eq!(concat(ring.slice(0, 30, 12)).len(), 12);
        // Nothing past the limit, nothing at the end.
        assert!(concat(ring.slice(30, 30, 100)).is_empty());
    }

    #[test]
    fn only_durable_frames_leave_and_a_late_reader_is_sent_to_the_file() {
        let budget = RingBudget::new(1 << 30);
        let ring = FrameRing::new(20, budget.clone());
        ring.push(&frames(&[10, 10, 10, 10]));
        // Over its share but nothing durable: everything stays (those bytes are nowhere else).
        assert_eq!(concat(ring.slice(0, 40, 100)).len(), 40);
        ring.durable_to(25);
        // The first two frames are in the file; the third is not whole there and stays.
        assert!(matches!(ring.slice(0, 40, 100), Slice::Behind { durable: 25 }));
        assert_eq!(concat(ring.slice(20, 40, 100)).len(), 20);
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
    fn a_relaying_ring_drops_on_size_and_a_reader_left_behind_is_told() {
        let ring = FrameRing::new(20, RingBudget::new(1 << 30));
        ring.push(&frames(&[10]));
        ring.durable_to(10);
        ring.relay();
        ring.push(&frames(&[10, 10, 10]));
        // Frame 1 was durable, frame 2 had to leave undurable: a reader at 10 lost it.
        assert!(matches!(ring.slice(0, 40, 100), Slice::Behind { durable: 10 }));
        assert!(matches!(ring.slice(15, 40, 100), Slice::Gone));
        assert_eq!(concat(ring.slice(20, 40, 100)).len(), 20);
        // Nothing becomes durable once relaying.
        ring.durable_to(40);
        assert!(matches!(ring.slice(15, 40, 100), Slice::Gone));
    }
}

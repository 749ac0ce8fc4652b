//! The time the cache judges tag freshness and staleness by, injectable so that a TTL can be
//! tested by moving a clock rather than by waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock seconds since the Unix epoch. Seconds, because that is what tag entries record
/// on disk (`validated_at`), and a restart must judge them by the same clock.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch, now.
    fn now_secs(&self) -> u64;
}

/// The system's wall clock: what a running Ferry uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_secs(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests: a TTL passes in an instant).
#[derive(Debug, Default)]
pub struct ManualClock {
    secs: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `secs` since the epoch.
    pub fn new(secs: u64) -> ManualClock {
        ManualClock { secs: AtomicU64::new(secs) }
    }

    /// Moves the clock forward by `d` (whole seconds; the rest is dropped).
    pub fn advance(&self, d: Duration) {
        self.secs.fetch_add(d.as_secs(), Ordering::SeqCst);
    }

    /// Sets the clock to `secs` since the epoch.
    pub fn set(&self, secs: u64) {
        self.secs.store(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> u64 {
        self.secs.load(Ordering::SeqCst)
    }
}

//! What one client connection may hold, and for how long. Without these bounds an anonymous
//! client could keep connections open forever without sending a byte, spin the accept loop at
//! the descriptor limit, or open HTTP/2 streams that never read and let every one of them hold
//! a read-ahead chunk of a blob.
//!
//! * [`Admission`]: at most `max_connections` at once; beyond it `accept` waits (no spinning,
//!   no log storm) — accept errors back off and are logged once per interval with a count.
//! * [`Activity`]: per connection, requests in flight and the response bodies that handed a
//!   frame to hyper and have not been asked for the next one (the client is not reading).
//!   [`watch`] closes a connection that is idle (no request in flight) for `client_idle_timeout`
//!   or whose oldest unread frame is older than `send_stall_timeout`; dropping the connection
//!   frees everything its streams held.
//! * [`Budget`]: every frame a response body hands to hyper holds its size from a process-wide
//!   budget until the next frame is asked for, so stalled readers together hold at most
//!   `max_buffered` bytes whatever they do; others wait for room (bounded by the stall timeout
//!   of the holders).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::Body;

/// Why [`watch`] closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// No request in flight for `client_idle_timeout`.
    Idle,
    /// A response frame waited longer than `send_stall_timeout` for the client to read it.
    Stalled,
}

/// Bounds the connections served at once.
pub struct Admission {
    slots: Arc<Semaphore>,
}

impl Admission {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Admission {
        Admission { slots: Arc::new(Semaphore::new(max.max(1))) }
    }

    /// Waits for a free slot; the permit is held by the connection until it ends.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// Shared by a connection's task, its request handlers and its response bodies.
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base` of the last request start or end.
    last: AtomicU64,
    inflight: AtomicUsize,
    /// Bodies that yielded a frame: when (ms since `base`, 0 = being polled) each waits since.
    waiting: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Activity {
    /// A new connection's activity, idle from now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        // Never 0 once time has passed, so 0 can mean "not waiting".
        (self.base.elapsed().as_millis() as u64).max(1)
    }

    /// A request arrived; until [`Activity::request_ended`] the connection is not idle.
    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.last.store(self.now_ms(), Ordering::Release);
    }

    /// A request's response is done (its body finished or was dropped).
    pub fn request_ended(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        self.last.store(self.now_ms(), Ordering::Release);
    }

    /// A handle a response body uses to say when it handed out a frame and when it was asked
    /// for the next one.
    pub fn body_clock(self: &Arc<Self>) -> BodyClock {
        let since = Arc::new(AtomicU64::new(0));
        if let Ok(mut w) = self.waiting.lock() {
            w.retain(|b| b.strong_count() > 0);
            w.push(Arc::downgrade(&since));
        }
        BodyClock { activity: self.clone(), since }
    }

    /// The oldest wait of a frame handed out and not yet followed by a poll, in ms since base.
    fn oldest_wait(&self) -> Option<u64> {
        let w = self.waiting.lock().ok()?;
        w.iter().filter_map(Weak::upgrade).map(|s| s.load(Ordering::Acquire)).filter(|&t| t > 0).min()
    }
}

/// One response body's view of [`Activity`].
pub struct BodyClock {
    activity: Arc<Activity>,
    since: Arc<AtomicU64>,
}

impl BodyClock {
    /// The body handed hyper a frame: from now on it waits for the client.
    pub fn handed_out(&self) {
        self.since.store(self.activity.now_ms(), Ordering::Release);
    }

    /// hyper asked for the next frame: the client took the last one.
    pub fn polled(&self) {
        self.since.store(0, Ordering::Release);
    }
}

/// Resolves when the connection should be closed: idle for `idle` with nothing in flight, or
/// a frame unread for `stall`. Cancel-safe; runs beside the connection.
pub async fn watch(activity: Arc<Activity>, idle: Duration, stall: Duration) -> Closed {
    loop {
        let now = activity.now_ms();
        let idle_at = if activity.inflight.load(Ordering::Acquire) == 0 {
            Some(activity.last.load(Ordering::Acquire) + idle.as_millis() as u64)
        } else {
            None
        };
        let stall_at = activity.oldest_wait().map(|t| t + stall.as_millis() as u64);
        match (idle_at, stall_at) {
            (Some(at), _) if at <= now => return Closed::Idle,
            (_, Some(at)) if at <= now => return Closed::Stalled,
            _ => {}
        }
        // Wake at the nearer deadline, and at least every second to notice new waits.
        let next = [idle_at, stall_at].into_iter().flatten().min().unwrap_or(now + 1000).min(now + 1000);
        tokio::time::sleep_until(activity.base + Duration::from_millis(next)).await;
    }
}

/// The process-wide bound on response bytes handed to hyper and not yet taken by clients.
pub struct Budget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

impl Budget {
    /// At most `bytes` in flight (at least one frame's worth).
    pub fn new(bytes: u64) -> Arc<Budget> {
        let total_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(2048);
        Arc::new(Budget { kib: Arc::new(Semaphore::new(total_kib as usize)), total_kib })
    }

    /// Reserves room for a frame of `len` bytes (waits while the budget is spent).
    pub async fn reserve(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.total_kib);
        self.kib.clone().acquire_many_owned(kib).await.ok()
    }

    /// Bytes currently held by frames clients have not taken.
    pub fn held(&self) -> u64 {
        (u64::from(self.total_kib) - self.kib.available_permits() as u64) * 1024
    }
}

/// A response body under the connection's watch and the process-wide [`Budget`]: each frame
/// holds its size from the budget until hyper asks for the next one, and the connection's
/// [`Activity`] knows how long a handed-out frame has waited. The request counts as in flight
/// until this body is dropped.
pub struct Guarded {
    inner: Body,
    clock: BodyClock,
    budget: Arc<Budget>,
    /// The budget held by the frame last handed out.
    held: Option<OwnedSemaphorePermit>,
    /// A frame waiting for room in the budget, and the reservation in progress.
    pending: Option<(Frame<Bytes>, Reservation)>,
}

type Reservation = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

impl Guarded {
    /// Wraps `inner`; the request started (for idleness) when this is built.
    pub fn new(inner: Body, activity: &Arc<Activity>, budget: Arc<Budget>) -> Guarded {
        activity.request_started();
        Guarded { inner, clock: activity.body_clock(), budget, held: None, pending: None }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        // Asked again: the client took the last frame (hyper wrote it or the stream has window).
        this.clock.polled();
        this.held = None;
        if this.pending.is_none() {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len());
                    if len == 0 {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let budget = this.budget.clone();
                    this.pending = Some((frame, Box::pin(async move { budget.reserve(len).await })));
                }
                other => return other,
            }
        }
        let Some((_, reservation)) = this.pending.as_mut() else { return Poll::Pending };
        let Poll::Ready(permit) = reservation.as_mut().poll(cx) else { return Poll::Pending };
        let Some((frame, _)) = this.pending.take() else { return Poll::Pending };
        this.held = permit;
        this.clock.handed_out();
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.clock.activity.request_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_idle_timeout() {
        let a = Activity::new();
        let started = Instant::now();
        assert_eq!(watch(a.clone(), Duration::from_secs(60), Duration::from_secs(120)).await, Closed::Idle);
        assert_eq!(started.elapsed().as_secs(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_it_open_and_its_end_restarts_the_clock() {
        let a = Activity::new();
        a.request_started();
        let w = tokio::spawn(watch(a.clone(), Duration::from_secs(60), Duration::from_secs(120)));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!w.is_finished(), "a long request (an upload, a slow upstream) is not idleness");
        a.request_ended();
        let ended = Instant::now();
        assert_eq!(w.await.unwrap(), Closed::Idle);
        assert_eq!(ended.elapsed().as_secs(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_frame_closes_the_connection_after_the_stall_timeout() {
        let a = Activity::new();
        a.request_started();
        let reading = a.body_clock();
        let stalled = a.body_clock();
        let w = tokio::spawn(watch(a.clone(), Duration::from_secs(60), Duration::from_secs(120)));
        stalled.handed_out();
        let since = Instant::now();
        // The other stream keeps reading: its progress does not save the stalled one.
        let keep_reading = tokio::spawn(async move {
            loop {
                reading.handed_out();
                tokio::time::sleep(Duration::from_secs(1)).await;
                reading.polled();
            }
        });
        assert_eq!(w.await.unwrap(), Closed::Stalled);
        assert_eq!(since.elapsed().as_secs(), 120);
        keep_reading.abort();
        drop(stalled);
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_held() {
        let b = Budget::new(4 << 20);
        let p1 = b.reserve(3 << 20).await.unwrap();
        assert_eq!(b.held(), 3 << 20);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(2 << 20).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room until a frame is taken");
        drop(p1);
        waiting.await.unwrap().unwrap();
    }
}

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
//!   of the holders). Room is reserved *before* the body is asked for the frame: hyper asks a
//!   body for a frame before it has window to send it, so a frame read first would sit in
//!   memory outside the budget on every stream with a zero window. Only one stream of a
//!   connection waits for room at a time, so room that frees up is shared among connections
//!   instead of going to the queued streams of one that never reads. Bodies known to be small
//!   (operations answers, errors, tokens) are in memory already and never wait: probes must
//!   not queue behind stalled readers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};

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
    /// Held by the one stream of this connection that waits for room in the [`Budget`].
    turn: Arc<Semaphore>,
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
            turn: Arc::new(Semaphore::new(1)),
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

    /// Makes `room`, reserved before a frame of `len` bytes was read, that frame's size: the
    /// excess goes back at once; a shortfall is taken if the budget has it now, never waited
    /// for (the frame is in memory already, and waiting while holding room could deadlock), so
    /// a frame larger than [`FRAME_ROOM`] may go over by its excess.
    fn fit(&self, mut room: OwnedSemaphorePermit, len: usize) -> OwnedSemaphorePermit {
        let kib = len.div_ceil(1024).clamp(1, self.total_kib as usize);
        let have = room.num_permits();
        if have > kib {
            drop(room.split(have - kib));
        } else if have < kib {
            let more = u32::try_from(kib - have).unwrap_or(u32::MAX);
            if let Ok(more) = self.kib.clone().try_acquire_many_owned(more) {
                room.merge(more);
            }
        }
        room
    }
}

/// Room reserved for a body's next frame before the body is asked for it: the largest piece
/// Ferry reads from disk at once (a body known to be shorter reserves its length).
pub const FRAME_ROOM: usize = crate::storage::HIT_CHUNK;

/// A body known to be at most this long is already in memory and never waits for room.
pub const SMALL_BODY: u64 = 64 * 1024;

/// A response body under the connection's watch and the process-wide [`Budget`]: each frame
/// holds its size from the budget, reserved before the frame is read, until hyper asks for the
/// next one, and the connection's [`Activity`] knows how long a handed-out frame has waited.
/// The request counts as in flight until this body is dropped.
pub struct Guarded {
    inner: Body,
    clock: BodyClock,
    budget: Arc<Budget>,
    /// The connection's turn to wait for room (see [`Activity`]).
    turn: Arc<Semaphore>,
    /// The budget held by the frame last handed out.
    held: Option<OwnedSemaphorePermit>,
    /// Room reserved for the next frame (kept while the body is producing it).
    room: Option<OwnedSemaphorePermit>,
    /// The reservation of that room in progress.
    reserving: Option<Reservation>,
}

type Reservation = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

impl Guarded {
    /// Wraps `inner`; the request started (for idleness) when this is built.
    pub fn new(inner: Body, activity: &Arc<Activity>, budget: Arc<Budget>) -> Guarded {
        activity.request_started();
        Guarded {
            inner,
            clock: activity.body_clock(),
            budget,
            turn: activity.turn.clone(),
            held: None,
            room: None,
            reserving: None,
        }
    }

    /// Reserves room for the next frame while the connection holds its turn; none for a body
    /// known to be small.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.room.is_some() {
            return Poll::Ready(());
        }
        let upper = self.inner.size_hint().upper();
        if upper.is_some_and(|u| u <= SMALL_BODY) {
            return Poll::Ready(());
        }
        let reserving = self.reserving.get_or_insert_with(|| {
            let len = upper.map_or(FRAME_ROOM, |u| usize::try_from(u).unwrap_or(FRAME_ROOM).min(FRAME_ROOM));
            let (budget, turn) = (self.budget.clone(), self.turn.clone());
            Box::pin(async move {
                let _turn = turn.acquire_owned().await.ok()?;
                budget.reserve(len).await
            })
        });
        let Poll::Ready(room) = reserving.as_mut().poll(cx) else { return Poll::Pending };
        self.reserving = None;
        self.room = room;
        Poll::Ready(())
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
        // Room first, then the frame.
        if this.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len());
                if len > 0 {
                    this.held = this.room.take().map(|room| this.budget.fit(room, len));
                    this.clock.handed_out();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this.room = None;
                Poll::Ready(end)
            }
            // The room stays reserved: the body may be reading the frame into memory now.
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
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

    /// A body of `chunks` frames of `len` bytes that counts how often it is asked for one.
    fn counted(chunks: usize, len: usize) -> (Body, Arc<AtomicUsize>) {
        use futures_util::stream::{self, StreamExt};
        use http_body_util::{BodyExt, StreamBody};
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let frames = stream::iter(0..chunks).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Frame::data(Bytes::from(vec![0u8; len])))
        });
        (StreamBody::new(frames).boxed_unsync(), asked)
    }

    /// The next frame if it is ready now.
    fn poll_now(body: &mut Guarded) -> Option<Option<Result<Frame<Bytes>, io::Error>>> {
        use futures_util::FutureExt;
        use http_body_util::BodyExt;
        body.frame().now_or_never()
    }

    #[tokio::test]
    async fn room_is_reserved_before_the_body_is_asked_for_a_frame() {
        let b = Budget::new(2 << 20);
        let mut filler = b.reserve(2 << 20).await.unwrap();
        let a = Activity::new();
        let (inner, asked) = counted(2, 512 * 1024);
        let mut body = Guarded::new(inner, &a, b.clone());
        assert!(poll_now(&mut body).is_none(), "a frame without room");
        assert_eq!(asked.load(Ordering::SeqCst), 0, "the body was read before there was room for it");
        drop(filler.split(1024));
        let frame = poll_now(&mut body).expect("room freed").unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().len(), 512 * 1024);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // The room reserved (a read chunk) was trimmed to the frame.
        assert_eq!(b.held(), (1 << 20) + 512 * 1024);
        drop(filler);
        drop(body);
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn one_stream_per_connection_waits_for_room() {
        let b = Budget::new(2 << 20);
        let mut filler = b.reserve(2 << 20).await.unwrap();
        let (greedy, other) = (Activity::new(), Activity::new());
        let mut first = Guarded::new(counted(1, 1 << 20).0, &greedy, b.clone());
        let mut second = Guarded::new(counted(1, 1 << 20).0, &greedy, b.clone());
        let mut theirs = Guarded::new(counted(1, 1 << 20).0, &other, b.clone());
        for body in [&mut first, &mut second, &mut theirs] {
            assert!(poll_now(body).is_none());
        }
        drop(filler.split(1024));
        assert!(poll_now(&mut first).is_some(), "the first waiter gets the room");
        drop(filler);
        assert!(poll_now(&mut theirs).is_some(), "the other connection is next, not the greedy one's second stream");
        assert!(poll_now(&mut second).is_none());
    }

    #[tokio::test]
    async fn bodies_known_to_be_small_never_wait_for_room() {
        let b = Budget::new(2 << 20);
        let _all = b.reserve(2 << 20).await.unwrap();
        let a = Activity::new();
        let mut probe = Guarded::new(super::super::response::full("ok\n"), &a, b.clone());
        let frame = poll_now(&mut probe).expect("an answer in memory waits for nothing").unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().as_ref(), b"ok\n");
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

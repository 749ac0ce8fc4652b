//! A fault-injecting HTTP/1.1 reverse proxy for end-to-end tests.
//!
//! [`FaultProxy`] sits in front of a real registry (so every byte it serves is real) and
//! misbehaves on demand, in ways a healthy registry never shows: error statuses, connections
//! that never answer, bodies cut short or stalled mid-way, flipped bits, ignored `Range`
//! headers. The [`Fault`] can be changed while the proxy runs ([`FaultProxy::set_fault`]) and
//! every request that arrived is recorded ([`FaultProxy::requests`]).
//!
//! [`StaticServer`] makes the degenerate cases one-liners: `StaticServer::status(500)` answers
//! 500 to everything, `StaticServer::hang()` accepts and never answers. (For "nothing listens
//! there at all", use `http://127.0.0.1:{free_port()}`.)
//!
//! Design: plain blocking `std`, one thread per connection, one request per connection
//! (`Connection: close` towards both the client and the upstream). Bodies are streamed in
//! 64 KiB pieces, never buffered whole. Every socket has read/write timeouts, every loop is
//! bounded in count and time, and dropping the proxy shuts down every open socket (so hung
//! and stalled connections end at once), stops the accept thread and waits, bounded, for the
//! connection threads to finish.

use std::collections::HashMap;

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use self::serve::serve_connection;

mod body;
mod serve;

/// Read/write timeout of every socket the proxy uses.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout for connecting to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Fault::Hang`] and [`Fault::StallAfter`] hold a connection at most.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);
/// Upper bound for serving one connection (a 200 MiB blob takes well under a minute).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(600);
/// How long `Drop` waits for the accept thread and for connection threads to finish.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request or response head accepted (bytes, and lines).
const MAX_HEAD_BYTES: u64 = 64 * 1024;
const MAX_HEAD_LINES: usize = 256;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: u64 = 4096;
/// Connections one proxy accepts over its lifetime (a safety bound on the accept loop).
const MAX_CONNECTIONS: u64 = 1_000_000;
/// Interim (1xx) responses skipped before the real one.
const MAX_INTERIM_RESPONSES: usize = 8;
/// Piece size for streaming bodies.
const COPY_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// How the proxy treats a request. A bare fault applies to every request; wrap it with
/// [`Fault::on`] / [`Fault::on_blobs`] / [`Fault::on_manifests`] to target some requests (the
/// others pass through unchanged), and with [`Fault::once`] / [`Fault::times`] to misbehave only
/// for the first matching request(s). Wrappers nest in either order:
/// `Fault::on_blobs(Fault::once(f))` and `Fault::once(Fault::on_blobs(f))` both misbehave on the
/// first blob GET only; non-matching requests never use up a `Once`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward the request and stream the response back untouched.
    PassThrough,
    /// Answer at once with this status and a small registry-style JSON error body (never
    /// contacting the upstream). 429 and 503 carry `Retry-After: 1`, 401 a
    /// `WWW-Authenticate: Basic` challenge.
    Status(u16),
    /// Read the request, then never answer: the connection stays open until the client closes
    /// it, the proxy is dropped, or [`HOLD_LIMIT`] passes.
    Hang,
    /// Forward the response head as the upstream sent it (status, `Content-Length`) and the
    /// first `n` body bytes, then close the connection: the client sees an early EOF. (No effect
    /// on a body of at most `n` bytes.)
    TruncateAfter(u64),
    /// Like [`Fault::TruncateAfter`] but keep the connection open after `n` body bytes, sending
    /// nothing more (held as for [`Fault::Hang`]).
    StallAfter(u64),
    /// Forward everything, but flip the lowest bit of the body byte at this offset (counted in
    /// the body as sent, so within the partial body of a 206 answer).
    CorruptByte(u64),
    /// Drop the client's `Range` (and `If-Range`) header before forwarding, so the upstream
    /// answers 200 with the whole body.
    IgnoreRange,
    /// Apply the inner fault to the first request it applies to, then pass through.
    Once(Box<Fault>),
    /// Apply the inner fault to the first `n` requests it applies to, then pass through.
    Times(u32, Box<Fault>),
    /// Apply the inner fault only to requests with this method (any if `None`; compared
    /// case-insensitively) whose request target (path and query) contains `path_contains`.
    Only { method: Option<String>, path_contains: String, fault: Box<Fault> },
    /// Several faults side by side: the first one that applies to a request decides (e.g.
    /// `FirstOf(vec![Fault::on_blobs(..), Fault::on_manifests(..)])`); none applying means
    /// pass through.
    FirstOf(Vec<Fault>),
}

impl Fault {
    /// `fault` only for `method` requests (`None`: any method) whose target contains
    /// `path_contains`.
    pub fn on(method: Option<&str>, path_contains: &str, fault: Fault) -> Self {
        Fault::Only {
            method: method.map(str::to_string),
            path_contains: path_contains.to_string(),
            fault: Box::new(fault),
        }
    }

    /// `fault` only for blob downloads: `GET` of a path containing `/blobs/sha256:`.
    pub fn on_blobs(fault: Fault) -> Self {
        Self::on(Some("GET"), "/blobs/sha256:", fault)
    }

    /// `fault` only for manifest requests (any method) of a path containing `/manifests/`.
    pub fn on_manifests(fault: Fault) -> Self {
        Self::on(None, "/manifests/", fault)
    }

    /// [`Fault::Once`].
    pub fn once(fault: Fault) -> Self {
        Fault::Once(Box::new(fault))
    }

    /// [`Fault::Times`].
    pub fn times(n: u32, fault: Fault) -> Self {
        Fault::Times(n, Box::new(fault))
    }

    /// What to do with a `method` request for `target`; uses up `Once` / `Times` budgets.
    /// `None` means pass through.
    fn resolve(&mut self, method: &str, target: &str) -> Option<Action> {
        match self {
            Fault::PassThrough => None,
            Fault::Status(code) => Some(Action::Status(*code)),
            Fault::Hang => Some(Action::Hang),
            Fault::TruncateAfter(n) => Some(Action::Cut { after: *n, stall: false }),
            Fault::StallAfter(n) => Some(Action::Cut { after: *n, stall: true }),
            Fault::CorruptByte(offset) => Some(Action::Corrupt(*offset)),
            Fault::IgnoreRange => Some(Action::IgnoreRange),
            Fault::Once(inner) => {
                let action = inner.resolve(method, target);
                if action.is_some() {
                    *self = Fault::PassThrough;
                }
                action
            }
            Fault::Times(n, inner) => {
                if *n == 0 {
                    return None;
                }
                let action = inner.resolve(method, target);
                if action.is_some() {
                    *n -= 1;
                }
                action
            }
            Fault::Only { method: wanted, path_contains, fault } => {
                let method_ok = wanted.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method));
                if method_ok && target.contains(path_contains.as_str()) {
                    fault.resolve(method, target)
                } else {
                    None
                }
            }
            Fault::FirstOf(faults) => faults.iter_mut().find_map(|f| f.resolve(method, target)),
        }
    }
}

/// A resolved fault for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Status(u16),
    Hang,
    Cut { after: u64, stall: bool },
    Corrupt(u64),
    IgnoreRange,
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

/// One request as the proxy received it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    target: String,
    range: Option<String>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Clones of every open socket (client and upstream sides), shut down by `Drop`.
    sockets: HashMap<u64, TcpStream>,
    /// Connection threads not yet finished.
    active: usize,
}

struct Shared {
    /// Upstream `host:port` and its address; `None` for a [`StaticServer`].
    upstream: Option<(String, SocketAddr)>,
    /// The proxy's own `127.0.0.1:PORT`.
    host: String,
    fault: Mutex<Fault>,
    log: Mutex<Vec<Recorded>>,
    log_changed: Condvar,
    conns: Mutex<Conns>,
    conns_changed: Condvar,
    /// Set (under the `conns` lock) when the proxy is dropped.
    stopping: AtomicBool,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Registers a socket so that `Drop` can shut it down; fails if the proxy is stopping.
    fn track(&self, stream: &TcpStream) -> io::Result<u64> {
        let clone = stream.try_clone()?;
        let mut conns = lock(&self.conns);
        if self.stopping() {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "fault proxy is stopping"));
        }
        conns.next_id += 1;
        let id = conns.next_id;
        conns.sockets.insert(id, clone);
        Ok(id)
    }

    /// Shuts down and forgets a socket registered with [`Shared::track`].
    fn untrack(&self, id: u64) {
        if let Some(stream) = lock(&self.conns).sockets.remove(&id) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn connection_finished(&self) {
        let mut conns = lock(&self.conns);
        conns.active = conns.active.saturating_sub(1);
        self.conns_changed.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fault-injecting reverse proxy on `127.0.0.1:PORT` (see the module docs).
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
    accept_done: mpsc::Receiver<()>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream_host` (`"127.0.0.1:PORT"` of a real registry),
    /// applying `fault`.
    pub fn start(upstream_host: &str, fault: Fault) -> Self {
        let addr = upstream_host
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("fault proxy: cannot resolve upstream {upstream_host:?}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("fault proxy: no address for upstream {upstream_host:?}"));
        Self::spawn(Some((upstream_host.to_string(), addr)), fault)
    }

    /// Starts a proxy with no upstream: requests that `fault` lets through get `502`.
    pub fn without_upstream(fault: Fault) -> Self {
        Self::spawn(None, fault)
    }

    fn spawn(upstream: Option<(String, SocketAddr)>, fault: Fault) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local_addr");
        let shared = Arc::new(Shared {
            upstream,
            host: addr.to_string(),
            fault: Mutex::new(fault),
            log: Mutex::new(Vec::new()),
            log_changed: Condvar::new(),
            conns: Mutex::new(Conns::default()),
            conns_changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let (done_tx, accept_done) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                accept_loop(&thread_shared, &listener);
                let _ = done_tx.send(());
            })
            .expect("fault proxy: spawn accept thread");
        Self { shared, addr, accept_thread: Some(accept_thread), accept_done }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.shared.host.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.host)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the fault for requests that arrive from now on (also resets `Once`/`Times`).
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
    }

    /// The current fault, with `Once`/`Times` budgets as used so far (a fired `Once` reads
    /// as `PassThrough`).
    pub fn fault(&self) -> Fault {
        lock(&self.shared.fault).clone()
    }

    /// Every request received so far, in order of arrival: `(method, target, Range header)`,
    /// where target is the path with any query string, and the `Range` header is as the client
    /// sent it (even under [`Fault::IgnoreRange`]).
    pub fn requests(&self) -> Vec<(String, String, Option<String>)> {
        lock(&self.shared.log).iter().map(|r| (r.method.clone(), r.target.clone(), r.range.clone())).collect()
    }

    /// Requests received with `method` (case-insensitive) whose target contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        count_in(&lock(&self.shared.log), method, path_contains)
    }

    /// Waits until [`FaultProxy::count`] reaches at least `n`; returns whether it did within
    /// `timeout`.
    pub fn wait_for_count(&self, method: &str, path_contains: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.shared.log);
        loop {
            if count_in(&log, method, path_contains) >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            log = self.shared.log_changed.wait_timeout(log, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Connections currently being served (including hung and stalled ones).
    pub fn active_connections(&self) -> usize {
        lock(&self.shared.conns).active
    }

    /// Waits until at most `max` connections are being served (e.g. `0`: the client gave up on
    /// every hung connection); returns whether that happened within `timeout`.
    pub fn wait_for_active_connections(&self, max: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut conns = lock(&self.shared.conns);
        loop {
            if conns.active <= max {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            conns =
                self.shared.conns_changed.wait_timeout(conns, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

fn count_in(log: &[Recorded], method: &str, path_contains: &str) -> usize {
    log.iter().filter(|r| r.method.eq_ignore_ascii_case(method) && r.target.contains(path_contains)).count()
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        {
            let conns = lock(&self.shared.conns);
            self.shared.stopping.store(true, Ordering::SeqCst);
            for stream in conns.sockets.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        // Wake the accept thread, which sees `stopping` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        match self.accept_done.recv_timeout(DROP_TIMEOUT) {
            Err(mpsc::RecvTimeoutError::Timeout) => {} // leave it detached rather than block
            _ => {
                if let Some(handle) = self.accept_thread.take() {
                    let _ = handle.join();
                }
            }
        }
        let deadline = Instant::now() + DROP_TIMEOUT;
        let mut conns = lock(&self.shared.conns);
        while conns.active > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            conns =
                self.shared.conns_changed.wait_timeout(conns, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Ready-made proxies without an upstream, for "an upstream that always does X".
pub struct StaticServer;

impl StaticServer {
    /// A server answering `code` (JSON error body) to every request.
    pub fn status(code: u16) -> FaultProxy {
        FaultProxy::without_upstream(Fault::Status(code))
    }

    /// A server that accepts connections, reads the request and never answers.
    pub fn hang() -> FaultProxy {
        FaultProxy::without_upstream(Fault::Hang)
    }

    /// A server applying `fault` to every request (anything passed through gets 502).
    pub fn with(fault: Fault) -> FaultProxy {
        FaultProxy::without_upstream(fault)
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for _ in 0..MAX_CONNECTIONS {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let Ok((stream, _)) = accepted else { continue };
        lock(&shared.conns).active += 1;
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new().name("fault-proxy-conn".to_string()).spawn(move || {
            struct Finished<'a>(&'a Shared);
            impl Drop for Finished<'_> {
                fn drop(&mut self) {
                    self.0.connection_finished();
                }
            }
            let _finished = Finished(&conn_shared);
            serve_connection(&conn_shared, stream);
        });
        if spawned.is_err() {
            shared.connection_finished();
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

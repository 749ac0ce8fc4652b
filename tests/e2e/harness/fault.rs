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
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::json;

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

// ---------------------------------------------------------------------------------------------
// Serving one connection
// ---------------------------------------------------------------------------------------------

/// Sockets of one connection, shut down (so the peer sees EOF at once) when it ends.
struct Tracked<'a> {
    shared: &'a Shared,
    ids: Vec<u64>,
}

impl Tracked<'_> {
    /// Sets the socket timeouts and registers the socket; returns its id.
    fn add(&mut self, stream: &TcpStream) -> io::Result<u64> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let id = self.shared.track(stream)?;
        self.ids.push(id);
        Ok(id)
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            self.shared.untrack(id);
        }
    }
}

/// A parsed request or response head.
struct Head {
    /// Request line or status line.
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| v.trim().parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
            .transpose()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a head (start line and headers, up to the blank line). `Ok(None)` on EOF before any
/// byte (a connection opened and closed without a request).
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut start = None;
    let mut headers = Vec::new();
    let mut budget = MAX_HEAD_BYTES;
    for _ in 0..MAX_HEAD_LINES {
        let mut line = Vec::new();
        let n = reader.by_ref().take(budget).read_until(b'\n', &mut line)?;
        if n == 0 {
            return match start {
                None => Ok(None),
                Some(_) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside an HTTP head")),
            };
        }
        budget -= n as u64;
        if line.last() != Some(&b'\n') {
            return Err(invalid("HTTP head too large or cut short".to_string()));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        match &start {
            None => start = Some(text.to_string()),
            Some(_) if text.is_empty() => {
                return Ok(start.map(|start| Head { start, headers }));
            }
            Some(_) => {
                let (name, value) = text.split_once(':').ok_or_else(|| invalid(format!("bad header line {text:?}")))?;
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
    }
    Err(invalid("too many lines in an HTTP head".to_string()))
}

fn serve_connection(shared: &Shared, client: TcpStream) {
    let mut tracked = Tracked { shared, ids: Vec::new() };
    if tracked.add(&client).is_err() {
        return;
    }
    let Ok(read_half) = client.try_clone() else { return };
    let mut client_in = BufReader::with_capacity(COPY_CHUNK, read_half);
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    // Errors only mean the exchange ended early; the tracked sockets are shut down either way.
    let _ = serve_request(shared, &mut tracked, &mut client_in, &client, deadline);
}

fn serve_request(
    shared: &Shared,
    tracked: &mut Tracked<'_>,
    client_in: &mut BufReader<TcpStream>,
    mut client_out: &TcpStream,
    deadline: Instant,
) -> io::Result<()> {
    let Some(request) = read_head(client_in)? else { return Ok(()) };
    let mut parts = request.start.split_whitespace();
    let (method, target) = match (parts.next(), parts.next()) {
        (Some(m), Some(t)) => (m.to_string(), t.to_string()),
        _ => return Err(invalid(format!("bad request line {:?}", request.start))),
    };
    // Decide first, then record: once a request shows up in the log (`wait_for_count`), its
    // fault is fixed, so a test may `set_fault` for the next one without racing it.
    let action = lock(&shared.fault).resolve(&method, &target);
    {
        let mut log = lock(&shared.log);
        log.push(Recorded {
            method: method.clone(),
            target: target.clone(),
            range: request.header("range").map(str::to_string),
        });
        shared.log_changed.notify_all();
    }
    let is_head = method.eq_ignore_ascii_case("HEAD");
    match action {
        Some(Action::Status(code)) => {
            drain_request(shared, client_in, &request, deadline)?;
            write_error(client_out, is_head, code, &target, "injected fault")
        }
        Some(Action::Hang) => {
            hold(shared, client_in);
            Ok(())
        }
        _ => {
            let Some((upstream_host, upstream_addr)) = &shared.upstream else {
                drain_request(shared, client_in, &request, deadline)?;
                return write_error(client_out, is_head, 502, &target, "fault proxy has no upstream");
            };
            let upstream = match TcpStream::connect_timeout(upstream_addr, CONNECT_TIMEOUT) {
                Ok(stream) => stream,
                Err(e) => {
                    let message = format!("fault proxy cannot reach upstream {upstream_host}: {e}");
                    drain_request(shared, client_in, &request, deadline)?;
                    return write_error(client_out, is_head, 502, &target, &message);
                }
            };
            let upstream_id = tracked.add(&upstream)?;

            // Request: same method, target and headers, Host rewritten, one request per connection.
            let ignore_range = action == Some(Action::IgnoreRange);
            let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {upstream_host}\r\nConnection: close\r\n");
            for (name, value) in &request.headers {
                let drop_it = ["host", "connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"]
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h))
                    || (ignore_range && (name.eq_ignore_ascii_case("range") || name.eq_ignore_ascii_case("if-range")));
                if !drop_it {
                    let _ = write!(head, "{name}: {value}\r\n");
                }
            }
            head.push_str("\r\n");
            let mut upstream_out = &upstream;
            upstream_out.write_all(head.as_bytes())?;
            copy_body(
                shared,
                client_in,
                &mut upstream_out,
                request_framing(&request)?,
                BodyFault::default(),
                deadline,
            )?;
            upstream_out.flush()?;

            // Response: head as sent (Connection rewritten, upstream Location mapped to the
            // proxy), then the body, possibly with a fault.
            let mut upstream_in = BufReader::with_capacity(COPY_CHUNK, &upstream);
            let (response, status) = read_response_head(&mut upstream_in)?;
            let mut head = format!("{}\r\n", response.start);
            for (name, value) in &response.headers {
                if ["connection", "keep-alive", "proxy-connection"].iter().any(|h| name.eq_ignore_ascii_case(h)) {
                    continue;
                }
                let upstream_prefix = format!("http://{upstream_host}");
                let value = match value.strip_prefix(&upstream_prefix) {
                    Some(rest) if name.eq_ignore_ascii_case("location") => format!("http://{}{rest}", shared.host),
                    _ => value.clone(),
                };
                let _ = write!(head, "{name}: {value}\r\n");
            }
            head.push_str("Connection: close\r\n\r\n");
            client_out.write_all(head.as_bytes())?;

            let fault = match action {
                Some(Action::Cut { after, .. }) => BodyFault { cut_after: Some(after), ..BodyFault::default() },
                Some(Action::Corrupt(offset)) => BodyFault { corrupt_at: Some(offset), ..BodyFault::default() },
                _ => BodyFault::default(),
            };
            let framing = response_framing(is_head, status, &response)?;
            let end = copy_body(shared, &mut upstream_in, &mut client_out, framing, fault, deadline)?;
            client_out.flush()?;
            if end == CopyEnd::Cut && matches!(action, Some(Action::Cut { stall: true, .. })) {
                // Let the upstream go (it sees the client-side abort); keep the client waiting.
                shared.untrack(upstream_id);
                hold(shared, client_in);
            }
            Ok(())
        }
    }
}

/// Reads and discards the request body (so closing the socket afterwards cannot reset the
/// connection before the client has read the answer).
fn drain_request(
    shared: &Shared,
    client_in: &mut BufReader<TcpStream>,
    request: &Head,
    deadline: Instant,
) -> io::Result<()> {
    copy_body(shared, client_in, &mut io::sink(), request_framing(request)?, BodyFault::default(), deadline).map(drop)
}

/// Reads the upstream's response head, skipping interim 1xx answers; returns it with its status.
fn read_response_head(upstream_in: &mut impl BufRead) -> io::Result<(Head, u16)> {
    for _ in 0..MAX_INTERIM_RESPONSES {
        let head = read_head(upstream_in)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed without answering"))?;
        let status: u16 = head
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", head.start)))?;
        if !(100..200).contains(&status) || status == 101 {
            return Ok((head, status));
        }
    }
    Err(invalid("too many interim responses".to_string()))
}

/// Keeps a connection open, sending nothing, until the client closes it, the proxy is dropped
/// (which shuts the socket down) or [`HOLD_LIMIT`] passes. Whatever the client sends is
/// discarded.
fn hold(shared: &Shared, client_in: &mut BufReader<TcpStream>) {
    let deadline = Instant::now() + HOLD_LIMIT;
    let mut buf = [0u8; 4096];
    // Each pass blocks until data, EOF, an error or the deadline: bounded by the deadline, and
    // by the count in case a client streams data at us for the whole time.
    for _ in 0..1_000_000 {
        let now = Instant::now();
        if shared.stopping() || now >= deadline || client_in.get_ref().set_read_timeout(Some(deadline - now)).is_err() {
            return;
        }
        match client_in.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Writes a complete registry-style error response.
fn write_error(mut out: &TcpStream, is_head: bool, code: u16, target: &str, message: &str) -> io::Result<()> {
    let (reason, error_code) = match code {
        400 => ("Bad Request", "UNSUPPORTED"),
        401 => ("Unauthorized", "UNAUTHORIZED"),
        403 => ("Forbidden", "DENIED"),
        404 if target.contains("/blobs/") => ("Not Found", "BLOB_UNKNOWN"),
        404 if target.contains("/manifests/") => ("Not Found", "MANIFEST_UNKNOWN"),
        404 => ("Not Found", "NAME_UNKNOWN"),
        408 => ("Request Timeout", "UNAVAILABLE"),
        429 => ("Too Many Requests", "TOOMANYREQUESTS"),
        500 => ("Internal Server Error", "UNKNOWN"),
        502 => ("Bad Gateway", "UNAVAILABLE"),
        503 => ("Service Unavailable", "UNAVAILABLE"),
        504 => ("Gateway Timeout", "UNAVAILABLE"),
        _ => ("Injected Fault", "UNKNOWN"),
    };
    let body = json!({"errors": [{"code": error_code, "message": format!("{message} ({code})"), "detail": null}]});
    let body = serde_json::to_vec(&body).expect("serialise error body");
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
         Docker-Distribution-Api-Version: registry/2.0\r\nConnection: close\r\n",
        body.len()
    );
    if code == 429 || code == 503 {
        head.push_str("Retry-After: 1\r\n");
    }
    if code == 401 {
        head.push_str("WWW-Authenticate: Basic realm=\"ferry-fault-proxy\"\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if !is_head {
        out.write_all(&body)?;
    }
    out.flush()
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    /// Chunked in, chunked out (re-chunked along the pieces read; trailers dropped).
    Chunked,
    UntilEof,
}

fn request_framing(head: &Head) -> io::Result<Framing> {
    Ok(if head.is_chunked() { Framing::Chunked } else { head.content_length()?.map_or(Framing::None, Framing::Length) })
}

fn response_framing(is_head: bool, status: u16, head: &Head) -> io::Result<Framing> {
    Ok(if is_head || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::None
    } else if head.is_chunked() {
        Framing::Chunked
    } else {
        head.content_length()?.map_or(Framing::UntilEof, Framing::Length)
    })
}

/// Body misbehaviour, in payload offsets (after de-chunking).
#[derive(Debug, Clone, Copy, Default)]
struct BodyFault {
    /// Stop forwarding after this many bytes.
    cut_after: Option<u64>,
    /// Flip the lowest bit of the byte at this offset.
    corrupt_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyEnd {
    Complete,
    /// Stopped at `BodyFault::cut_after` with more body still to come.
    Cut,
}

/// Writes payload pieces to `out`, applying a [`BodyFault`] and chunked framing.
struct Pump<'a, W: Write> {
    shared: &'a Shared,
    out: &'a mut W,
    chunked: bool,
    sent: u64,
    fault: BodyFault,
    deadline: Instant,
}

impl<W: Write> Pump<'_, W> {
    /// Forwards one piece; `Ok(false)` once the body has been cut.
    fn forward(&mut self, data: &mut [u8]) -> io::Result<bool> {
        if self.shared.stopping() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "fault proxy is stopping"));
        }
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "fault proxy connection deadline"));
        }
        let len = data.len() as u64;
        if let Some(at) = self.fault.corrupt_at {
            if (self.sent..self.sent + len).contains(&at) {
                data[usize::try_from(at - self.sent).expect("offset within piece")] ^= 0x01;
            }
        }
        let keep = match self.fault.cut_after {
            Some(cut) if self.sent + len > cut => usize::try_from(cut.saturating_sub(self.sent)).expect("within piece"),
            _ => data.len(),
        };
        if self.chunked {
            write!(self.out, "{:x}\r\n", data.len())?;
        }
        self.out.write_all(&data[..keep])?;
        self.sent += keep as u64;
        if keep < data.len() {
            return Ok(false);
        }
        if self.chunked {
            self.out.write_all(b"\r\n")?;
        }
        Ok(true)
    }

    /// Forwards exactly `n` bytes from `src`.
    fn forward_exact(&mut self, src: &mut impl Read, n: u64, buf: &mut [u8]) -> io::Result<bool> {
        let mut remaining = n;
        while remaining > 0 {
            let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
            let got = src.read(&mut buf[..want])?;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than announced"));
            }
            remaining -= got as u64;
            if !self.forward(&mut buf[..got])? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reads one CRLF-terminated line of a chunked body.
fn read_chunk_line(src: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    src.by_ref().take(MAX_CHUNK_LINE).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(invalid("chunked body: line too long or cut short".to_string()));
    }
    Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string())
}

/// Streams a body with `framing` from `src` to `out`, applying `fault`.
fn copy_body(
    shared: &Shared,
    src: &mut impl BufRead,
    out: &mut impl Write,
    framing: Framing,
    fault: BodyFault,
    deadline: Instant,
) -> io::Result<CopyEnd> {
    let mut pump = Pump { shared, out, chunked: framing == Framing::Chunked, sent: 0, fault, deadline };
    let mut buf = vec![0u8; COPY_CHUNK];
    let cut = |more: bool| if more { CopyEnd::Complete } else { CopyEnd::Cut };
    match framing {
        Framing::None => Ok(CopyEnd::Complete),
        Framing::Length(n) => pump.forward_exact(src, n, &mut buf).map(cut),
        Framing::UntilEof => {
            // Bounded by the connection deadline (checked in `forward`) and the socket timeouts.
            loop {
                let got = src.read(&mut buf)?;
                if got == 0 {
                    return Ok(CopyEnd::Complete);
                }
                if !pump.forward(&mut buf[..got])? {
                    return Ok(CopyEnd::Cut);
                }
            }
        }
        Framing::Chunked => {
            // One pass per chunk, bounded by the deadline (each pass reads at least a line).
            while Instant::now() < deadline {
                let line = read_chunk_line(src)?;
                let size_hex = line.split(';').next().unwrap_or_default().trim();
                let size =
                    u64::from_str_radix(size_hex, 16).map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Skip trailers up to the blank line, then end our own chunked body.
                    for _ in 0..MAX_HEAD_LINES {
                        if read_chunk_line(src)?.is_empty() {
                            pump.out.write_all(b"0\r\n\r\n")?;
                            return Ok(CopyEnd::Complete);
                        }
                    }
                    return Err(invalid("too many trailer lines".to_string()));
                }
                if !pump.forward_exact(src, size, &mut buf)? {
                    return Ok(CopyEnd::Cut);
                }
                if !read_chunk_line(src)?.is_empty() {
                    return Err(invalid("chunk not followed by CRLF".to_string()));
                }
            }
            Err(io::Error::new(io::ErrorKind::TimedOut, "fault proxy connection deadline"))
        }
    }
}

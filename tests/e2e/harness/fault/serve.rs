//! Serving one proxy connection: read the request, decide its fault, record it, then answer
//! it directly or forward it to the upstream and stream the answer back (see [`super`]).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use serde_json::json;

use super::body::{copy_body, request_framing, response_framing, BodyFault, CopyEnd};
use super::{
    invalid, lock, Action, Recorded, Shared, CONNECTION_DEADLINE, CONNECT_TIMEOUT, COPY_CHUNK, HOLD_LIMIT, IO_TIMEOUT,
    MAX_HEAD_BYTES, MAX_HEAD_LINES, MAX_INTERIM_RESPONSES,
};

/// Request headers never forwarded (hop-by-hop, or rewritten by the proxy).
const HOP_BY_HOP_REQUEST: [&str; 7] =
    ["host", "connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"];
/// Response headers never forwarded (the proxy sends its own `Connection: close`).
const HOP_BY_HOP_RESPONSE: [&str; 3] = ["connection", "keep-alive", "proxy-connection"];

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
pub(super) struct Head {
    /// Request line or status line.
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub(super) fn is_chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub(super) fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| v.trim().parse().map_err(|_| invalid(format!("bad Content-Length {v:?}"))))
            .transpose()
    }
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

/// Serves the one request of a freshly accepted connection.
pub(super) fn serve_connection(shared: &Shared, client: TcpStream) {
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

/// One request being served.
struct Exchange<'a> {
    shared: &'a Shared,
    request: Head,
    method: String,
    target: String,
    deadline: Instant,
}

impl Exchange<'_> {
    fn is_head(&self) -> bool {
        self.method.eq_ignore_ascii_case("HEAD")
    }

    /// Reads and discards the request body (so closing the socket afterwards cannot reset the
    /// connection before the client has read the answer).
    fn drain_request(&self, client_in: &mut BufReader<TcpStream>) -> io::Result<()> {
        let framing = request_framing(&self.request)?;
        copy_body(self.shared, client_in, &mut io::sink(), framing, BodyFault::default(), self.deadline).map(drop)
    }

    /// Drains the request and answers `code` with a registry-style error body.
    fn refuse(
        &self,
        client_in: &mut BufReader<TcpStream>,
        client_out: &TcpStream,
        code: u16,
        why: &str,
    ) -> io::Result<()> {
        self.drain_request(client_in)?;
        write_error(client_out, self.is_head(), code, &self.target, why)
    }
}

fn serve_request(
    shared: &Shared,
    tracked: &mut Tracked<'_>,
    client_in: &mut BufReader<TcpStream>,
    client_out: &TcpStream,
    deadline: Instant,
) -> io::Result<()> {
    let Some(request) = read_head(client_in)? else { return Ok(()) };
    let mut parts = request.start.split_whitespace();
    let (method, target) = match (parts.next(), parts.next()) {
        (Some(m), Some(t)) => (m.to_string(), t.to_string()),
        _ => return Err(invalid(format!("bad request line {:?}", request.start))),
    };
    let exchange = Exchange { shared, request, method, target, deadline };
    let action = decide_and_record(&exchange);
    match action {
        Some(Action::Status(code)) => exchange.refuse(client_in, client_out, code, "injected fault"),
        Some(Action::Hang) => {
            hold(shared, client_in);
            Ok(())
        }
        _ => proxy(&exchange, action, tracked, client_in, client_out),
    }
}

/// Decides the request's fault, then records the request: once a request shows up in the log
/// (`wait_for_count`), its fault is fixed, so a test may `set_fault` for the next one without
/// racing it.
fn decide_and_record(exchange: &Exchange<'_>) -> Option<Action> {
    let shared = exchange.shared;
    let action = lock(&shared.fault).resolve(&exchange.method, &exchange.target);
    let mut log = lock(&shared.log);
    log.push(Recorded {
        method: exchange.method.clone(),
        target: exchange.target.clone(),
        range: exchange.request.header("range").map(str::to_string),
    });
    shared.log_changed.notify_all();
    action
}

/// Forwards the request to the upstream and streams the answer back, applying `action`'s body
/// fault (and holding the client after a stall).
fn proxy(
    exchange: &Exchange<'_>,
    action: Option<Action>,
    tracked: &mut Tracked<'_>,
    client_in: &mut BufReader<TcpStream>,
    mut client_out: &TcpStream,
) -> io::Result<()> {
    let shared = exchange.shared;
    let Some((upstream_host, upstream_addr)) = &shared.upstream else {
        return exchange.refuse(client_in, client_out, 502, "fault proxy has no upstream");
    };
    let upstream = match TcpStream::connect_timeout(upstream_addr, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            let message = format!("fault proxy cannot reach upstream {upstream_host}: {e}");
            return exchange.refuse(client_in, client_out, 502, &message);
        }
    };
    let upstream_id = tracked.add(&upstream)?;

    // Request: same method, target and headers, Host rewritten, one request per connection.
    let mut upstream_out = &upstream;
    let head = request_head(exchange, upstream_host, action == Some(Action::IgnoreRange));
    upstream_out.write_all(head.as_bytes())?;
    let framing = request_framing(&exchange.request)?;
    copy_body(shared, client_in, &mut upstream_out, framing, BodyFault::default(), exchange.deadline)?;
    upstream_out.flush()?;

    // Response: head as sent (Connection rewritten, upstream Location mapped to the proxy),
    // then the body, possibly with a fault.
    let mut upstream_in = BufReader::with_capacity(COPY_CHUNK, &upstream);
    let (response, status) = read_response_head(&mut upstream_in)?;
    client_out.write_all(response_head(shared, &response, upstream_host).as_bytes())?;
    let fault = match action {
        Some(Action::Cut { after, .. }) => BodyFault { cut_after: Some(after), ..BodyFault::default() },
        Some(Action::Corrupt(offset)) => BodyFault { corrupt_at: Some(offset), ..BodyFault::default() },
        _ => BodyFault::default(),
    };
    let framing = response_framing(exchange.is_head(), status, &response)?;
    let end = copy_body(shared, &mut upstream_in, &mut client_out, framing, fault, exchange.deadline)?;
    client_out.flush()?;
    if end == CopyEnd::Cut && matches!(action, Some(Action::Cut { stall: true, .. })) {
        // Let the upstream go (it sees the client-side abort); keep the client waiting.
        shared.untrack(upstream_id);
        hold(shared, client_in);
    }
    Ok(())
}

/// The request head sent upstream: hop-by-hop headers dropped, and `Range` / `If-Range` too
/// with `ignore_range`.
fn request_head(exchange: &Exchange<'_>, upstream_host: &str, ignore_range: bool) -> String {
    let (method, target) = (&exchange.method, &exchange.target);
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {upstream_host}\r\nConnection: close\r\n");
    for (name, value) in &exchange.request.headers {
        let drop_it = HOP_BY_HOP_REQUEST.iter().any(|h| name.eq_ignore_ascii_case(h))
            || (ignore_range && (name.eq_ignore_ascii_case("range") || name.eq_ignore_ascii_case("if-range")));
        if !drop_it {
            let _ = write!(head, "{name}: {value}\r\n");
        }
    }
    head.push_str("\r\n");
    head
}

/// The response head sent to the client: as the upstream sent it, with `Connection: close`
/// and an absolute `Location` on the upstream mapped onto the proxy.
fn response_head(shared: &Shared, response: &Head, upstream_host: &str) -> String {
    let upstream_prefix = format!("http://{upstream_host}");
    let mut head = format!("{}\r\n", response.start);
    for (name, value) in &response.headers {
        if HOP_BY_HOP_RESPONSE.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            continue;
        }
        let value = match value.strip_prefix(&upstream_prefix) {
            Some(rest) if name.eq_ignore_ascii_case("location") => format!("http://{}{rest}", shared.host),
            _ => value.clone(),
        };
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    head
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

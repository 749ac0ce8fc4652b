//! A small HTTP/1.1 client (`http://` only), for poking servers directly.
//!
//! [`http_request`] and friends send one request on a fresh connection (`Connection: close`)
//! and buffer the whole answer. A [`Client`] keeps one connection alive across requests, as one
//! download slot of a real client does, and streams bodies: every byte is counted, only the
//! first `keep` are kept (the bench pulls gigabytes through it). Both are the same exchange
//! code; connect, read and write are each bounded by a timeout.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// Per-operation timeout of [`http_request`] and of a default [`Client`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for connecting, whatever the operation timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read size: large reads keep the client from being the bottleneck on loopback.
const READ_BUF: usize = 256 * 1024;
/// Longest status, header or chunk-size line accepted.
const MAX_LINE: u64 = 64 * 1024;
/// Most header (or trailer) lines accepted in one response.
const MAX_HEADERS: usize = 256;
const USER_AGENT: &str = "ferry-e2e-harness";

/// A response. From [`http_request`] the body is complete; from a [`Client`] request it is the
/// first `keep` bytes, and [`HttpResponse::len`] counts them all.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as sent by the server; look them up with [`HttpResponse::header`].
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if the server used chunked transfer encoding.
    pub body: Vec<u8>,
    /// Body bytes received (more than `body.len()` when only a prefix was kept).
    pub len: u64,
}

impl HttpResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Stores one piece of the body: counted always, kept up to `keep` bytes.
    fn consume(&mut self, data: &[u8], keep: usize) {
        self.len += data.len() as u64;
        if self.body.len() < keep {
            let take = data.len().min(keep - self.body.len());
            self.body.extend_from_slice(&data[..take]);
        }
    }
}

/// A request body. `Content-Length` is added for `Bytes` and `File` unless the headers already
/// have one (tests of bad input may send a lying length); `Empty` sends neither.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Streamed from the file (`sendfile` on Linux).
    File(&'a Path),
}

/// Sends one request to an `http://host:port/path` URL with `Connection: close` and reads the
/// whole response. Connect, read and write are each bounded by [`HTTP_TIMEOUT`].
pub fn http_request(method: &str, url: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
    http_request_timeout(method, url, headers, HTTP_TIMEOUT)
}

/// [`http_request`] with an explicit per-operation timeout.
pub fn http_request_timeout(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    Client::one_shot(timeout).request(method, url, headers, Body::Empty, usize::MAX)
}

/// [`http_request`] with a request body (see [`Body`] for `Content-Length`). A server may
/// answer (e.g. 413) and close before reading the whole body: its answer is returned.
pub fn http_request_body(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<HttpResponse> {
    Client::one_shot(HTTP_TIMEOUT).request(method, url, headers, Body::Bytes(body), usize::MAX)
}

/// `(authority, path)` of an `http://` URL.
fn split_url(url: &str) -> io::Result<(&str, &str)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("only http:// URLs are supported: {url}"))
    })?;
    Ok(rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..])))
}

/// A client with (at most) one connection, kept alive between requests unless made with
/// [`Client::one_shot`].
pub struct Client {
    conn: Option<Conn>,
    timeout: Duration,
    keep_alive: bool,
}

impl Default for Client {
    fn default() -> Self {
        Client::new(HTTP_TIMEOUT)
    }
}

impl Client {
    /// A keep-alive client whose every connect, read and write is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Client {
        Client { conn: None, timeout, keep_alive: true }
    }

    /// A client that sends `Connection: close` and never reuses a connection.
    fn one_shot(timeout: Duration) -> Client {
        Client { conn: None, timeout, keep_alive: false }
    }

    /// One request; the body is read whole but only its first `keep` bytes are kept. A
    /// kept-alive connection that the server closed in between is retried once, on a new one.
    pub fn request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        keep: usize,
    ) -> io::Result<HttpResponse> {
        let (authority, path) = split_url(url)?;
        for _ in 0..2 {
            let reused = self.conn.as_ref().is_some_and(|c| c.authority == authority);
            if !reused {
                self.conn = Some(Conn::open(authority, self.timeout)?);
            }
            let Some(conn) = self.conn.as_mut() else { unreachable!("connection was just opened") };
            let request = Request { method, path, headers, body, close: !self.keep_alive };
            match conn.exchange(&request, keep) {
                Ok((response, reusable)) => {
                    if !reusable || !self.keep_alive {
                        self.conn = None;
                    }
                    return Ok(response);
                }
                Err(Failure::BeforeResponse(_)) if reused => self.conn = None,
                Err(Failure::BeforeResponse(e) | Failure::During(e)) => {
                    self.conn = None;
                    return Err(e);
                }
            }
        }
        Err(io::Error::other("connection closed twice before a response"))
    }

    /// `GET`, keeping the first `keep` body bytes.
    pub fn get(&mut self, url: &str, headers: &[(&str, &str)], keep: usize) -> io::Result<HttpResponse> {
        self.request("GET", url, headers, Body::Empty, keep)
    }
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Body<'a>,
    /// Send `Connection: close`.
    close: bool,
}

/// Where a failed exchange broke: a kept-alive connection the server closed in between fails
/// before any response byte, and only then is a retry on a new connection harmless.
enum Failure {
    BeforeResponse(io::Error),
    During(io::Error),
}

struct Conn {
    authority: String,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(authority: &str, timeout: Duration) -> io::Result<Conn> {
        let addr = authority
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot resolve {authority}")))?;
        let stream = TcpStream::connect_timeout(&addr, timeout.min(CONNECT_TIMEOUT))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            authority: authority.to_string(),
            reader: BufReader::with_capacity(64 * 1024, stream),
            buf: vec![0; READ_BUF],
        })
    }

    /// One request/response; returns the response and whether the connection can be reused.
    fn exchange(&mut self, request: &Request<'_>, keep: usize) -> Result<(HttpResponse, bool), Failure> {
        // A failed send may still have an answer waiting (a server refusing a body early):
        // the send error only counts if no answer can be read.
        let sent = self.send(request);
        let (status, headers, http11) = match self.read_head() {
            Ok(head) => head,
            Err(e) => return Err(Failure::BeforeResponse(sent.err().unwrap_or(e))),
        };
        let mut response = HttpResponse { status, headers, body: Vec::new(), len: 0 };
        let close = !http11 || response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let no_body = request.method.eq_ignore_ascii_case("HEAD") || matches!(status, 100..=199 | 204 | 304);
        let chunked = response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = response.header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let framed = if no_body {
            true
        } else if chunked {
            self.read_chunked(&mut response, keep).map_err(Failure::During)?;
            true
        } else if let Some(n) = length {
            self.read_exact_body(n, &mut response, keep).map_err(Failure::During)?;
            true
        } else {
            // After a request body, the server may reset a connection it has answered on.
            let lenient = !matches!(request.body, Body::Empty);
            self.read_to_eof(&mut response, keep, lenient).map_err(Failure::During)?;
            false
        };
        Ok((response, framed && !close && sent.is_ok()))
    }

    fn send(&mut self, request: &Request<'_>) -> io::Result<()> {
        let Request { method, path, headers, body, close } = *request;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority);
        if close {
            head.push_str("Connection: close\r\n");
        }
        let _ = write!(head, "User-Agent: {USER_AGENT}\r\n");
        for (name, value) in headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let has_length = headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
        let file = match body {
            Body::File(p) => Some(File::open(p)?),
            _ => None,
        };
        let length = match (body, &file) {
            (Body::Bytes(b), _) => Some(b.len() as u64),
            (_, Some(f)) => Some(f.metadata()?.len()),
            _ => None,
        };
        if let Some(n) = length.filter(|_| !has_length) {
            let _ = write!(head, "Content-Length: {n}\r\n");
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        match (body, file) {
            (Body::Bytes(b), _) => stream.write_all(b)?,
            (_, Some(mut f)) => {
                io::copy(&mut f, stream)?;
            }
            _ => {}
        }
        stream.flush()
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string())
    }

    /// Status line and headers: `(status, headers, is HTTP/1.1)`.
    #[allow(clippy::type_complexity)]
    fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>, bool)> {
        let status_line = self.read_line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("malformed status line {status_line:?}"));
        let mut parts = status_line.split_whitespace();
        let version = parts.next().ok_or_else(bad)?;
        let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let mut headers = Vec::new();
        for _ in 0..MAX_HEADERS {
            let line = self.read_line()?;
            if line.is_empty() {
                return Ok((status, headers, version == "HTTP/1.1"));
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "too many response headers"))
    }

    fn read_exact_body(&mut self, mut remaining: u64, response: &mut HttpResponse, keep: usize) -> io::Result<()> {
        while remaining > 0 {
            let want = usize::try_from(remaining).map_or(self.buf.len(), |r| r.min(self.buf.len()));
            let n = self.reader.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than Content-Length"));
            }
            response.consume(&self.buf[..n], keep);
            remaining -= n as u64;
        }
        Ok(())
    }

    /// A chunked body (trailers skipped). A broken one is `malformed chunked body`, except that
    /// a timeout stays a timeout.
    fn read_chunked(&mut self, response: &mut HttpResponse, keep: usize) -> io::Result<()> {
        let malformed = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => e,
            _ => io::Error::new(io::ErrorKind::InvalidData, format!("malformed chunked body: {e}")),
        };
        loop {
            let line = self.read_line().map_err(malformed)?;
            let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| malformed(io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))))?;
            if size == 0 {
                for _ in 0..MAX_HEADERS {
                    if self.read_line().map_err(malformed)?.is_empty() {
                        return Ok(());
                    }
                }
                return Err(malformed(io::Error::new(io::ErrorKind::InvalidData, "endless trailers")));
            }
            self.read_exact_body(size, response, keep).map_err(malformed)?;
            if !self.read_line().map_err(malformed)?.is_empty() {
                return Err(malformed(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF")));
            }
        }
    }

    /// A body delimited by the end of the connection. With `lenient`, a read error (a reset
    /// after the answer) also ends it.
    fn read_to_eof(&mut self, response: &mut HttpResponse, keep: usize, lenient: bool) -> io::Result<()> {
        loop {
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => response.consume(&self.buf[..n], keep),
                Err(_) if lenient => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

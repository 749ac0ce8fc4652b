//! End-to-end test harness shared by every module of the `e2e` test binary (and benches/e2e.rs).
//!
//! Plain blocking `std` code plus `sha2`, `hex`, `serde_json` and `tempfile`:
//!
//! * [`require_tool`], [`free_port`], [`tmp_dir`], [`sha256_bytes`], [`sha256_file`].
//! * [`Registry`]: a real CNCF Distribution (`docker-registry`) on a loopback port, with its
//!   combined-format access log parsed by [`Registry::requests`] / [`Registry::count_requests`].
//! * [`build_image`] / [`build_index`]: OCI image layouts generated in-process from a seeded
//!   PRNG (real ustar layers, streamed to disk and hashed while written).
//! * [`skopeo`] and helpers ([`push_layout`], [`pull_to_dir`], [`pull_to_oci`], [`inspect_raw`],
//!   `*_creds` variants): hermetic skopeo runs against `127.0.0.1:PORT` references.
//! * [`Ferry`]: the binary under test, started with a YAML config, with its output captured.
//! * [`http_request`] / [`http_request_body`]: a tiny HTTP/1.1 client for poking servers directly.
//! * [`token::TokenServer`]: a Bearer-token issuer; [`Registry::start_with_token`] starts a
//!   registry with `auth: token` that trusts it.
//!
//! Waiting is never done with a bare `sleep`: readiness checks poll with bounded attempts and
//! a deadline, and everything else waits on channels or condition variables with timeouts.
//! Processes are only ever signalled through the PID of a child this module spawned.
#![allow(dead_code)]

use std::env;
use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub mod fault;
pub mod token;

/// How to get the external tools the end-to-end tests rely on.
pub const INSTALL_HINT: &str = "apt-get install -y docker-registry skopeo apache2-utils";

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Uncompressed OCI layer media type (what [`build_image`] writes).
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Annotation that names a tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

const POLL_INTERVAL: Duration = Duration::from_millis(50);
const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(10);
const REGISTRY_READY_ATTEMPTS: u32 = 200;
const REGISTRY_START_ATTEMPTS: u32 = 3;
const FERRY_READY_TIMEOUT: Duration = Duration::from_secs(20);
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for any single skopeo invocation (passed as `--command-timeout`).
const SKOPEO_TIMEOUT: &str = "600s";
/// Chunk size for streaming layer content to disk.
const CHUNK: usize = 1 << 20;
/// Lines of a process log replayed on stderr when a test panics while it is alive.
const LOG_TAIL_LINES: usize = 200;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Returns the path of `name` on `PATH`, or panics loudly with install instructions.
///
/// End-to-end tests never skip silently: a missing tool is a failed test.
pub fn require_tool(name: &str) -> PathBuf {
    let found = env::var_os("PATH")
        .and_then(|paths| env::split_paths(&paths).map(|dir| dir.join(name)).find(|path| is_executable(path)));
    found.unwrap_or_else(|| {
        panic!(
            "\n\n======== MISSING TOOL: `{name}` ========\n\
             Ferry's end-to-end tests need the real `{name}` binary on PATH and never skip.\n\
             Install the tools with:\n\n    {INSTALL_HINT}\n\n"
        )
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback TCP port that was free a moment ago (bind `127.0.0.1:0`, read it, drop it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A fresh temporary directory, removed when the returned guard is dropped.
pub fn tmp_dir() -> TempDir {
    tempfile::Builder::new().prefix("ferry-e2e-").tempdir().expect("create temporary directory")
}

/// `"sha256:<hex>"` of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `"sha256:<hex>"` of a file's contents, streamed.
pub fn sha256_file(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Hex part of a `sha256:<hex>` digest (panics on any other algorithm).
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest:?}"))
}

/// `Basic ...` value for an `Authorization` header.
pub fn basic_auth(user: &str, pass: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}");
    let mut out = String::from("Basic ");
    for chunk in input.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) so log matching ignores colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A complete HTTP response (body fully buffered: not for huge blobs).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as sent by the server; look them up with [`HttpResponse::header`].
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if the server used chunked transfer encoding.
    pub body: Vec<u8>,
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
}

/// Sends one request to an `http://host:port/path` URL with `Connection: close` and reads the
/// whole response. Connect, read and write are each bounded by timeouts.
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
    send_request(method, url, headers, None, timeout)
}

/// [`http_request`] with a request body. `Content-Length` is added from `body` unless
/// `headers` already has one (tests of bad input may send a lying length).
pub fn http_request_body(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<HttpResponse> {
    send_request(method, url, headers, Some(body), HTTP_TIMEOUT)
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), optionally with a body.
fn send_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let rest = url.strip_prefix("http://").ok_or_else(|| invalid(format!("only http:// URLs are supported: {url}")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority.to_socket_addrs()?.next().ok_or_else(|| invalid(format!("cannot resolve {authority}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         User-Agent: ferry-e2e-harness\r\n"
    );
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    if let Some(body) = body {
        if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
        }
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    // A server may answer (e.g. 413) and close before reading the whole body: keep the answer.
    let sent = body.map_or(Ok(()), |b| stream.write_all(b));

    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Only after sending a body may a read error follow a complete answer (the server
        // closed early); otherwise it is the caller's to see (a timeout, a reset).
        Err(e) if body.is_some() && !raw.is_empty() => drop(e),
        Err(e) => return Err(sent.err().unwrap_or(e)),
    }
    parse_response(&raw, method.eq_ignore_ascii_case("HEAD"))
}

fn parse_response(raw: &[u8], head: bool) -> io::Result<HttpResponse> {
    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("incomplete HTTP response head"))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("malformed status line"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut response = HttpResponse { status, headers, body: Vec::new() };
    let body = &raw[end + 4..];
    if head {
        return Ok(response);
    }
    let chunked = response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        dechunk(body).ok_or_else(|| bad("malformed chunked body"))?
    } else if let Some(len) = response.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.get(..len).ok_or_else(|| bad("body shorter than Content-Length"))?.to_vec()
    } else {
        body.to_vec()
    };
    Ok(response)
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size_hex = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Registry (CNCF Distribution 2.8, `docker-registry serve`)
// ---------------------------------------------------------------------------------------------

/// Options for [`Registry::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Require HTTP basic auth for this single `(user, password)` (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
}

/// One line of the registry's access log (Apache combined format), e.g.
/// `127.0.0.1 - - [23/Nov/2026:17:41:14 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
/// (The user field is always `-`, even with htpasswd auth, so it is not kept.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Request target as sent, including any query string.
    pub path: String,
    pub status: u16,
    /// Response body bytes written (`-` in the log is reported as 0).
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses a combined-format line; returns `None` for anything else (e.g. logrus lines).
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let (method, path, proto) = (req.next()?, req.next()?, req.next()?);
        if !proto.starts_with("HTTP/") || req.next().is_some() {
            return None;
        }
        let mut fields = rest.split_whitespace();
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().unwrap_or(0);
        let user_agent = rest
            .trim_end()
            .strip_suffix('"')
            .and_then(|r| r.rsplit_once('"'))
            .map(|(_, ua)| ua.to_string())
            .unwrap_or_default();
        Some(Self { method: method.to_string(), path: path.to_string(), status, bytes, user_agent })
    }
}

/// A real `docker-registry` on `127.0.0.1:PORT` with its own storage in a temp dir.
///
/// Its stdout (access log) and stderr (logrus) go to one log file; the harness's own
/// readiness probes show up there as `GET /v2/` lines.
pub struct Registry {
    opts: RegistryOpts,
    /// `auth: token` settings (see [`Registry::start_with_token`]).
    token: Option<token::TokenAuth>,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Registry {
    /// Starts an anonymous registry and waits until `GET /v2/` answers.
    pub fn start() -> Self {
        Self::start_with(RegistryOpts::default())
    }

    /// Starts a registry with `opts` and waits until `GET /v2/` answers (200 or 401).
    pub fn start_with(opts: RegistryOpts) -> Self {
        Self::start_impl(opts, None)
    }

    /// Starts a registry with `auth: token` trusting `auth` (from [`token::TokenServer::auth`]):
    /// clients get `401` with `WWW-Authenticate: Bearer realm=...,service=...,scope=...` and
    /// must present a token from that server. Start the token server first and keep it alive.
    pub fn start_with_token(auth: token::TokenAuth) -> Self {
        Self::start_impl(RegistryOpts::default(), Some(auth))
    }

    fn start_impl(opts: RegistryOpts, token: Option<token::TokenAuth>) -> Self {
        require_tool("docker-registry");
        assert!(opts.htpasswd.is_none() || token.is_none(), "a registry has one auth method: htpasswd or token");
        let dir = tmp_dir();
        if let Some((user, pass)) = &opts.htpasswd {
            require_tool("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .stdin(Stdio::null())
                .output()
                .expect("run htpasswd");
            assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            fs::write(dir.path().join("htpasswd"), &out.stdout).expect("write htpasswd file");
        }
        let mut registry = Self { opts, token, dir, port: 0, child: None };
        // The port is only reserved until `free_port` returns: retry if someone grabs it.
        let mut last_error = String::new();
        for _ in 0..REGISTRY_START_ATTEMPTS {
            registry.port = free_port();
            registry.write_config();
            match registry.spawn_and_wait() {
                Ok(()) => return registry,
                Err(e) if e.contains("address already in use") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("docker-registry could not get a free port: {last_error}")
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the running registry process (panics if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("registry is stopped").id()
    }

    /// The `auth: token` settings the registry was started with, if any.
    pub fn token_auth(&self) -> Option<&token::TokenAuth> {
        self.token.as_ref()
    }

    /// The `(user, password)` the registry requires, if any.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.opts.htpasswd.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Root of the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// File receiving the registry's stdout and stderr (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Everything the registry has logged so far.
    pub fn log_text(&self) -> String {
        fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// All access-log entries so far, in order (across restarts).
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        self.log_text().lines().filter_map(AccessLogEntry::parse).collect()
    }

    /// Number of access-log entries with exactly `method` whose path contains `path_contains`.
    ///
    /// The log line is written before the response is flushed, so a request whose response
    /// the client has fully received is always counted.
    pub fn count_requests(&self, method: &str, path_contains: &str) -> usize {
        self.requests().iter().filter(|e| e.method == method && e.path.contains(path_contains)).count()
    }

    /// Whether the child is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the registry (SIGKILL to its own PID) and reaps it. Storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the registry and starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("registry restart failed: {e}");
        }
    }

    fn write_config(&self) {
        let quote = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).expect("quote path");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: ferry-e2e-not-secret\n",
            storage = quote(self.storage_dir()),
            port = self.port,
        );
        if self.opts.htpasswd.is_some() {
            let _ = write!(
                config,
                "auth:\n  htpasswd:\n    realm: ferry-e2e\n    path: {}\n",
                quote(self.dir.path().join("htpasswd"))
            );
        }
        if let Some(token) = &self.token {
            let text = |s: &str| serde_json::to_string(s).expect("quote string");
            let _ = write!(
                config,
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                text(&token.realm),
                text(&token.service),
                text(&token.issuer),
                quote(token.rootcertbundle.clone())
            );
        }
        fs::write(self.dir.path().join("config.yml"), config).expect("write registry config");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open registry log");
        let log_err = log.try_clone().expect("clone registry log handle");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn docker-registry: {e} (install: {INSTALL_HINT})"));
        self.child = Some(child);
        let result = self.wait_ready();
        if result.is_err() {
            self.stop();
        }
        result
    }

    /// Polls `GET /v2/` (bounded in attempts and time) until it answers 200 or 401.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + REGISTRY_READY_TIMEOUT;
        let probe_url = format!("{}/v2/", self.url());
        let mut last = String::from("no probe made");
        for _ in 0..REGISTRY_READY_ATTEMPTS {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("docker-registry exited early ({status}); log:\n{}", self.log_text()));
            }
            match http_request_timeout("GET", &probe_url, &[], Duration::from_secs(1)) {
                Ok(r) if r.status == 200 || r.status == 401 => return Ok(()),
                Ok(r) => last = format!("HTTP {}", r.status),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(POLL_INTERVAL);
        }
        Err(format!(
            "docker-registry on {} not ready within {REGISTRY_READY_TIMEOUT:?} (last probe: {last}); log:\n{}",
            self.host(),
            self.log_text()
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- docker-registry {} log (last {LOG_TAIL_LINES} lines) ----\n{}\n---- end ----",
                self.host(),
                tail(&self.log_text(), LOG_TAIL_LINES)
            );
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// OCI image generation
// ---------------------------------------------------------------------------------------------

/// `SplitMix64`: a tiny seedable PRNG; its output is incompressible enough for test layers.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Derives an independent seed for sub-object `n` of something seeded with `seed`.
fn derive_seed(seed: u64, n: u64) -> u64 {
    SplitMix64::new(seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// An image written by [`build_image`] (all blobs live in the layout's `blobs/sha256/`).
#[derive(Clone)]
pub struct Image {
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    /// `(digest, size in bytes)` of each layer blob, bottom first.
    pub layers: Vec<(String, u64)>,
    /// `(os, architecture)`.
    pub platform: (String, String),
}

impl Image {
    /// Config digest followed by the layer digests: every blob a pull must fetch.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(self.config_digest.clone()).chain(self.layers.iter().map(|(d, _)| d.clone())).collect()
    }

    /// OCI descriptor of the manifest (as used in an index or `index.json`).
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_bytes.len(),
        })
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("manifest_digest", &self.manifest_digest)
            .field("manifest", &String::from_utf8_lossy(&self.manifest_bytes))
            .field("config_digest", &self.config_digest)
            .field("config", &String::from_utf8_lossy(&self.config_bytes))
            .field("layers", &self.layers)
            .field("platform", &self.platform)
            .finish()
    }
}

/// A multi-platform index written by [`build_index`].
#[derive(Clone)]
pub struct Index {
    pub index_digest: String,
    pub index_bytes: Vec<u8>,
    /// One image per requested platform, in the same order.
    pub images: Vec<Image>,
}

impl Index {
    /// Every blob digest of every platform image (config and layers).
    pub fn blob_digests(&self) -> Vec<String> {
        self.images.iter().flat_map(Image::blob_digests).collect()
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("index_digest", &self.index_digest)
            .field("index", &String::from_utf8_lossy(&self.index_bytes))
            .field("images", &self.images)
            .finish()
    }
}

/// Path of blob `digest` inside OCI layout `layout`.
pub fn blob_path(layout: impl AsRef<Path>, digest: &str) -> PathBuf {
    layout.as_ref().join("blobs/sha256").join(digest_hex(digest))
}

/// Builds a single-arch linux/amd64 image in OCI layout `layout` (created if needed) and tags
/// it `tag` in the layout's `index.json` (other tags are kept; the same tag is replaced).
///
/// Each layer is an uncompressed tar holding one regular file of `layer_sizes[i]` random bytes,
/// so each layer blob is that size rounded up to 512 plus 1536 bytes (header and two zero
/// blocks); the actual blob sizes are in [`Image::layers`]. The output is a pure function of
/// `(layer_sizes, seed)`. Content is streamed and hashed while written: sizes of hundreds of
/// MiB are fine.
pub fn build_image(layout: impl AsRef<Path>, tag: &str, layer_sizes: &[u64], seed: u64) -> Image {
    let layout = layout.as_ref();
    let layers = write_layers(layout, layer_sizes, seed);
    let image = write_image(layout, &layers, ("linux", "amd64"), seed);
    tag_in_layout(layout, tag, image.descriptor());
    image
}

/// Like [`build_image`] but from layers already written with [`write_layer`], so that
/// several images can share layers.
pub fn build_image_with_layers(layout: impl AsRef<Path>, tag: &str, layers: &[(String, u64)], seed: u64) -> Image {
    let layout = layout.as_ref();
    let image = write_image(layout, layers, ("linux", "amd64"), seed);
    tag_in_layout(layout, tag, image.descriptor());
    image
}

/// Builds an OCI index over one image per `(os, architecture)` in `platforms`, each with two
/// small layers (1 KiB and 16 KiB of content), and tags the index `tag`.
pub fn build_index(layout: impl AsRef<Path>, tag: &str, platforms: &[(&str, &str)], seed: u64) -> Index {
    build_index_sized(layout, tag, platforms, &[1024, 16 * 1024], seed)
}

/// [`build_index`] with explicit layer content sizes for every platform image. Platform
/// images get distinct seeds, so they share no blobs.
pub fn build_index_sized(
    layout: impl AsRef<Path>,
    tag: &str,
    platforms: &[(&str, &str)],
    layer_sizes: &[u64],
    seed: u64,
) -> Index {
    let layout = layout.as_ref();
    let images: Vec<Image> = platforms
        .iter()
        .zip(1..)
        .map(|(&platform, n)| {
            let image_seed = derive_seed(seed, n);
            let layers = write_layers(layout, layer_sizes, image_seed);
            write_image(layout, &layers, platform, image_seed)
        })
        .collect();
    let manifests: Vec<Value> = images
        .iter()
        .map(|img| {
            let mut d = img.descriptor();
            d["platform"] = json!({"os": img.platform.0, "architecture": img.platform.1});
            d
        })
        .collect();
    let index_bytes = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }));
    let (index_digest, _) = write_blob(layout, &index_bytes);
    tag_in_layout(layout, tag, json!({"mediaType": OCI_INDEX, "digest": index_digest, "size": index_bytes.len()}));
    Index { index_digest, index_bytes, images }
}

/// Writes one layer blob (a tar with one file of `content_size` random bytes derived from
/// `seed`) into `layout` and returns its `(digest, blob size)`.
pub fn write_layer(layout: impl AsRef<Path>, content_size: u64, seed: u64) -> (String, u64) {
    let layout = layout.as_ref();
    let mut blob = BlobWriter::new(layout);
    let name = format!("ferry-e2e/{seed:016x}.bin");
    blob.write(&ustar_header(&name, content_size));
    let mut rng = SplitMix64::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut remaining = content_size;
    while remaining > 0 {
        let n = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
        rng.fill(&mut buf[..n]);
        blob.write(&buf[..n]);
        remaining -= n as u64;
    }
    let padding = (512 - (content_size % 512) as usize) % 512;
    blob.write(&vec![0u8; padding + 1024]);
    blob.finish()
}

fn write_layers(layout: &Path, layer_sizes: &[u64], seed: u64) -> Vec<(String, u64)> {
    layer_sizes.iter().zip(1..).map(|(&size, n)| write_layer(layout, size, derive_seed(seed, n))).collect()
}

/// Writes config and manifest blobs for `layers` (the layout marker too) and returns the image.
fn write_image(layout: &Path, layers: &[(String, u64)], (os, arch): (&str, &str), seed: u64) -> Image {
    let diff_ids: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let history: Vec<Value> =
        layers.iter().map(|_| json!({"created": "2024-01-01T00:00:00Z", "created_by": "ferry-e2e harness"})).collect();
    let config_bytes = to_json(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.example.ferry-e2e.seed": seed.to_string()},
        },
        // Layers are uncompressed, so each diff_id equals the layer digest.
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }));
    let (config_digest, config_size) = write_blob(layout, &config_bytes);
    let layer_descriptors: Vec<Value> =
        layers.iter().map(|(d, s)| json!({"mediaType": OCI_LAYER_TAR, "digest": d, "size": s})).collect();
    let manifest_bytes = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descriptors,
    }));
    let (manifest_digest, _) = write_blob(layout, &manifest_bytes);
    Image {
        manifest_digest,
        manifest_bytes,
        config_digest,
        config_bytes,
        layers: layers.to_vec(),
        platform: (os.to_string(), arch.to_string()),
    }
}

/// Points `tag` at `descriptor` in `layout/index.json`, replacing any entry with that tag.
fn tag_in_layout(layout: &Path, tag: &str, mut descriptor: Value) {
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write oci-layout");
    let index_path = layout.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(bytes) => {
            let index: Value = serde_json::from_slice(&bytes).expect("parse layout index.json");
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", index_path.display()),
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != tag);
    descriptor["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    manifests.push(descriptor);
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    fs::write(&index_path, to_json(&index)).expect("write layout index.json");
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialize JSON")
}

/// Writes `bytes` as a blob in `layout`; returns `(digest, size)`.
fn write_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let mut blob = BlobWriter::new(layout);
    blob.write(bytes);
    blob.finish()
}

/// Streams a blob into a temporary file next to its final place, hashing as it goes.
struct BlobWriter {
    file: BufWriter<File>,
    tmp_path: PathBuf,
    blobs_dir: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    fn new(layout: &Path) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let blobs_dir = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs_dir).unwrap_or_else(|e| panic!("create {}: {e}", blobs_dir.display()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = blobs_dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let file = File::create(&tmp_path).unwrap_or_else(|e| panic!("create {}: {e}", tmp_path.display()));
        Self { file: BufWriter::with_capacity(CHUNK, file), tmp_path, blobs_dir, hasher: Sha256::new(), size: 0 }
    }

    fn write(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.write_all(data).unwrap_or_else(|e| panic!("write {}: {e}", self.tmp_path.display()));
    }

    fn finish(self) -> (String, u64) {
        let file = self.file.into_inner().expect("flush blob");
        drop(file);
        let hex = hex::encode(self.hasher.finalize());
        let dest = self.blobs_dir.join(&hex);
        fs::rename(&self.tmp_path, &dest).unwrap_or_else(|e| panic!("rename blob to {}: {e}", dest.display()));
        (format!("sha256:{hex}"), self.size)
    }
}

/// A POSIX ustar header for a regular file `name` (< 100 bytes) of `size` bytes.
fn ustar_header(name: &str, size: u64) -> [u8; 512] {
    const MTIME: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z, like the image config
    assert!(name.len() < 100, "tar member name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644); // mode
    put_octal(&mut h[108..116], 0); // uid
    put_octal(&mut h[116..124], 0); // gid
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], MTIME);
    h[148..156].fill(b' '); // checksum is computed with this field as spaces
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Zero-padded octal digits filling all but the last byte of `field`, then NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    assert_eq!(text.len(), digits, "{value} does not fit a {digits}-digit tar field");
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// `(user, password)` for registry basic auth.
pub type Creds<'a> = (&'a str, &'a str);

/// Runs `skopeo ARGS...` hermetically and returns its output, whatever the exit status.
///
/// Global flags come first: `--policy` (accept anything), `--registries-conf` (no search
/// registries, no mirrors), `--registries.d` (empty), `--tmpdir`, `--command-timeout`. `HOME`
/// and the `XDG_*` directories point at a per-call temp dir so no user auth file or config is
/// read. `args` may start with further global flags (e.g. `--override-arch`).
pub fn skopeo(args: &[&str]) -> Output {
    require_tool("skopeo");
    let scratch = tmp_dir();
    let root = scratch.path();
    let policy = root.join("policy.json");
    let registries_conf = root.join("registries.conf");
    let registries_d = root.join("registries.d");
    let tmp = root.join("tmp");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("write skopeo policy");
    fs::write(&registries_conf, "unqualified-search-registries = []\n").expect("write registries.conf");
    fs::create_dir_all(&registries_d).expect("create registries.d");
    fs::create_dir_all(&tmp).expect("create skopeo tmpdir");
    Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .arg("--registries-conf")
        .arg(&registries_conf)
        .arg("--registries.d")
        .arg(&registries_d)
        .arg("--tmpdir")
        .arg(&tmp)
        .args(["--command-timeout", SKOPEO_TIMEOUT])
        .args(args)
        .env("HOME", root)
        .env("XDG_CONFIG_HOME", root.join("config"))
        .env("XDG_DATA_HOME", root.join("data"))
        .env("XDG_RUNTIME_DIR", root.join("run"))
        .env("TMPDIR", &tmp)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("CONTAINERS_REGISTRIES_CONF")
        .env_remove("CONTAINERS_CONF")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn skopeo: {e} (install: {INSTALL_HINT})"))
}

/// Runs [`skopeo`] and returns stdout on success, or an error with the full stderr.
pub fn skopeo_ok(args: &[&str]) -> Result<String, String> {
    let out = skopeo(args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(skopeo_failure(args, &out))
    }
}

fn skopeo_failure(args: &[&str], out: &Output) -> String {
    format!(
        "skopeo {} failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// `docker://` reference for `127.0.0.1:PORT/repo:tag` (kept as is if it has a transport).
pub fn docker_ref(reference: &str) -> String {
    if reference.contains("://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

fn creds_arg(creds: Option<Creds<'_>>) -> Option<String> {
    creds.map(|(user, pass)| format!("{user}:{pass}"))
}

/// Pushes `tag` of OCI layout `layout` to `dest` (`127.0.0.1:PORT/repo:tag`), keeping digests.
/// With `all`, a multi-arch index is pushed whole (`--all`).
pub fn push_layout(layout: impl AsRef<Path>, tag: &str, dest: &str, all: bool) -> Result<String, String> {
    push_layout_impl(layout.as_ref(), tag, dest, all, None)
}

/// [`push_layout`] with `--dest-creds`.
pub fn push_layout_creds(
    layout: impl AsRef<Path>,
    tag: &str,
    dest: &str,
    all: bool,
    creds: Creds<'_>,
) -> Result<String, String> {
    push_layout_impl(layout.as_ref(), tag, dest, all, Some(creds))
}

fn push_layout_impl(
    layout: &Path,
    tag: &str,
    dest: &str,
    all: bool,
    creds: Option<Creds<'_>>,
) -> Result<String, String> {
    let src = format!("oci:{}:{tag}", layout.display());
    let dest = docker_ref(dest);
    let creds = creds_arg(creds);
    let mut args = vec!["copy", "--preserve-digests", "--dest-tls-verify=false"];
    if all {
        args.push("--all");
    }
    if let Some(c) = &creds {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(&args)
}

/// Copies `src` (`127.0.0.1:PORT/repo:tag` or `@sha256:...`) with `--all` into `dir:dest_dir`:
/// `dest_dir/manifest.json` holds the top manifest (or index) bytes and every blob is stored as
/// `dest_dir/<hex>`; for an index each instance manifest is `dest_dir/<hex>.manifest.json`.
pub fn pull_to_dir(src: &str, dest_dir: impl AsRef<Path>) -> Result<String, String> {
    pull_impl(src, &dir_ref(dest_dir.as_ref()), &[], None)
}

/// [`pull_to_dir`] with `--src-creds`.
pub fn pull_to_dir_creds(src: &str, dest_dir: impl AsRef<Path>, creds: Creds<'_>) -> Result<String, String> {
    pull_impl(src, &dir_ref(dest_dir.as_ref()), &[], Some(creds))
}

/// Pulls only the `(os, arch)` image of `src` (as `docker pull` would) into `dir:dest_dir`.
pub fn pull_platform_to_dir(src: &str, dest_dir: impl AsRef<Path>, platform: (&str, &str)) -> Result<String, String> {
    pull_platform_impl(src, dest_dir.as_ref(), platform, None)
}

/// [`pull_platform_to_dir`] with `--src-creds`.
pub fn pull_platform_to_dir_creds(
    src: &str,
    dest_dir: impl AsRef<Path>,
    platform: (&str, &str),
    creds: Creds<'_>,
) -> Result<String, String> {
    pull_platform_impl(src, dest_dir.as_ref(), platform, Some(creds))
}

fn pull_platform_impl(
    src: &str,
    dest_dir: &Path,
    (os, arch): (&str, &str),
    creds: Option<Creds<'_>>,
) -> Result<String, String> {
    let dest = dir_ref(dest_dir);
    let src = docker_ref(src);
    let creds = creds_arg(creds);
    // --override-* are global flags, so they go before the subcommand.
    let mut args =
        vec!["--override-os", os, "--override-arch", arch, "copy", "--preserve-digests", "--src-tls-verify=false"];
    if let Some(c) = &creds {
        args.extend(["--src-creds", c]);
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(&args)
}

/// Copies `src` with `--all` into OCI layout `layout` as `tag`, keeping layers uncompressed.
pub fn pull_to_oci(src: &str, layout: impl AsRef<Path>, tag: &str) -> Result<String, String> {
    let dest = format!("oci:{}:{tag}", layout.as_ref().display());
    pull_impl(src, &dest, &["--dest-oci-accept-uncompressed-layers"], None)
}

/// [`pull_to_oci`] with `--src-creds`.
pub fn pull_to_oci_creds(src: &str, layout: impl AsRef<Path>, tag: &str, creds: Creds<'_>) -> Result<String, String> {
    let dest = format!("oci:{}:{tag}", layout.as_ref().display());
    pull_impl(src, &dest, &["--dest-oci-accept-uncompressed-layers"], Some(creds))
}

fn dir_ref(dir: &Path) -> String {
    format!("dir:{}", dir.display())
}

fn pull_impl(src: &str, dest: &str, extra: &[&str], creds: Option<Creds<'_>>) -> Result<String, String> {
    let src = docker_ref(src);
    let creds = creds_arg(creds);
    let mut args = vec!["copy", "--all", "--preserve-digests", "--src-tls-verify=false"];
    args.extend_from_slice(extra);
    if let Some(c) = &creds {
        args.extend(["--src-creds", c]);
    }
    args.extend([src.as_str(), dest]);
    skopeo_ok(&args)
}

/// The exact manifest (or index) bytes the registry serves for `reference`.
pub fn inspect_raw(reference: &str) -> Result<Vec<u8>, String> {
    inspect_raw_impl(reference, None)
}

/// [`inspect_raw`] with `--creds`.
pub fn inspect_raw_creds(reference: &str, creds: Creds<'_>) -> Result<Vec<u8>, String> {
    inspect_raw_impl(reference, Some(creds))
}

fn inspect_raw_impl(reference: &str, creds: Option<Creds<'_>>) -> Result<Vec<u8>, String> {
    let reference = docker_ref(reference);
    let creds = creds_arg(creds);
    let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
    if let Some(c) = &creds {
        args.extend(["--creds", c]);
    }
    args.push(&reference);
    let out = skopeo(&args);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(skopeo_failure(&args, &out))
    }
}

/// Tags of repository `repo` (`127.0.0.1:PORT/repo`), as listed by the registry.
pub fn list_tags(repo: &str) -> Result<Vec<String>, String> {
    let repo = docker_ref(repo);
    let out = skopeo_ok(&["list-tags", "--tls-verify=false", &repo])?;
    let parsed: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    Ok(parsed["Tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_string)).collect())
}

// ---------------------------------------------------------------------------------------------
// Ferry (the binary under test)
// ---------------------------------------------------------------------------------------------

/// Path of the `ferry` binary Cargo built for this test run.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Process output shared between reader threads and the test, with change notification.
#[derive(Default)]
struct LogBuffer {
    text: Mutex<String>,
    changed: Condvar,
}

impl LogBuffer {
    fn push_line(&self, line: &str) {
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        text.push_str(line);
        text.push('\n');
        self.changed.notify_all();
    }

    fn snapshot(&self) -> String {
        self.text.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

enum ReaderEvent {
    Listening(String),
    Eof,
}

/// A running `ferry serve --config PATH`, with stdout and stderr captured line by line.
///
/// Set `FERRY_E2E_ECHO=1` to also echo Ferry's output live to the test's stderr.
pub struct Ferry {
    child: Option<Child>,
    host: String,
    envs: Vec<(String, String)>,
    log: Arc<LogBuffer>,
    dir: TempDir,
}

impl Ferry {
    /// Writes `config_yaml` to a temp file, starts Ferry with it and waits (at most 20 s)
    /// for `listening on http://127.0.0.1:PORT`. Panics with the captured output on failure.
    /// The config should say `listen: "127.0.0.1:0"`; use [`tmp_dir`] for `storage.root`.
    pub fn start(config_yaml: &str) -> Self {
        Self::start_with_env(config_yaml, &[])
    }

    /// [`Ferry::start`] with extra environment variables (e.g. `("RUST_LOG", "debug")`).
    pub fn start_with_env(config_yaml: &str, envs: &[(&str, &str)]) -> Self {
        Self::try_start_with_env(config_yaml, envs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Ferry::start`], but returns the exit status and output as an error if Ferry
    /// exits (or stays silent) instead of listening: for testing rejected configs.
    pub fn try_start(config_yaml: &str) -> Result<Self, String> {
        Self::try_start_with_env(config_yaml, &[])
    }

    /// [`Ferry::try_start`] with extra environment variables.
    pub fn try_start_with_env(config_yaml: &str, envs: &[(&str, &str)]) -> Result<Self, String> {
        let dir = tmp_dir();
        fs::write(dir.path().join("ferry.yaml"), config_yaml).expect("write ferry config");
        let mut ferry = Self {
            child: None,
            host: String::new(),
            envs: envs.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect(),
            log: Arc::new(LogBuffer::default()),
            dir,
        };
        ferry.spawn()?;
        Ok(ferry)
    }

    /// Stops Ferry if it is running (SIGTERM, bounded) and starts it again with the same
    /// config file and environment; the port may change. The output log is kept and
    /// continues after a `---- ferry restarted ----` line.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.log.push_line("---- ferry restarted ----");
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// Spawns the process, wires its output into the log and waits for the listening line.
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(ferry_bin())
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("NO_COLOR", "1")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", ferry_bin()));

        let (tx, rx) = mpsc::channel();
        let echo = env::var_os("FERRY_E2E_ECHO").is_some_and(|v| v == "1");
        spawn_reader(child.stdout.take().map(ReaderStream::Out), &self.log, &tx, echo);
        spawn_reader(child.stderr.take().map(ReaderStream::Err), &self.log, &tx, echo);
        drop(tx);

        let deadline = Instant::now() + FERRY_READY_TIMEOUT;
        let mut eofs = 0;
        let failure = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(ReaderEvent::Listening(host)) => {
                    self.host = host;
                    self.child = Some(child);
                    return Ok(());
                }
                Ok(ReaderEvent::Eof) => {
                    eofs += 1;
                    if eofs == 2 {
                        // Both pipes closed: the process is exiting; reap it.
                        let status = wait_bounded(child, Duration::from_secs(5)).map_or_else(|e| e, |s| s.to_string());
                        break format!("ferry exited before listening ({status})");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break format!(
                        "ferry did not print `listening on http://...` within \
                         {FERRY_READY_TIMEOUT:?}; killed it"
                    );
                }
            }
        };
        Err(format!("{failure}\n---- ferry output ----\n{}---- end ----", self.log.snapshot()))
    }

    /// `127.0.0.1:PORT` Ferry listens on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// PID of the Ferry process (panics once it has been stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ferry is stopped").id()
    }

    /// The config file Ferry was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ferry.yaml")
    }

    /// Everything Ferry printed so far (stdout and stderr interleaved, ANSI stripped).
    pub fn log_text(&self) -> String {
        self.log.snapshot()
    }

    /// Waits (bounded by `timeout`) until Ferry's output contains `needle`; returns whether
    /// it did. Wakes on every new line rather than polling.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut text = self.log.text.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if text.contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            text = self.log.changed.wait_timeout(text, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (via its own child handle) and reap; returns the exit status.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("ferry already stopped");
        let _ = child.kill();
        child.wait().expect("wait for ferry")
    }

    /// Sends SIGTERM (`kill -TERM PID`) and waits up to 15 s for Ferry to exit; returns its
    /// exit status. If it does not exit in time it gets SIGKILL and the test panics.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(TERMINATE_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "ferry did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM (killed it); \
                     output:\n{}",
                self.log_text()
            )
        })
    }

    /// Sends SIGTERM and waits up to `timeout`; `None` (after a SIGKILL) if it did not exit.
    pub fn terminate_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("ferry already stopped");
        let pid = child.id();
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).stdin(Stdio::null()).status();
        if !sent.as_ref().is_ok_and(ExitStatus::success) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kill -TERM {pid} failed: {sent:?}");
        }
        wait_bounded(child, timeout).ok()
    }
}

/// Waits for `child` for at most `timeout` on a helper thread (no polling). On timeout the
/// child is sent SIGKILL by PID, which cannot have been reused because the waiter has not
/// reaped it yet, and an error is returned.
fn wait_bounded(mut child: Child, timeout: Duration) -> Result<ExitStatus, String> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(format!("waiting for PID {pid} failed: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stdin(Stdio::null()).status();
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(format!("PID {pid} did not exit within {timeout:?}; sent SIGKILL"))
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- ferry {} output (last {LOG_TAIL_LINES} lines) ----\n{}\n---- end ----",
                self.host,
                tail(&self.log_text(), LOG_TAIL_LINES)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

enum ReaderStream {
    Out(ChildStdout),
    Err(ChildStderr),
}

/// Forwards every line of `stream` into `log` and reports the listening address and EOF.
fn spawn_reader(stream: Option<ReaderStream>, log: &Arc<LogBuffer>, tx: &mpsc::Sender<ReaderEvent>, echo: bool) {
    let (log, tx) = (Arc::clone(log), tx.clone());
    let Some(stream) = stream else {
        let _ = tx.send(ReaderEvent::Eof);
        return;
    };
    thread::spawn(move || {
        let reader: Box<dyn Read + Send> = match stream {
            ReaderStream::Out(s) => Box::new(s),
            ReaderStream::Err(s) => Box::new(s),
        };
        let mut reader = BufReader::new(reader);
        let mut raw = Vec::new();
        let mut announced = false;
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']));
            if echo {
                eprintln!("[ferry] {line}");
            }
            log.push_line(&line);
            if !announced {
                if let Some(host) = listening_host(&line) {
                    announced = true;
                    let _ = tx.send(ReaderEvent::Listening(host));
                }
            }
        }
        let _ = tx.send(ReaderEvent::Eof);
    });
}

/// Extracts `HOST:PORT` from a line containing `listening on http://HOST:PORT` (or `https://`,
/// when the test configured TLS and builds its own `https://` URLs from [`Ferry::host`]).
fn listening_host(line: &str) -> Option<String> {
    let (i, marker) =
        ["listening on http://", "listening on https://"].into_iter().find_map(|m| line.find(m).map(|i| (i, m)))?;
    let start = i + marker.len();
    let host: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    let (_, port) = host.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|&p| p != 0)?;
    Some(host)
}

// ---------------------------------------------------------------------------------------------
// Ferry configuration for tests
// ---------------------------------------------------------------------------------------------

/// One upstream entry of a test config: a URL plus extra `key: value` lines for that entry.
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    url: String,
    opts: Vec<String>,
}

/// An upstream entry for [`ferry_yaml`].
pub fn upstream(url: impl Into<String>) -> UpstreamSpec {
    UpstreamSpec { url: url.into(), opts: Vec::new() }
}

impl UpstreamSpec {
    /// Adds one `key: value` line (e.g. `"first_byte_timeout: 1s"`) to this entry.
    pub fn opt(mut self, line: &str) -> Self {
        self.opts.push(line.to_string());
        self
    }
}

/// A Ferry config listening on a free loopback port, storing under `storage`, mirroring each
/// `(registry, upstreams)` in order; `extra` is appended as top-level YAML (e.g. `cache:` keys).
/// The first registry is the default one.
pub fn ferry_yaml(storage: &Path, registries: &[(&str, Vec<UpstreamSpec>)], extra: &str) -> String {
    let mut y = format!("listen: \"127.0.0.1:0\"\nstorage:\n  root: \"{}\"\nregistries:\n", storage.display());
    for (name, ups) in registries {
        let _ = writeln!(y, "  \"{name}\":\n    upstreams:");
        for u in ups {
            let _ = writeln!(y, "      - url: \"{}\"", u.url);
            for o in &u.opts {
                let _ = writeln!(y, "        {o}");
            }
        }
    }
    if let Some((first, _)) = registries.first() {
        let _ = writeln!(y, "default_registry: \"{first}\"");
    }
    y.push_str(extra);
    y
}

/// The value of one Prometheus sample from a `/metrics` page: `name{labels}` must match the
/// start of the line exactly as Ferry renders it (labels sorted by name). Absent: 0.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Ferry's `/metrics` page.
pub fn scrape(ferry: &Ferry) -> String {
    http_request("GET", &format!("{}/metrics", ferry.url()), &[]).expect("scrape /metrics").text()
}

/// Polls `f` until it holds, for at most 10 s, then panics naming `what`. For state Ferry
/// settles just after a response completes (a verified blob is committed to disk after the
/// client already has every byte); never a substitute for waiting on an event.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether blob `digest` is committed in the Ferry store under `root`.
pub fn cached_blob(root: &Path, digest: &str) -> bool {
    let hex = digest_hex(digest);
    root.join("blobs/sha256").join(&hex[..2]).join(hex).exists()
}

/// Waits until every one of `digests` is committed in the Ferry store under `root`.
pub fn wait_cached(root: &Path, digests: &[String]) {
    eventually("blobs committed to the cache", || digests.iter().all(|d| cached_blob(root, d)));
}

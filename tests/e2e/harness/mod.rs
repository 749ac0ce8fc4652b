//! End-to-end harness shared by every module of the `e2e` test binary, and by the e2e bench
//! (`benches/e2e.rs` includes it with `#[path = "../tests/e2e/harness/mod.rs"] mod harness;`).
//!
//! Plain blocking `std` code plus `sha2`, `hex`, `serde_json` and `tempfile`, one file per
//! concern, everything re-exported here except the three self-contained servers:
//!
//! * this file: [`require_tool`], [`free_port`], [`tmp_dir`], [`sha256_bytes`], [`sha256_file`],
//!   [`write_htpasswd`], [`eventually`], the OCI media types, and Ferry's [`metric`] /
//!   [`scrape`] / [`wait_cached`].
//! * `process.rs`: [`Proc`], a spawned server with its output in a log file, and the bounded
//!   waits [`wait_bounded`] / [`run_bounded`].
//! * `http.rs`: a small HTTP/1.1 client: one-shot [`http_request`] and friends, and a
//!   keep-alive [`Client`] that streams bodies.
//! * `registry.rs`: [`Registry`], a real CNCF Distribution (`docker-registry`) on a loopback
//!   port, with its access log parsed ([`Registry::requests`], [`Registry::count_requests`]).
//! * `images.rs`: [`build_image`] / [`build_index`]: OCI image layouts generated in-process from
//!   a seeded PRNG ([`SplitMix64`]).
//! * `clients.rs`: hermetic [`skopeo`] runs ([`push_layout`], [`pull_to_dir`], [`inspect_raw`],
//!   ...) and a private [`Containerd`] driven with `ctr`.
//! * `config.rs`: [`FerryConfig`], the typed builder for Ferry's YAML configuration.
//! * `ferry.rs`: [`Ferry`], the binary under test, started by a [`Launcher`].
//! * `s3.rs`: [`S3Server`], a real S3-compatible server (s3s-fs) whose buckets are directories.
//! * `redis.rs`: [`RedisServer`], Debian's redis-server on a loopback port, stoppable.
//! * [`fault`]: a fault-injecting reverse proxy; [`token`]: a Bearer-token issuer that a
//!   registry started with [`Registry::start_with_token`] trusts; [`encoding`]: base64, query
//!   strings, JWT segments, Bearer challenges.
//!
//! Waiting is never done with a bare `sleep`: readiness checks poll with bounded attempts and
//! a deadline, and everything else waits on channels or condition variables with timeouts.
//! Everything listens on and connects to loopback addresses only. Processes are only ever
//! signalled through the PID of a child the harness spawned (and has not reaped).
// Each includer (the e2e tests, the bench) uses a different part of the harness.
#![allow(dead_code)]

use std::env;
use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

mod clients;
mod config;
pub mod encoding;
pub mod fault;
mod ferry;
mod http;
mod images;
mod process;
mod redis;
mod registry;
mod s3;
pub mod token;

// Not every includer uses every part.
#[allow(unused_imports)]
pub use self::{
    clients::*, config::*, encoding::basic_auth, ferry::*, http::*, images::*, process::*, redis::*, registry::*, s3::*,
};

/// How to get the external tools the end-to-end tests rely on.
pub const INSTALL_HINT: &str = "apt-get install -y docker-registry skopeo apache2-utils containerd redis-server && cargo install s3s-fs@0.14.1 --features binary --locked && pip install 'moto[server]==5.2.1' (scripts/test.sh does all three)";

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

/// `(user, password)` for basic auth.
pub type Creds<'a> = (&'a str, &'a str);

/// Pause between two polls of a readiness check.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Chunk size for streaming files (hashing, writing layers).
const CHUNK: usize = 1 << 20;
/// Lines of a process log replayed on stderr when a test panics while it is alive.
const LOG_TAIL_LINES: usize = 200;
/// How long [`eventually`] polls.
const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Writes `dir/htpasswd` with a bcrypt entry per user (made by the real `htpasswd -B`) and
/// returns its path.
pub fn write_htpasswd(dir: &Path, users: &[Creds<'_>]) -> PathBuf {
    let htpasswd = require_tool("htpasswd");
    let mut text = Vec::new();
    for (user, pass) in users {
        let out = Command::new(&htpasswd)
            .args(["-Bbn", user, pass])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run htpasswd: {e} (install: {INSTALL_HINT})"));
        assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        text.extend_from_slice(String::from_utf8_lossy(&out.stdout).trim().as_bytes());
        text.push(b'\n');
    }
    let path = dir.join("htpasswd");
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Polls `f` until it holds, for at most 10 s, then panics naming `what`. For state Ferry
/// settles just after a response completes (a verified blob is committed to disk after the
/// client already has every byte); never a substitute for waiting on an event.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
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

/// Whether blob `digest` is committed in the store of the Ferry rooted at `root` (on disk, or
/// in the bucket of an `s3` run: see [`store_path`]).
pub fn cached_blob(root: &Path, digest: &str) -> bool {
    store_path(root, &blob_key(digest)).exists()
}

/// Whether blob `digest` is in the local blob directory under `root` (the hot tier of a
/// Ferry on S3), whatever the run.
pub fn local_blob(root: &Path, digest: &str) -> bool {
    root.join(blob_key(digest)).exists()
}

/// The layout key of blob `digest`: `blobs/sha256/<2 hex>/<64 hex>`.
pub fn blob_key(digest: &str) -> String {
    let hex = digest_hex(digest);
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

/// Waits until every one of `digests` is committed in the Ferry store under `root`.
pub fn wait_cached(root: &Path, digests: &[String]) {
    eventually("blobs committed to the cache", || digests.iter().all(|d| cached_blob(root, d)));
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

/// A canned server for misbehaviour a real registry will not show (a hostile challenge, a
/// body that is no manifest): on `addr` that answers every request with `status`, `headers` and `body`, and
/// records each request's head (request line and headers, lower-cased names).
pub fn recording_server(
    addr: &str,
    status: &'static str,
    headers: Vec<String>,
    body: &'static str,
) -> (String, RequestLog) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap().to_string();
    let log: RequestLog = Default::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_owned());
            }
            seen.lock().unwrap().push(head);
            let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (local, log)
}

pub type RequestLog = std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>;

pub fn authorization_sent(log: &RequestLog) -> Vec<Option<String>> {
    log.lock()
        .unwrap()
        .iter()
        .map(|head| head.iter().find_map(|h| h.to_ascii_lowercase().strip_prefix("authorization:").map(|_| h.clone())))
        .collect()
}

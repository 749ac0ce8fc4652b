//! Proves the fault proxy (`harness/fault.rs`) against a real `docker-registry`, without
//! Ferry: each fault is observed from the client side with the harness's HTTP client (or a raw
//! socket where the response is deliberately broken), and the proxy's request log is checked.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::fault::{Fault, FaultProxy, StaticServer};
use crate::harness::*;

const REPO: &str = "fault/proxy";
/// Content bytes of the big layer (the blob is this plus 1536 tar bytes).
const LAYER_CONTENT: u64 = 3 << 20;
const SHORT_TIMEOUT: Duration = Duration::from_millis(700);
const WAIT: Duration = Duration::from_secs(10);

/// A registry holding one pushed image with a ~3 MiB layer, and that layer's bytes.
struct Fixture {
    registry: Registry,
    image: Image,
    blob: Vec<u8>,
    _work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let registry = Registry::start();
        let work = tmp_dir();
        let layout = work.path().join("layout");
        let image = build_image(&layout, "v1", &[LAYER_CONTENT], 7);
        push_layout(&layout, "v1", &format!("{}/{REPO}:v1", registry.host()), false).expect("push image");
        let blob = fs::read(blob_path(&layout, &image.layers[0].0)).unwrap();
        assert!(blob.len() > 3 << 20);
        Self { registry, image, blob, _work: work }
    }

    fn digest(&self) -> &str {
        &self.image.layers[0].0
    }

    fn blob_path(&self) -> String {
        format!("/v2/{REPO}/blobs/{}", self.digest())
    }

    fn manifest_path(&self) -> String {
        format!("/v2/{REPO}/manifests/v1")
    }

    /// Blob GETs the real registry answered (with any status).
    fn registry_blob_gets(&self) -> usize {
        self.registry.count_requests("GET", &format!("/blobs/{}", self.digest()))
    }
}

/// What a raw client saw: the response head, the body bytes after it, and how reading ended.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// `true`: the server closed the connection; `false`: a read timed out (server silent).
    eof: bool,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }
}

/// Tells from the body received so far that the server should now go silent.
type QuietWhen<'a> = &'a dyn Fn(&[u8]) -> bool;

/// Sends a GET and reads until EOF. With `quiet_when`, once the head is in and `quiet_when(body
/// so far)` holds, the server is expected to go silent: reading then also ends when nothing
/// arrives for [`SHORT_TIMEOUT`]. (Before that, reads wait up to 30 s, so a slow machine only
/// slows the test down.) Bounded overall by 60 s and 512 MiB.
fn raw_get(host: &str, path: &str, headers: &[(&str, &str)], quiet_when: Option<QuietWhen<'_>>) -> Raw {
    let mut stream = TcpStream::connect(host).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut quiet = false;
    let eof = loop {
        assert!(Instant::now() < deadline && raw.len() < 512 << 20, "raw_get: response too long or too slow");
        if let (false, Some(pred), Some(end)) = (quiet, quiet_when, head_end(&raw)) {
            if pred(&raw[end + 4..]) {
                stream.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
                quiet = true;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if quiet && is_timeout(&e) => break false,
            Err(e) => panic!("raw_get: read error {e} after {} bytes", raw.len()),
        }
    };
    let end = head_end(&raw).expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    Raw { status, head, body: raw[end + 4..].to_vec(), eof }
}

fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

#[test]
fn pass_through_range_and_ignore_range() {
    let fx = Fixture::new();
    let proxy = FaultProxy::start(&fx.registry.host(), Fault::PassThrough);
    let blob_url = format!("{}{}", proxy.url(), fx.blob_path());
    let size = fx.blob.len();

    let v2 = http_request("GET", &format!("{}/v2/", proxy.url()), &[]).unwrap();
    assert_eq!(v2.status, 200, "{}", v2.text());

    let manifest =
        http_request("GET", &format!("{}{}", proxy.url(), fx.manifest_path()), &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(manifest.status, 200);
    assert_eq!(manifest.body, fx.image.manifest_bytes);
    assert_eq!(manifest.header("docker-content-digest"), Some(fx.image.manifest_digest.as_str()));
    assert_eq!(manifest.header("connection"), Some("close"));

    let full = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!(full.status, 200);
    assert_eq!(full.header("content-length"), Some(size.to_string().as_str()));
    assert_eq!(full.body.len(), size);
    assert_eq!(sha256_bytes(&full.body), fx.digest());

    let head = http_request("HEAD", &blob_url, &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(size.to_string().as_str()));
    assert!(head.body.is_empty());

    let ranged = http_request("GET", &blob_url, &[("Range", "bytes=1000-1999")]).unwrap();
    assert_eq!(ranged.status, 206, "Range must reach the registry");
    assert_eq!(ranged.body, fx.blob[1000..2000]);

    let tail = http_request("GET", &blob_url, &[("Range", "bytes=3000000-")]).unwrap();
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, fx.blob[3_000_000..]);

    // IgnoreRange (on blob GETs only): the registry never sees the Range and answers 200.
    proxy.set_fault(Fault::on_blobs(Fault::IgnoreRange));
    let ignored = http_request("GET", &blob_url, &[("Range", "bytes=1000-1999")]).unwrap();
    assert_eq!(ignored.status, 200);
    assert_eq!(sha256_bytes(&ignored.body), fx.digest());
    let registry_log = fx.registry.requests();
    let last = registry_log.iter().rev().find(|e| e.path.contains("/blobs/")).expect("a blob request");
    assert_eq!((last.status, last.bytes), (200, size as u64), "registry saw a ranged request: {last:?}");

    // Everything that arrived was recorded, in order, with the Range header as sent.
    let blob_path = fx.blob_path();
    let expected = vec![
        ("GET".to_string(), "/v2/".to_string(), None),
        ("GET".to_string(), fx.manifest_path(), None),
        ("GET".to_string(), blob_path.clone(), None),
        ("HEAD".to_string(), blob_path.clone(), None),
        ("GET".to_string(), blob_path.clone(), Some("bytes=1000-1999".to_string())),
        ("GET".to_string(), blob_path.clone(), Some("bytes=3000000-".to_string())),
        ("GET".to_string(), blob_path.clone(), Some("bytes=1000-1999".to_string())),
    ];
    assert_eq!(proxy.requests(), expected);
    assert_eq!(proxy.count("GET", "/blobs/sha256:"), 4);
    assert_eq!(proxy.count("head", "/blobs/"), 1);
    assert_eq!(fx.registry_blob_gets(), 4, "every blob GET reached the registry");
    proxy.clear_requests();
    assert!(proxy.requests().is_empty());
}

#[test]
fn skopeo_push_and_pull_through_the_proxy() {
    // Uploads exercise request bodies (chunked PATCH, PUT) and the Location rewrite.
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.host(), Fault::PassThrough);
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 2 << 20], 11);
    push_layout(&layout, "v1", &format!("{}/via/proxy:v1", proxy.host()), false).expect("push through proxy");
    assert!(proxy.count("PUT", "/manifests/v1") >= 1, "{:#?}", proxy.requests());
    assert!(proxy.count("POST", "/blobs/uploads/") >= 1, "{:#?}", proxy.requests());
    let uploads = proxy.count("PATCH", "/blobs/uploads/") + proxy.count("PUT", "/blobs/uploads/");
    assert!(uploads >= image.blob_digests().len(), "uploads bypassed the proxy: {:#?}", proxy.requests());

    let pulled = work.path().join("pulled");
    pull_to_dir(&format!("{}/via/proxy:v1", proxy.host()), &pulled).expect("pull through proxy");
    for digest in image.blob_digests() {
        assert_eq!(sha256_file(pulled.join(digest_hex(&digest))), digest);
        assert_eq!(proxy.count("GET", &format!("/blobs/{digest}")), 1);
    }
    // And the registry really has it (read directly).
    assert_eq!(inspect_raw(&format!("{}/via/proxy:v1", registry.host())).unwrap(), image.manifest_bytes);
}

#[test]
fn truncate_stall_corrupt_and_status() {
    let fx = Fixture::new();
    let size = fx.blob.len();
    let proxy = FaultProxy::start(&fx.registry.host(), Fault::on_blobs(Fault::TruncateAfter(1000)));
    let blob_url = format!("{}{}", proxy.url(), fx.blob_path());

    // Truncate: the upstream's head (200, full Content-Length), exactly 1000 bytes, then EOF.
    let cut = raw_get(&proxy.host(), &fx.blob_path(), &[], None);
    assert_eq!(cut.status, 200);
    assert_eq!(cut.header("content-length"), Some(size.to_string()));
    assert!(cut.eof, "truncated response must end with EOF");
    assert_eq!(cut.body, fx.blob[..1000]);
    let err = http_request("GET", &blob_url, &[]).expect_err("the harness client notices the short body");
    assert!(err.to_string().contains("shorter than Content-Length"), "{err}");
    // Manifests are not blobs: untouched.
    let manifest =
        http_request("GET", &format!("{}{}", proxy.url(), fx.manifest_path()), &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(manifest.body, fx.image.manifest_bytes);
    // A truncated ranged answer keeps its 206 head.
    let cut_range = raw_get(&proxy.host(), &fx.blob_path(), &[("Range", "bytes=10-5009")], None);
    assert_eq!((cut_range.status, cut_range.eof), (206, true));
    assert_eq!(cut_range.body, fx.blob[10..1010]);

    // Stall: head and 4096 bytes, then silence with the connection open.
    proxy.set_fault(Fault::on_blobs(Fault::StallAfter(4096)));
    let stalled = raw_get(&proxy.host(), &fx.blob_path(), &[], Some(&|body| body.len() >= 4096));
    assert_eq!(stalled.status, 200);
    assert!(!stalled.eof, "stalled response must stay open");
    assert_eq!(stalled.body, fx.blob[..4096]);
    let err = http_request_timeout("GET", &blob_url, &[], SHORT_TIMEOUT).expect_err("stall times out");
    assert!(is_timeout(&err), "{err:?}");

    // Corrupt: right length and status, one flipped bit, so the digest is wrong.
    proxy.set_fault(Fault::on_blobs(Fault::CorruptByte(1_234_567)));
    let bad = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!(bad.status, 200);
    assert_eq!(bad.body.len(), size);
    assert_ne!(sha256_bytes(&bad.body), fx.digest());
    let diffs: Vec<usize> = (0..size).filter(|&i| bad.body[i] != fx.blob[i]).collect();
    assert_eq!(diffs, vec![1_234_567]);
    assert_eq!(bad.body[1_234_567] ^ fx.blob[1_234_567], 0x01);

    // Status: answered by the proxy, never reaching the registry.
    let registry_gets = fx.registry_blob_gets();
    proxy.set_fault(Fault::on_blobs(Fault::Status(500)));
    let failed = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!(failed.status, 500);
    let body: serde_json::Value = serde_json::from_slice(&failed.body).expect("JSON error body");
    assert_eq!(body["errors"][0]["code"], "UNKNOWN");
    proxy.set_fault(Fault::Status(429));
    let limited = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!((limited.status, limited.header("retry-after")), (429, Some("1")));
    proxy.set_fault(Fault::Status(503));
    let head = http_request("HEAD", &blob_url, &[]).unwrap();
    assert_eq!((head.status, head.header("retry-after")), (503, Some("1")));
    assert!(head.body.is_empty());
    let v2 = http_request("GET", &format!("{}/v2/", proxy.url()), &[]).unwrap();
    assert_eq!(v2.status, 503, "an unfiltered fault applies to every path");
    assert_eq!(fx.registry_blob_gets(), registry_gets, "Status faults must not reach the registry");
}

#[test]
fn once_and_times_misbehave_then_pass_through() {
    let fx = Fixture::new();
    let proxy = FaultProxy::start(&fx.registry.host(), Fault::on_blobs(Fault::once(Fault::TruncateAfter(100))));
    let blob_url = format!("{}{}", proxy.url(), fx.blob_path());
    let manifest_url = format!("{}{}", proxy.url(), fx.manifest_path());

    // Non-matching requests do not use up the Once.
    assert_eq!(http_request("GET", &manifest_url, &[("Accept", OCI_MANIFEST)]).unwrap().status, 200);
    let cut = raw_get(&proxy.host(), &fx.blob_path(), &[], None);
    assert!(cut.eof);
    assert_eq!(cut.body, fx.blob[..100]);
    // The same upstream "resumes": the next attempt (here a Range resume) is served properly.
    let resumed = http_request("GET", &blob_url, &[("Range", "bytes=100-")]).unwrap();
    assert_eq!(resumed.status, 206);
    assert_eq!([&cut.body[..], &resumed.body[..]].concat(), fx.blob);
    assert_eq!(proxy.fault(), Fault::on_blobs(Fault::PassThrough));

    // Once outside the filter behaves the same.
    proxy.set_fault(Fault::once(Fault::on_blobs(Fault::Status(500))));
    assert_eq!(http_request("GET", &manifest_url, &[("Accept", OCI_MANIFEST)]).unwrap().status, 200);
    assert_eq!(http_request("GET", &blob_url, &[]).unwrap().status, 500);
    let ok = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!((ok.status, sha256_bytes(&ok.body)), (200, fx.digest().to_string()));

    // Times(2): two failures, then success.
    proxy.set_fault(Fault::on_blobs(Fault::times(2, Fault::Status(503))));
    let statuses: Vec<u16> = (0..3).map(|_| http_request("GET", &blob_url, &[]).unwrap().status).collect();
    assert_eq!(statuses, [503, 503, 200]);

    // Once(Hang): the first attempt hangs, the retry works.
    proxy.set_fault(Fault::on_blobs(Fault::once(Fault::Hang)));
    let err = http_request_timeout("GET", &blob_url, &[], SHORT_TIMEOUT).expect_err("first attempt hangs");
    assert!(is_timeout(&err), "{err:?}");
    let ok = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!(sha256_bytes(&ok.body), fx.digest());

    let blob_ranges: Vec<Option<String>> = proxy
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "GET" && p.contains("/blobs/"))
        .map(|(_, _, r)| r)
        .collect();
    assert_eq!(blob_ranges.len(), 9);
    assert_eq!(blob_ranges[1], Some("bytes=100-".to_string()));
}

#[test]
fn hang_holds_connections_until_drop() {
    let fx = Fixture::new();
    // Blob GETs hang, except `?stall` ones, which stall after 10 bytes.
    let fault =
        Fault::FirstOf(vec![Fault::on(Some("GET"), "?stall", Fault::StallAfter(10)), Fault::on_blobs(Fault::Hang)]);
    let proxy = FaultProxy::start(&fx.registry.host(), fault);
    let blob_url = format!("{}{}", proxy.url(), fx.blob_path());
    let err = http_request_timeout("GET", &blob_url, &[], SHORT_TIMEOUT).expect_err("a hung request times out");
    assert!(is_timeout(&err), "{err:?}");
    assert!(proxy.wait_for_count("GET", "/blobs/", 1, WAIT), "the hung request was recorded");
    // Other paths keep working meanwhile.
    let manifest =
        http_request("GET", &format!("{}{}", proxy.url(), fx.manifest_path()), &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(manifest.body, fx.image.manifest_bytes);
    assert_eq!(fx.registry_blob_gets(), 0, "a hung request never reaches the registry");
    // The hung connection ended when its client gave up.
    assert!(proxy.wait_for_active_connections(0, WAIT), "{} still open", proxy.active_connections());

    // A client still waiting on a hung (and on a stalled) connection sees EOF as soon as the
    // proxy is dropped, and the drop itself is quick.
    let (tx, rx) = mpsc::channel();
    for path in [fx.blob_path(), format!("{}?stall", fx.blob_path())] {
        let host = proxy.host();
        let tx = tx.clone();
        thread::spawn(move || {
            let mut stream = TcpStream::connect(&host).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
            let mut got = Vec::new();
            let result = stream.read_to_end(&mut got).map(|_| got.len());
            let _ = tx.send((path, result));
        });
    }
    assert!(proxy.wait_for_count("GET", "/blobs/", 3, WAIT), "{:#?}", proxy.requests());
    assert_eq!(proxy.active_connections(), 2);
    let started = Instant::now();
    drop(proxy);
    let drop_time = started.elapsed();
    assert!(drop_time < Duration::from_secs(3), "drop took {drop_time:?}");
    for _ in 0..2 {
        let (path, result) = rx.recv_timeout(WAIT).expect("client released by drop");
        let n = result.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(started.elapsed() < Duration::from_secs(5), "{path}: held until the client's timeout");
        assert!(n < 4096, "{path}: got {n} bytes");
    }
}

#[test]
fn static_servers() {
    let failing = StaticServer::status(500);
    for path in ["/v2/", "/v2/x/manifests/latest", "/anything?at=all"] {
        let response = http_request("GET", &format!("{}{path}", failing.url()), &[]).unwrap();
        assert_eq!(response.status, 500, "{path}");
        assert!(response.text().contains("\"errors\""));
    }
    assert_eq!(failing.requests().len(), 3);

    let hanging = StaticServer::hang();
    let err = http_request_timeout("GET", &format!("{}/v2/", hanging.url()), &[], SHORT_TIMEOUT).unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    assert_eq!(hanging.count("GET", "/v2/"), 1);

    // Without an upstream, anything let through is a 502.
    let gateway = StaticServer::with(Fault::on_blobs(Fault::Status(404)));
    let missing = http_request("GET", &format!("{}/v2/r/blobs/sha256:00", gateway.url()), &[]).unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&missing.body).unwrap()["errors"][0]["code"],
        "BLOB_UNKNOWN"
    );
    assert_eq!(http_request("GET", &format!("{}/v2/", gateway.url()), &[]).unwrap().status, 502);

    // An upstream that is down: the proxy answers 502 too.
    let down = FaultProxy::start(&format!("127.0.0.1:{}", free_port()), Fault::PassThrough);
    assert_eq!(http_request("GET", &format!("{}/v2/", down.url()), &[]).unwrap().status, 502);
}

/// A canned upstream for framings a real registry does not produce: every connection gets
/// `respond(request target, own host)` and is closed. Served one at a time on one thread,
/// which `Drop` stops (bounded).
struct Canned {
    host: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Canned {
    fn start(respond: fn(&str, &str) -> Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_host) = (Arc::clone(&stop), host.clone());
        let thread = thread::spawn(move || {
            for _ in 0..1000 {
                let accepted = listener.accept();
                if thread_stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok((mut stream, _)) = accepted else { continue };
                stream.set_read_timeout(Some(WAIT)).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let _ = stream.write_all(&respond(&target, &thread_host));
                let _ = stream.shutdown(Shutdown::Both);
            }
        });
        Self { host, stop, thread: Some(thread) }
    }
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.host.parse().unwrap(), Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The payload `canned` serves for `/chunked` and `/eof`.
fn canned_payload() -> Vec<u8> {
    let mut payload = b"hello, world".to_vec();
    payload.extend((0..4096u32).map(|i| (i % 251) as u8));
    payload
}

fn canned(target: &str, host: &str) -> Vec<u8> {
    let payload = canned_payload();
    let mut out = Vec::new();
    match target {
        "/chunked" => {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n");
            out.extend_from_slice(b"5;note=first\r\nhello\r\n7\r\n, world\r\n1000\r\n");
            out.extend_from_slice(&payload[12..]);
            out.extend_from_slice(b"\r\n0\r\nX-Trailer: yes\r\n\r\n");
        }
        "/eof" => {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
            out.extend_from_slice(&payload);
        }
        _ => {
            let head = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{host}/elsewhere?x=1\r\nContent-Length: 0\r\n\r\n"
            );
            out.extend_from_slice(head.as_bytes());
        }
    }
    out
}

/// De-chunks as much of a chunked body as is there: `(payload, saw the last chunk)`.
fn dechunk_partial(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&body[..eol]).split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (out, true);
        }
        body = &body[eol + 2..];
        out.extend_from_slice(&body[..size.min(body.len())]);
        if body.len() < size + 2 {
            break;
        }
        body = &body[size + 2..];
    }
    (out, false)
}

#[test]
fn chunked_until_eof_and_location_framings() {
    let upstream = Canned::start(canned);
    let proxy = FaultProxy::start(&upstream.host, Fault::PassThrough);
    let payload = canned_payload();

    let chunked = http_request("GET", &format!("{}/chunked", proxy.url()), &[]).unwrap();
    assert_eq!(chunked.header("transfer-encoding"), Some("chunked"));
    assert_eq!(chunked.body, payload);
    let eof = http_request("GET", &format!("{}/eof", proxy.url()), &[]).unwrap();
    assert_eq!(eof.body, payload);
    // Absolute redirects to the upstream are mapped back onto the proxy.
    let moved = http_request("GET", &format!("{}/moved", proxy.url()), &[]).unwrap();
    assert_eq!(moved.status, 307);
    assert_eq!(moved.header("location"), Some(format!("{}/elsewhere?x=1", proxy.url()).as_str()));

    // Body faults count de-chunked payload bytes, across chunk boundaries.
    for offset in [3, 6, 4000] {
        proxy.set_fault(Fault::CorruptByte(offset));
        for path in ["/chunked", "/eof"] {
            let bad = http_request("GET", &format!("{}{path}", proxy.url()), &[]).unwrap();
            let diffs: Vec<usize> = (0..payload.len()).filter(|&i| bad.body[i] != payload[i]).collect();
            assert_eq!((bad.body.len(), diffs), (payload.len(), vec![offset as usize]), "{path}");
        }
    }
    proxy.set_fault(Fault::TruncateAfter(8));
    let cut = raw_get(&proxy.host(), "/chunked", &[], None);
    assert!(cut.eof);
    assert_eq!(dechunk_partial(&cut.body), (b"hello, w".to_vec(), false));
    let err = http_request("GET", &format!("{}/chunked", proxy.url()), &[]).unwrap_err();
    assert!(err.to_string().contains("malformed chunked body"), "{err}");
    let cut = raw_get(&proxy.host(), "/eof", &[], None);
    assert_eq!((cut.eof, &cut.body[..]), (true, &b"hello, w"[..]));

    proxy.set_fault(Fault::StallAfter(8));
    let stalled = raw_get(&proxy.host(), "/chunked", &[], Some(&|body| dechunk_partial(body).0.len() >= 8));
    assert!(!stalled.eof);
    assert_eq!(dechunk_partial(&stalled.body), (b"hello, w".to_vec(), false));
}

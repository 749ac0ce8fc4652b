//! Hostile clients (`limits:`): connections that never send a byte or never read, more
//! connections than Ferry serves at once, HTTP/2 streams with a zero window, made-up methods,
//! a forged `Host` header, and request bodies Ferry refuses before reading them. Raw sockets
//! and a raw HTTP/2 client (`h2`), so that every byte on the wire is the test's choice.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::harness::*;

const ALICE: Creds<'static> = ("alice", "alice-pw");

/// A response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the response says `Connection: close`.
    fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// One HTTP/1.1 connection on which the test writes exactly the bytes it wants (its own `Host`
/// header included) and reads answers framed by `Content-Length` or chunked encoding.
struct RawConn {
    reader: BufReader<TcpStream>,
}

impl RawConn {
    /// Connects with every read and write bounded by `timeout`.
    fn open(host: &str, timeout: Duration) -> RawConn {
        let stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
        stream.set_read_timeout(Some(timeout)).unwrap();
        stream.set_write_timeout(Some(timeout)).unwrap();
        RawConn { reader: BufReader::new(stream) }
    }

    /// Writes a request head (request line and header lines, without the blank line) and body;
    /// `Content-Length` is added when `body` is not empty.
    fn send(&mut self, head: &str, body: &[u8]) {
        let mut bytes = head.trim_end().replace('\n', "\r\n").replace("\r\r\n", "\r\n").into_bytes();
        if !body.is_empty() {
            bytes.extend_from_slice(format!("\r\nContent-Length: {}", body.len()).as_bytes());
        }
        bytes.extend_from_slice(b"\r\n\r\n");
        bytes.extend_from_slice(body);
        let stream = self.reader.get_mut();
        stream.write_all(&bytes).and_then(|()| stream.flush()).expect("write request");
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Reads one response (not to a HEAD).
    fn read(&mut self) -> io::Result<Raw> {
        let status_line = self.line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let mut raw = Raw { status, headers, body: Vec::new() };
        if matches!(status, 100..=199 | 204 | 304) {
            return Ok(raw);
        }
        if raw.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let size = usize::from_str_radix(self.line()?.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if size == 0 {
                    while !self.line()?.is_empty() {}
                    return Ok(raw);
                }
                let start = raw.body.len();
                raw.body.resize(start + size, 0);
                self.reader.read_exact(&mut raw.body[start..])?;
                self.line()?;
            }
        }
        let length = raw.header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        raw.body.resize(length, 0);
        self.reader.read_exact(&mut raw.body)?;
        Ok(raw)
    }

    /// Sends a request and reads its answer.
    fn exchange(&mut self, head: &str, body: &[u8]) -> Raw {
        self.send(head, body);
        self.read().unwrap_or_else(|e| panic!("no answer to {:?}: {e}", head.lines().next()))
    }

    /// Waits until `deadline` for the server to close the connection; returns when it did.
    /// Bytes the server sends first are skipped.
    fn closed_by(&mut self, deadline: Instant) -> Result<Instant, String> {
        closed_by(self.reader.get_mut(), deadline)
    }
}

/// Waits until `deadline` for the server to close `stream` (a read returns EOF or a reset);
/// returns when it did, or says what happened instead.
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> Result<Instant, String> {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("still open at the deadline".to_owned());
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(Instant::now()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Instant::now()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err("still open at the deadline".to_owned())
            }
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// `HOST:PORT` of the `metrics.listen` listener, from Ferry's log (it is bound, and logged,
/// just after the line the harness waits for).
fn ops_host(ferry: &Ferry) -> String {
    let marker = "operations endpoints on http://";
    ferry.wait_for_log(marker, Duration::from_secs(10));
    let log = ferry.log_text();
    let at = log.find(marker).unwrap_or_else(|| panic!("no operations listener in the log:\n{log}")) + marker.len();
    log[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect()
}

/// `/healthz` on its own connection, bounded by `timeout`.
fn healthz(host: &str, timeout: Duration) -> io::Result<u16> {
    http_request_timeout("GET", &format!("http://{host}/healthz"), &[], timeout).map(|r| r.status)
}

/// Polls `/healthz` on `host` until the returned sender is dropped or sent to, pacing each
/// probe by a bounded wait on that channel; the handle yields `(answered, failures)`.
fn probe_healthz(host: String) -> (mpsc::Sender<()>, thread::JoinHandle<(usize, Vec<String>)>) {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        let (mut answered, mut failures) = (0, Vec::new());
        loop {
            match healthz(&host, Duration::from_secs(5)) {
                Ok(200) => answered += 1,
                other => failures.push(format!("{other:?}")),
            }
            if !matches!(stopped.recv_timeout(Duration::from_millis(100)), Err(mpsc::RecvTimeoutError::Timeout)) {
                return (answered, failures);
            }
        }
    });
    (stop, handle)
}

#[test]
fn connections_that_never_send_a_byte_and_idle_keep_alives_are_closed_after_the_idle_timeout() {
    let work = tmp_dir();
    let idle = Duration::from_secs(1);
    let ferry =
        Ferry::start(&FerryConfig::new(work.path().join("data")).set("limits.client_idle_timeout", idle).yaml());
    // Well below hyper's own 30 s header read timeout, which must not be what closes them.
    let bound = idle + Duration::from_secs(15);

    let started = Instant::now();
    let (stop, probes) = probe_healthz(ferry.host().to_owned());
    let mut silent: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(ferry.host()).unwrap()).collect();
    let mut kept = RawConn::open(ferry.host(), bound);
    let answer = kept.exchange("GET /healthz HTTP/1.1\nHost: ferry", b"");
    assert_eq!((answer.status, answer.closes()), (200, false), "{answer:?}");
    let answered = Instant::now();

    let deadline = started + bound;
    let mut first_close = None;
    for (i, socket) in silent.iter_mut().enumerate() {
        let at = closed_by(socket, deadline).unwrap_or_else(|e| panic!("silent connection {i}: {e} ({bound:?})"));
        first_close = Some(first_close.map_or(at, |f: Instant| f.min(at)));
    }
    let kept_closed = kept.closed_by(answered + bound).unwrap_or_else(|e| panic!("kept-alive connection: {e}"));
    stop.send(()).unwrap();
    let (probed, failures) = probes.join().unwrap();

    // Closed by the idle timeout, not at once.
    let first = first_close.unwrap().duration_since(started);
    assert!(first >= idle.mul_f64(0.9), "a silent connection was closed after {first:?}, before the idle timeout");
    let kept_for = kept_closed.duration_since(answered);
    assert!(kept_for >= idle.mul_f64(0.9), "the kept-alive connection was closed after {kept_for:?}");
    assert!(failures.is_empty() && probed > 0, "/healthz during the attack: {probed} answered, failed: {failures:?}");
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200);
}

#[test]
fn max_connections_holds_the_next_connection_until_one_closes_and_the_ops_port_still_answers() {
    let work = tmp_dir();
    let cfg = FerryConfig::new(work.path().join("data"))
        .set("limits.max_connections", 5u32)
        .set("limits.client_idle_timeout", "60s")
        .set("metrics.listen", "127.0.0.1:0");
    let ferry = Ferry::start(&cfg.yaml());
    let ops = ops_host(&ferry);

    // Five kept-alive connections, each served once, so Ferry holds all five.
    let mut held: Vec<RawConn> = (0..5)
        .map(|i| {
            let mut conn = RawConn::open(ferry.host(), Duration::from_secs(10));
            let answer = conn.exchange("GET /healthz HTTP/1.1\nHost: ferry", b"");
            assert_eq!((answer.status, answer.closes()), (200, false), "connection {i}: {answer:?}");
            conn
        })
        .collect();

    // The sixth completes its TCP handshake (the kernel's backlog) but gets no answer.
    let mut sixth = RawConn::open(ferry.host(), Duration::from_secs(1));
    sixth.send("GET /healthz HTTP/1.1\nHost: ferry", b"");
    match sixth.read() {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
        other => panic!("a sixth connection was served while five are open: {other:?}"),
    }
    // Probes and scrapes have their own listener and slots.
    assert_eq!(healthz(&ops, Duration::from_secs(5)).unwrap(), 200, "the metrics.listen port is full too");

    // One client leaves: the waiting connection is served.
    drop(held.pop());
    sixth.reader.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let answer = sixth.read().expect("the sixth connection is served once a slot is free");
    assert_eq!(answer.status, 200, "{answer:?}");
    // And the rest still work.
    let answer = held[0].exchange("GET /healthz HTTP/1.1\nHost: ferry", b"");
    assert_eq!(answer.status, 200);
}

/// Sum of the `ferry_http_requests_total` series whose line contains `labels`.
fn requests_with(page: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with("ferry_http_requests_total{") && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn made_up_methods_are_counted_as_other_and_add_no_series() {
    let work = tmp_dir();
    let ferry = Ferry::start(&FerryConfig::new(work.path().join("data")).yaml());
    let before = scrape(&ferry);
    let mut client = Client::new(Duration::from_secs(10));
    for i in 1..=200 {
        for path in ["/healthz", "/v2/library/x/manifests/v1"] {
            let method = format!("XYZ{i}");
            let answer = client.request(&method, &format!("{}{path}", ferry.url()), &[], Body::Empty, 0).unwrap();
            assert!(answer.status < 500, "{method} {path}: {}", answer.status);
        }
    }
    // Counted once each response is done; everything but the scrapes (GETs) is made up.
    let counted = |page: &str| requests_with(page, "") - requests_with(page, "method=\"GET\"");
    eventually("400 made-up requests counted", || counted(&scrape(&ferry)) >= 400.0);
    let page = scrape(&ferry);
    assert_eq!(requests_with(&page, "method=\"other\""), 400.0, "not counted as `other`:\n{page}");
    assert!(!page.contains("XYZ"), "a made-up method became a label:\n{page}");
    // Two new series at most (one per route and status), whatever the methods were.
    assert!(page.len() < before.len() + 2048, "/metrics grew from {} to {} bytes", before.len(), page.len());
}

/// Ferry hosting `internal` for ALICE; nothing mirrored that answers.
fn hosted_ferry(work: &tempfile::TempDir) -> Ferry {
    let htpasswd = write_htpasswd(work.path(), &[ALICE]);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream("http://127.0.0.1:9")])
        .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd));
    Ferry::start(&cfg.yaml())
}

#[test]
fn a_forged_host_header_is_not_repeated_in_the_bearer_challenge() {
    let work = tmp_dir();
    let ferry = hosted_ferry(&work);
    let own = format!("Bearer realm=\"http://{}/auth/token\",service=\"ferry\"", ferry.host());
    for path in ["/v2/", "/v2/internal/app/manifests/v1"] {
        let mut conn = RawConn::open(ferry.host(), Duration::from_secs(10));
        let answer = conn.exchange(&format!("GET {path} HTTP/1.1\nHost: evil\",service=\"x\nConnection: close"), b"");
        assert_eq!(answer.status, 401, "{path}: {answer:?}");
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        assert!(!challenge.contains("evil"), "{path}: the Host header reached the challenge: {challenge}");
        assert_eq!(challenge.matches("service=").count(), 1, "{path}: {challenge}");
        assert_eq!(challenge, own, "{path}: the challenge names the listener's address");
    }
    // A plain host[:port] names Ferry as the client reached it.
    let mut conn = RawConn::open(ferry.host(), Duration::from_secs(10));
    let answer = conn.exchange("GET /v2/ HTTP/1.1\nHost: ferry.example:5000\nConnection: close", b"");
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer realm=\"http://ferry.example:5000/auth/token\",service=\"ferry\"")
    );
}

#[test]
fn refusals_before_the_body_is_read_say_connection_close_and_an_accepted_patch_keeps_it() {
    let work = tmp_dir();
    let ferry = hosted_ferry(&work);
    let auth = format!("Authorization: {}", basic_auth(ALICE.0, ALICE.1));
    let bound = Duration::from_secs(10);

    // A manifest PUT without credentials: 401 before the body is read, and the connection ends.
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let mut conn = RawConn::open(ferry.host(), bound);
    let head = format!("PUT /v2/internal/app/manifests/v1 HTTP/1.1\nHost: ferry\nContent-Type: {OCI_MANIFEST}");
    let refused = conn.exchange(&head, manifest);
    assert_eq!((refused.status, refused.closes()), (401, true), "{refused:?}");
    conn.closed_by(Instant::now() + bound).expect("closed after the 401");

    // An upload on one kept-alive connection: the in-order chunk keeps it, the out-of-order
    // one (past the upload's offset) is refused with Connection: close.
    let mut conn = RawConn::open(ferry.host(), bound);
    let post = conn.exchange(&format!("POST /v2/internal/app/blobs/uploads/ HTTP/1.1\nHost: ferry\n{auth}"), b"");
    let post = (post.status, post.closes(), post.header("location").map(str::to_owned));
    let (202, false, Some(location)) = post else { panic!("POST: {post:?}") };
    let patch = |range: &str| format!("PATCH {location} HTTP/1.1\nHost: ferry\n{auth}\nContent-Range: {range}");
    let first = conn.exchange(&patch("0-3"), b"abcd");
    assert_eq!((first.status, first.closes()), (202, false), "{first:?}");
    let skip = conn.exchange(&patch("8-11"), b"ijkl");
    assert_eq!((skip.status, skip.closes()), (416, true), "{skip:?}");
    conn.closed_by(Instant::now() + bound).expect("closed after the 416");
}

/// One HTTP/2 connection whose streams never read: the connection task (when it ended) and
/// the responses it holds open.
struct Stalled {
    ended: tokio::task::JoinHandle<Instant>,
    _responses: Vec<http::Response<h2::RecvStream>>,
    _client: h2::client::SendRequest<Bytes>,
}

/// Opens an h2c connection (prior knowledge) that announces a zero stream window and the
/// smallest connection window, and `streams` GETs of `path` on it; returns once every
/// response head is in. Nothing is ever read or released; the connection task keeps
/// answering PINGs and settings.
async fn stall(host: &str, path: &str, streams: usize) -> Stalled {
    let tcp = tokio::net::TcpStream::connect(host).await.expect("connect h2c");
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .initial_connection_window_size(65_535)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2c handshake");
    let ended = tokio::spawn(async move {
        let _ = connection.await;
        Instant::now()
    });
    let mut pending = Vec::with_capacity(streams);
    for _ in 0..streams {
        client = client.ready().await.expect("stream slot");
        let req = http::Request::get(format!("http://{host}{path}")).body(()).unwrap();
        pending.push(client.send_request(req, true).expect("send request").0);
    }
    let mut responses = Vec::with_capacity(streams);
    for resp in pending {
        let resp = resp.await.expect("response head");
        assert_eq!(resp.status(), 200);
        responses.push(resp);
    }
    Stalled { ended, _responses: responses, _client: client }
}

#[test]
fn http2_streams_that_never_read_hold_at_most_max_buffered_and_are_closed_after_the_stall_timeout() {
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 64;
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[64 << 20, 4 << 20], 611);
    push_layout(&layout, "v1", &format!("{}/library/big:v1", registry.host()), false).unwrap();
    let stall_timeout = Duration::from_secs(3);
    let max_buffered: u64 = 32 << 20;
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(registry.url())])
        .set("limits.send_stall_timeout", stall_timeout)
        .set("limits.max_buffered", "32MiB")
        .set("metrics.listen", "127.0.0.1:0");
    let mut ferry = Ferry::start(&cfg.yaml());
    let (big, _) = image.layers[0].clone();
    let (other, _) = image.layers[1].clone();
    let big_path = format!("/v2/library/big/blobs/{big}");
    let pulled = http_request("GET", &format!("{}{big_path}", ferry.url()), &[]).unwrap();
    assert_eq!(sha256_bytes(&pulled.body), big);
    drop(pulled);
    wait_cached(&work.path().join("data"), std::slice::from_ref(&big));

    let pid = ferry.pid();
    let baseline = rss(pid);
    // Sample Ferry's RSS from before the first stream until the test says stop.
    let (stop, stopped) = mpsc::channel::<()>();
    let sampler = thread::spawn(move || {
        let mut peak = 0;
        loop {
            peak = peak.max(rss(pid));
            if !matches!(stopped.recv_timeout(Duration::from_millis(20)), Err(mpsc::RecvTimeoutError::Timeout)) {
                return peak;
            }
        }
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = Instant::now();
    let host = ferry.host().to_owned();
    let stalled: Vec<Stalled> = rt.block_on(async {
        let mut all = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            all.push(stall(&host, &big_path, STREAMS).await);
        }
        all
    });
    let opened = started.elapsed();
    // Probes are answered during the attack, on both ports: answers already in memory never
    // wait for room in the budget the stalled streams hold.
    for host in [ferry.host().to_owned(), ops_host(&ferry)] {
        assert_eq!(healthz(&host, Duration::from_secs(2)).expect("/healthz during the attack"), 200, "{host}");
    }
    assert!(stalled.iter().all(|s| !s.ended.is_finished()), "a stalled connection ended before the probes");

    // Meanwhile a normal client gets another blob (a miss, pulled through from the upstream),
    // and every stalled connection is closed by Ferry, all within the stall timeout and a margin.
    let margin = Duration::from_secs(10);
    let normal_url = format!("{}/v2/library/big/blobs/{other}", ferry.url());
    let normal = thread::spawn(move || {
        let left = (started + stall_timeout + margin).saturating_duration_since(Instant::now());
        let got = http_request_timeout("GET", &normal_url, &[], left);
        (got.map(|r| (r.status, sha256_bytes(&r.body))), started.elapsed())
    });
    let ended: Vec<Option<Duration>> = rt.block_on(async {
        let mut ended = Vec::with_capacity(CONNECTIONS);
        for s in stalled {
            let left = (started + stall_timeout + margin).saturating_duration_since(Instant::now());
            let at = tokio::time::timeout(left, s.ended).await.ok().map(|at| at.unwrap().duration_since(started));
            ended.push(at);
        }
        ended
    });
    let (normal, normal_done) = normal.join().unwrap();
    stop.send(()).unwrap();
    let peak = sampler.join().unwrap();
    eprintln!(
        "h2 stall: baseline RSS {:.1} MiB, peak {:.1} MiB (+{:.1} MiB); {CONNECTIONS}x{STREAMS} streams opened in \
         {opened:?}; normal pull {normal:?} done at {normal_done:?}; connections closed at {ended:?}",
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
    );
    let bound = baseline + max_buffered + (64 << 20);
    assert!(
        peak < bound,
        "Ferry's RSS grew from {:.1} MiB to {:.1} MiB with streams that never read (bound {:.1} MiB)",
        mib(baseline),
        mib(peak),
        mib(bound)
    );
    assert_eq!(normal.expect("a normal pull during the attack"), (200, other), "the normal pull");
    for (i, at) in ended.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("stalled connection {i} still open {:?} in", stall_timeout + margin));
        assert!(at >= stall_timeout.mul_f64(0.9), "stalled connection {i} closed after {at:?}, before the timeout");
    }
    assert!(ferry.is_running());
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200);
}

//! Floods (`floods:`): HTTP/2 rapid reset, the per-connection stream limit, PING and SETTINGS
//! floods, and a flood of made-up names, tags and digests. Each keeps today's protection from
//! regressing: the rapid reset must end with Ferry's GOAWAY, the limit must be advertised and
//! enforced, and Ferry must keep serving with its resident memory (and `/metrics`) bounded.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;

use crate::harness::*;

/// `/healthz` on its own connection, bounded by `timeout`.
fn healthz(host: &str, timeout: Duration) -> io::Result<u16> {
    http_request_timeout("GET", &format!("http://{host}/healthz"), &[], timeout).map(|r| r.status)
}

/// What [`watch`] saw: `/healthz` probes answered, probe failures, and the peak RSS.
type Watched = (usize, Vec<String>, u64);

/// Until the returned sender is dropped or sent to: polls `/healthz` on `host` (each probe
/// paced by a bounded wait on that channel) and samples `pid`'s RSS; the handle yields
/// what it saw.
fn watch(host: String, pid: u32) -> (mpsc::Sender<()>, thread::JoinHandle<Watched>) {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        let (mut answered, mut failures, mut peak) = (0, Vec::new(), 0);
        loop {
            peak = rss(pid).max(peak);
            match healthz(&host, Duration::from_secs(5)) {
                Ok(200) => answered += 1,
                other => failures.push(format!("{other:?}")),
            }
            peak = rss(pid).max(peak);
            if !matches!(stopped.recv_timeout(Duration::from_millis(50)), Err(mpsc::RecvTimeoutError::Timeout)) {
                return (answered, failures, peak);
            }
        }
    });
    (stop, handle)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn h2_rapid_reset_is_answered_with_goaway() {
    const MAX_STREAMS: usize = 20_000;
    const BURST: usize = 100;
    let work = tmp_dir();
    let ferry = Ferry::start(&FerryConfig::new(work.path().join("data")).yaml());
    let host = ferry.host().to_owned();
    let started = Instant::now();
    let (sent, ended, end) = runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&host).await.expect("connect h2c");
        let (mut client, mut connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
        let mut ping = connection.ping_pong().expect("the connection's PING handle");
        let connection = tokio::spawn(connection);
        let deadline = started + Duration::from_secs(10);
        let mut sent = 0;
        let mut ended = None;
        'flood: while sent < MAX_STREAMS && Instant::now() < deadline {
            // A burst of HEADERS + RST_STREAM pairs, written together...
            for _ in 0..BURST {
                let req = http::Request::get(format!("http://{host}/healthz")).body(()).unwrap();
                let sending = match std::future::poll_fn(|cx| client.poll_ready(cx)).await {
                    Ok(()) => client.send_request(req, false),
                    Err(e) => Err(e),
                };
                match sending {
                    Ok((response, mut stream)) => {
                        stream.send_reset(Reason::CANCEL);
                        drop(response);
                        sent += 1;
                    }
                    Err(e) => {
                        ended = Some(e);
                        break 'flood;
                    }
                }
            }
            // ...then a PING round trip: Ferry has read the whole burst once it answers, and
            // the client stops writing (and reads Ferry's GOAWAY) if it does not.
            if let Err(e) = ping.ping(h2::Ping::opaque()).await {
                ended = Some(e);
                break;
            }
        }
        let end = tokio::time::timeout(Duration::from_secs(10), connection).await;
        (sent, ended.map(|e| e.to_string()), end)
    });
    let took = started.elapsed();
    eprintln!("rapid reset: {sent} streams opened and reset in {took:?}; client saw {ended:?}; connection {end:?}");
    let end = end.expect("the connection was still open 10 s after the flood").expect("connection task");
    let error = end.expect_err("the connection ended cleanly, without Ferry's GOAWAY");
    // Remote: the GOAWAY frame was read off the wire, from Ferry, not made up by the client.
    assert!(error.is_go_away() && error.is_remote(), "not a GOAWAY from Ferry: {error:?}");
    assert_eq!(error.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{error:?}");
    assert!(sent < MAX_STREAMS, "the GOAWAY came only after all {sent} streams");
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200, "/healthz after the flood");
}

/// Runs `fut` while driving `connection`; panics if the connection ends first.
async fn driving<T, C>(connection: &mut C, fut: impl std::future::Future<Output = T>) -> T
where
    C: std::future::Future<Output = Result<(), h2::Error>> + Unpin,
{
    tokio::select! {
        out = fut => out,
        end = connection => panic!("the h2c connection ended: {end:?}"),
    }
}

#[test]
fn h2_stream_limit_is_256_per_connection() {
    const LIMIT: usize = 256;
    let work = tmp_dir();
    let cfg = FerryConfig::new(work.path().join("data")).set("limits.send_stall_timeout", "60s");
    let ferry = Ferry::start(&cfg.yaml());
    let host = ferry.host().to_owned();
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&host).await.expect("connect h2c");
        // A zero stream window: no response body byte can be sent, so every stream stays open
        // (and counts against the limit) once its response head is in.
        let (mut client, mut connection) =
            h2::client::Builder::new().initial_window_size(0).handshake::<_, Bytes>(tcp).await.expect("h2c handshake");
        let get = || http::Request::get(format!("http://{host}/healthz")).body(()).unwrap();
        let bound = Duration::from_secs(20);
        let mut pending = Vec::with_capacity(LIMIT);
        for _ in 0..LIMIT {
            driving(&mut connection, std::future::poll_fn(|cx| client.poll_ready(cx))).await.expect("stream slot");
            pending.push(client.send_request(get(), true).expect("send request").0);
        }
        let mut responses = Vec::with_capacity(LIMIT);
        for resp in pending {
            let resp = tokio::time::timeout(bound, driving(&mut connection, resp))
                .await
                .expect("a response head within 20 s")
                .expect("response head");
            assert_eq!(resp.status(), 200);
            assert!(!resp.body().is_end_stream(), "/healthz has a body that the zero window holds back");
            responses.push(resp);
        }
        // What Ferry's SETTINGS said.
        assert_eq!(connection.max_concurrent_send_streams(), LIMIT, "SETTINGS_MAX_CONCURRENT_STREAMS");

        // A 257th stream waits (its HEADERS are held back by the client, per that setting)...
        let mut extra = client.send_request(get(), true).expect("send the 257th request").0;
        let waited = tokio::time::timeout(Duration::from_secs(1), driving(&mut connection, &mut extra)).await;
        assert!(waited.is_err(), "a 257th concurrent stream was answered: {waited:?}");
        let ready = tokio::time::timeout(
            Duration::from_millis(200),
            driving(&mut connection, std::future::poll_fn(|cx| client.poll_ready(cx))),
        )
        .await;
        assert!(ready.is_err(), "the client was ready for a 258th stream: {ready:?}");
        // ...until one of the 256 ends (dropping it resets it): then it is answered.
        drop(responses.pop());
        let resp = tokio::time::timeout(bound, driving(&mut connection, extra))
            .await
            .expect("the 257th stream answered once a slot is free")
            .expect("response head");
        assert_eq!(resp.status(), 200);
    });
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200);
}

/// An HTTP/2 frame header (RFC 9113 §4.1) and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;

/// Writes the client preface, then `burst` until `max_frames` frames, `for_at_most`, or a write
/// that blocks for `stall` (the server stopped reading): never reads what Ferry answers (its
/// PING and SETTINGS acknowledgements), as a flood does. Returns the frames written and why
/// it stopped.
fn flood(
    host: &str,
    burst: &[u8],
    frames_per_burst: usize,
    max_frames: usize,
    for_at_most: Duration,
) -> (usize, String) {
    let stall = Duration::from_secs(2);
    let mut tcp = TcpStream::connect(host).expect("connect h2c");
    tcp.set_write_timeout(Some(stall)).unwrap();
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&preface).expect("write the preface");
    let deadline = Instant::now() + for_at_most;
    let mut frames = 0;
    while frames < max_frames {
        if Instant::now() >= deadline {
            return (frames, format!("time bound {for_at_most:?}"));
        }
        if let Err(e) = tcp.write_all(burst) {
            return (frames, format!("write: {e} (Ferry stopped reading, or closed)"));
        }
        frames += frames_per_burst;
    }
    // Is it still open? (Ferry may have sent GOAWAY and closed; either is fine.)
    tcp.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let state = match tcp.read(&mut [0u8; 1]) {
        Ok(0) => "closed by Ferry".to_owned(),
        _ => "open".to_owned(),
    };
    (frames, format!("frame bound reached, connection {state}"))
}

#[test]
fn h2_ping_and_settings_floods_leave_ferry_serving() {
    // Raw frames: the h2 client keeps one PING in flight (`ping_pong` waits for its PONG) and
    // one SETTINGS, so it cannot flood; the bytes here are the test's own.
    let work = tmp_dir();
    let ferry = Ferry::start(&FerryConfig::new(work.path().join("data")).yaml());
    let baseline = rss(ferry.pid());
    let (stop, watcher) = watch(ferry.host().to_owned(), ferry.pid());
    let started = Instant::now();

    let mut pings = Vec::new();
    for i in 0u64..256 {
        pings.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    let mut settings = Vec::new();
    for i in 0u32..256 {
        // SETTINGS_INITIAL_WINDOW_SIZE, a different value each time.
        let mut payload = vec![0, 4];
        payload.extend_from_slice(&(65_535 + i).to_be_bytes());
        settings.extend(frame(SETTINGS, 0, 0, &payload));
    }
    let ping_flood = flood(ferry.host(), &pings, 256, 2_000_000, Duration::from_secs(8));
    let settings_flood = flood(ferry.host(), &settings, 256, 2_000_000, Duration::from_secs(8));
    let during = healthz(ferry.host(), Duration::from_secs(5));
    stop.send(()).unwrap();
    let (answered, failures, peak) = watcher.join().unwrap();
    eprintln!(
        "ping flood: {ping_flood:?}; settings flood: {settings_flood:?}; in {:?}; RSS {:.1} MiB -> peak {:.1} MiB \
         (+{:.1} MiB); {answered} probes answered during, failures {failures:?}",
        started.elapsed(),
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
    );
    // Ferry reads no faster than it can answer (one PING ACK, one SETTINGS ACK pending at a
    // time): with its answers unread, it stops reading and the flood's writes stall. Reading
    // on and queueing the answers instead would let the flood run to its bounds.
    for (kind, (frames, why)) in [("PING", &ping_flood), ("SETTINGS", &settings_flood)] {
        assert!(why.starts_with("write:"), "the {kind} flood was never pushed back: {frames} frames, {why}");
    }
    assert!(
        failures.is_empty() && answered > 0,
        "/healthz during the floods: {answered} answered, failed: {failures:?}"
    );
    assert_eq!(during.expect("/healthz right after the floods"), 200);
    let bound = baseline + (64 << 20);
    assert!(
        peak < bound,
        "Ferry's RSS grew from {:.1} MiB to {:.1} MiB under PING/SETTINGS floods (bound {:.1} MiB)",
        mib(baseline),
        mib(peak),
        mib(bound)
    );
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200);
}

/// The `n`th made-up reference: a tag, a digest or a repository name, in turn.
fn made_up(n: usize) -> String {
    match n % 3 {
        0 => format!("/v2/library/x/manifests/t{n}"),
        1 => format!("/v2/library/x/blobs/sha256:{}", digest_hex(&sha256_bytes(&n.to_be_bytes()))),
        _ => format!("/v2/library/n{n}/manifests/latest"),
    }
}

/// Sends `/v2` requests for made-up references `from..to` over `conns` keep-alive connections
/// (each its own thread), stopping at `deadline`; every answer must be 404. Returns how many
/// were answered.
fn send_made_up(url: &str, from: usize, to: usize, conns: usize, deadline: Instant) -> usize {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let url = url.to_owned();
            thread::spawn(move || {
                let mut client = Client::new(Duration::from_secs(10));
                let mut done = 0;
                for n in (from + c..to).step_by(conns) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let path = made_up(n);
                    let answer =
                        client.get(&format!("{url}{path}"), &[], 256).unwrap_or_else(|e| panic!("{path}: {e}"));
                    assert_eq!(answer.status, 404, "{path}: {}", answer.text());
                    done += 1;
                }
                done
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

#[test]
fn a_flood_of_distinct_names_tags_and_digests_keeps_memory_bounded() {
    const WARM_UP: usize = 1_000;
    const FLOOD: usize = 20_000;
    const CONNS: usize = 4;
    let registry = Registry::start();
    let work = tmp_dir();
    let cfg = FerryConfig::new(work.path().join("data")).registry("docker.io", [upstream(registry.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(45);

    let warmed = send_made_up(&ferry.url(), 0, WARM_UP, CONNS, deadline);
    assert_eq!(warmed, WARM_UP, "the warm-up did not finish in time");
    let baseline = rss(ferry.pid());
    let page_before = scrape(&ferry);
    let (stop, watcher) = watch(ferry.host().to_owned(), ferry.pid());
    let flood_started = Instant::now();
    let sent = send_made_up(&ferry.url(), WARM_UP, WARM_UP + FLOOD, CONNS, deadline);
    let flood_took = flood_started.elapsed();
    stop.send(()).unwrap();
    let (answered, failures, peak) = watcher.join().unwrap();
    let after = rss(ferry.pid());
    let page_after = scrape(&ferry);
    eprintln!(
        "name flood: {warmed} warm-up + {sent} requests over {CONNS} connections, flood in {flood_took:?} (test \
         {:?}); RSS {:.1} MiB after warm-up -> peak {:.1} MiB (+{:.1} MiB), {:.1} MiB after; /metrics {} -> {} \
         bytes; {answered} probes answered during",
        started.elapsed(),
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
        mib(after),
        page_before.len(),
        page_after.len(),
    );
    assert!(sent >= FLOOD / 4, "only {sent} of {FLOOD} requests answered in the time bound");
    assert!(failures.is_empty(), "/healthz during the flood failed: {failures:?}");
    let bound = baseline + (64 << 20);
    assert!(
        peak < bound,
        "Ferry's RSS grew from {:.1} MiB to {:.1} MiB over {sent} made-up references (bound {:.1} MiB)",
        mib(baseline),
        mib(peak),
        mib(bound)
    );
    assert!(
        page_after.len() < page_before.len() + 4096,
        "/metrics grew from {} to {} bytes: a series per name?",
        page_before.len(),
        page_after.len()
    );
    for needle in ["library/n", "/t1", "sha256:"] {
        assert!(!page_after.contains(needle), "a made-up reference ({needle}) became a label");
    }
    assert_eq!(healthz(ferry.host(), Duration::from_secs(5)).unwrap(), 200);
}

//! Upstreams that fail every way, and pulls that still succeed. The good upstream is always a
//! real Distribution registry; misbehaviour a real registry cannot show (500s, hangs, broken
//! or corrupt streams) comes from a fault proxy in front of one.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::fault::{Fault, FaultProxy, StaticServer};
use crate::harness::*;
use serde_json::Value;

fn assert_image(dir: &Path, image: &Image) {
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), image.manifest_bytes);
    for d in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&d))), d, "blob {d}");
    }
}

/// A registry holding one image `library/app:v1` with the given layer sizes.
fn seeded(work: &Path, layers: &[u64], seed: u64) -> (Registry, Image) {
    let upstream = Registry::start();
    let layout = work.join(format!("layout-{seed}"));
    let image = build_image(&layout, "v1", layers, seed);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", upstream.host()), false).unwrap();
    (upstream, image)
}

#[test]
fn dead_and_failing_upstreams_are_skipped_and_then_not_tried_while_open() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[1024, 64 * 1024], 101);
    let layout2 = work.path().join("second");
    let second = build_image(&layout2, "v2", &[2048], 102);
    push_layout(&layout2, "v2", &format!("{}/library/app:v2", registry.host()), false).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let broken = StaticServer::status(500);
    let cfg = FerryConfig::new(work.path().join("data")).registry(
        "docker.io",
        [upstream(&dead).opt("backoff", "60s"), upstream(broken.url()).opt("backoff", "60s"), upstream(registry.url())],
    );
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("one");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);

    let broken_seen = broken.requests().len();
    let page = scrape(&ferry);
    // Upstreams are named by host:port in labels, never by URL.
    let dead_name = dead.trim_start_matches("http://");
    let dead_series = format!("ferry_upstream_requests_total{{status=\"error\",upstream=\"{dead_name}\"}}");
    let dead_seen = metric(&page, &dead_series);
    assert!(dead_seen >= 2.0 && broken_seen >= 2, "both were tried: {dead_seen} {broken_seen}");
    assert_eq!(metric(&page, &format!("ferry_upstream_up{{upstream=\"{dead_name}\"}}")), 0.0);

    // Their circuits are open: the next pull does not try them at all.
    let out2 = work.path().join("two");
    pull_to_dir(&format!("{}/app:v2", ferry.host()), &out2).unwrap();
    assert_image(&out2, &second);
    assert_eq!(broken.requests().len(), broken_seen, "the 500 upstream was asked again");
    assert_eq!(metric(&scrape(&ferry), &dead_series), dead_seen, "the dead upstream was dialled again");

    // When everything fails the client learns which upstreams were tried and why.
    let resp = http_request("GET", &format!("{}/v2/library/app/manifests/missing", ferry.url()), &[]).unwrap();
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    let tried: Vec<String> = body["errors"][0]["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{} => {}", t["upstream"].as_str().unwrap(), t["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(tried.len(), 3, "{tried:?}");
    assert!(tried[0].starts_with(dead_name) && tried[0].contains("circuit open"), "{tried:?}");
    assert!(tried[2].starts_with(&registry.host()) && tried[2].ends_with("not found"), "{tried:?}");
    assert!(!resp.text().contains("http://"), "upstreams are named, their URLs not shown: {}", resp.text());
}

/// How much longer than a configured upstream timeout a pull that has to wait it out once or
/// twice may take. Much less than the default of the timeouts under test (30 s for
/// `first_byte_timeout`, 60 s for `idle_timeout`) and than the faults' own hold
/// (`fault::HOLD_LIMIT`, 120 s): a pull bounded by `timeout + TIMEOUT_MARGIN` fails if the
/// configured timeout is ignored.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(20);

#[test]
fn an_upstream_that_never_answers_is_left_after_first_byte_timeout() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[4096], 103);
    let silent = StaticServer::hang();
    let first_byte_timeout = Duration::from_secs(1);
    let cfg = FerryConfig::new(work.path().join("data")).registry(
        "docker.io",
        [upstream(silent.url()).opt("first_byte_timeout", first_byte_timeout), upstream(registry.url())],
    );
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    // Bounded by the configured timeout: with the default (30 s) the pull would not finish in time.
    pull_to_dir_within(&format!("{}/app:v1", ferry.host()), &out, first_byte_timeout + TIMEOUT_MARGIN).unwrap();
    assert_image(&out, &image);
    assert!(silent.count("GET", "/manifests/v1") >= 1, "the silent upstream was asked first");
}

/// A blob stream breaks after 1 MiB on the first upstream (configured with `first_opts`); the
/// fetch resumes on the second with `Range: bytes=1048576-` and the client's response simply
/// continues. The whole pull must finish `within`.
fn resumes_after(fault: Fault, first_opts: &[(&str, Duration)], within: Duration) {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[4 << 20], 104);
    let first = FaultProxy::start(&registry.host(), Fault::on_blobs(fault));
    let second = FaultProxy::start(&registry.host(), Fault::PassThrough);
    let up1 = first_opts.iter().fold(upstream(first.url()), |up, (key, value)| up.opt(key, *value));
    let cfg = FerryConfig::new(work.path().join("data")).registry("docker.io", [up1, upstream(second.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir_within(&format!("{}/app:v1", ferry.host()), &out, within).unwrap();
    assert_image(&out, &image);
    let (layer, _) = &image.layers[0];
    assert_eq!(first.count("GET", layer), 1);
    let resumed: Vec<_> = second.requests().into_iter().filter(|(m, p, _)| m == "GET" && p.contains(layer)).collect();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].2.as_deref(), Some("bytes=1048576-"), "resumed where the stream broke");
    wait_cached(&work.path().join("data"), std::slice::from_ref(layer));
}

#[test]
fn a_blob_cut_mid_stream_is_resumed_with_range_from_the_next_upstream() {
    resumes_after(Fault::TruncateAfter(1 << 20), &[], SKOPEO_TIMEOUT);
}

#[test]
fn a_stalled_blob_stream_is_resumed_after_idle_timeout() {
    // The stream stalls for HOLD_LIMIT (120 s); with the default idle_timeout (60 s) the pull
    // would not finish within the bound.
    let idle_timeout = Duration::from_secs(1);
    resumes_after(Fault::StallAfter(1 << 20), &[("idle_timeout", idle_timeout)], idle_timeout + TIMEOUT_MARGIN);
}

#[test]
fn without_range_support_the_next_upstream_restarts_and_skips_what_the_client_has() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[4 << 20], 105);
    let first = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::TruncateAfter(1 << 20)));
    let second = FaultProxy::start(&registry.host(), Fault::IgnoreRange);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(first.url()), upstream(second.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let (layer, size) = image.layers[0].clone();
    let resp = http_request("GET", &format!("{}/v2/library/app/blobs/{layer}", ferry.url()), &[]).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len() as u64, size, "no byte sent twice, none missing");
    assert_eq!(sha256_bytes(&resp.body), layer);
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
}

#[test]
fn the_same_upstream_resumes_when_it_is_the_only_one() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[3 << 20], 106);
    let flaky = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::once(Fault::TruncateAfter(1 << 20))));
    let ferry =
        Ferry::start(&FerryConfig::new(work.path().join("data")).registry("docker.io", [upstream(flaky.url())]).yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    let (layer, _) = &image.layers[0];
    let ranges: Vec<_> =
        flaky.requests().into_iter().filter(|(m, p, _)| m == "GET" && p.contains(layer)).map(|(_, _, r)| r).collect();
    assert_eq!(ranges, vec![None, Some("bytes=1048576-".to_owned())]);
}

#[test]
fn corrupt_bytes_are_never_cached_or_completed_and_the_next_upstream_serves_them() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[2 << 20], 107);
    let liar = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::CorruptByte(12345)));
    let data = work.path().join("data");
    let cfg = FerryConfig::new(&data).registry("docker.io", [upstream(liar.url()), upstream(registry.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let (layer, _) = image.layers[0].clone();
    let url = format!("{}/v2/library/app/blobs/{layer}", ferry.url());

    let first = http_request("GET", &url, &[]);
    assert!(first.is_err(), "a corrupt blob must not complete: {:?}", first.map(|r| (r.status, r.body.len())));
    assert!(!cached_blob(&data, &layer), "a corrupt blob was cached");
    assert_eq!(metric(&scrape(&ferry), "ferry_digest_mismatches_total"), 1.0);

    let retry = http_request("GET", &url, &[]).unwrap();
    assert_eq!(sha256_bytes(&retry.body), layer);
    assert_eq!(liar.count("GET", &layer), 1, "the lying upstream is not asked again");
    wait_cached(&data, std::slice::from_ref(&layer));
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
}

#[test]
fn a_429_opens_the_circuit_for_retry_after() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[1024], 108);
    let throttled = StaticServer::status(429);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(throttled.url()).opt("backoff", "30s"), upstream(registry.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    assert_eq!(throttled.requests().len(), 1, "a rate-limited upstream is left alone after one 429");
}

#[test]
fn starts_with_every_upstream_down_serves_its_cache_and_recovers() {
    let work = tmp_dir();
    let (mut registry, image) = seeded(work.path(), &[8192], 109);
    let layout2 = work.path().join("later");
    let later = build_image(&layout2, "v2", &[4096], 110);
    push_layout(&layout2, "v2", &format!("{}/library/app:v2", registry.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(registry.url()).opt("backoff", "500ms").opt("max_backoff", "1s")]);
    let mut ferry = Ferry::start(&cfg.yaml());
    pull_to_dir(&format!("{}/app:v1", ferry.host()), work.path().join("warm")).unwrap();

    registry.stop();
    ferry.restart();
    let cached = work.path().join("cached");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &cached).unwrap();
    assert_image(&cached, &image);
    let down = http_request("GET", &format!("{}/v2/library/app/manifests/v2", ferry.url()), &[]).unwrap();
    assert_eq!(down.status, 503);

    registry.restart();
    // The circuit closes on its next probe (back-off at most 1 s): poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut status = 0;
    while Instant::now() < deadline {
        status =
            http_request("GET", &format!("{}/v2/library/app/manifests/v2", ferry.url()), &[("Accept", OCI_MANIFEST)])
                .map(|r| r.status)
                .unwrap_or(0);
        if status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status, 200, "Ferry did not recover when the upstream returned");
    let out = work.path().join("later-out");
    pull_to_dir(&format!("{}/app:v2", ferry.host()), &out).unwrap();
    assert_image(&out, &later);
}

#[test]
fn a_pull_only_mirror_serves_bytes_but_never_decides_what_a_tag_means() {
    let work = tmp_dir();
    // The trusted registry has moved v1 to a new image; the mirror still has the old v1, and
    // (as mirrors do) the new image's content by digest.
    let trusted = Registry::start();
    let mirror = Registry::start();
    let layout = work.path().join("layout");
    let old = build_image(&layout, "old", &[4096], 111);
    let new = build_image(&layout, "new", &[8192], 112);
    push_layout(&layout, "new", &format!("{}/library/app:v1", trusted.host()), false).unwrap();
    push_layout(&layout, "old", &format!("{}/library/app:v1", mirror.host()), false).unwrap();
    push_layout(&layout, "new", &format!("{}/library/app:synced", mirror.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(mirror.url()).opt("capabilities", ["pull"]), upstream(trusted.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &new);
    assert_ne!(old.manifest_digest, new.manifest_digest);
    assert_eq!(mirror.count_requests("GET", "/manifests/v1"), 0, "the mirror was asked what v1 means");
    assert_eq!(mirror.count_requests("HEAD", "/manifests/v1"), 0);
    for d in new.blob_digests() {
        assert_eq!(mirror.count_requests("GET", &format!("/blobs/{d}")), 1, "blob {d} from the mirror");
        assert_eq!(trusted.count_requests("GET", &format!("/blobs/{d}")), 0, "blob {d} from the trusted one");
    }
}

#[test]
fn several_registries_behind_one_ferry_by_ns_and_by_path_prefix() {
    let work = tmp_dir();
    let hub = Registry::start();
    let ghcr = Registry::start();
    let layout = work.path().join("layout");
    let a = build_image(&layout, "a", &[1024], 113);
    let b = build_image(&layout, "b", &[2048], 114);
    push_layout(&layout, "a", &format!("{}/library/tool:1", hub.host()), false).unwrap();
    push_layout(&layout, "b", &format!("{}/org/tool:1", ghcr.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(hub.url())])
        .registry("ghcr.io", [upstream(ghcr.url())]);
    let ferry = Ferry::start(&cfg.yaml());

    let via_prefix = work.path().join("prefix");
    pull_to_dir(&format!("{}/ghcr.io/org/tool:1", ferry.host()), &via_prefix).unwrap();
    assert_image(&via_prefix, &b);
    let via_default = work.path().join("default");
    pull_to_dir(&format!("{}/tool:1", ferry.host()), &via_default).unwrap();
    assert_image(&via_default, &a);
    let ns = http_request(
        "GET",
        &format!("{}/v2/org/tool/manifests/1?ns=ghcr.io", ferry.url()),
        &[("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(ns.body, b.manifest_bytes);
    let ns_hub = http_request(
        "GET",
        &format!("{}/v2/library/tool/manifests/1?ns=docker.io", ferry.url()),
        &[("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(ns_hub.body, a.manifest_bytes);
    assert_eq!(ghcr.count_requests("GET", "/library/"), 0, "docker.io names never reach ghcr.io");
}

#[test]
fn hedging_races_the_next_upstream_and_cancels_the_loser() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[4096], 115);
    let slow = StaticServer::hang();
    // Without hedging this upstream would hold each request for ten minutes.
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(slow.url()).opt("first_byte_timeout", "10m"), upstream(registry.url())])
        .registry_opt("docker.io", "hedge_delay", "200ms");
    let ferry = Ferry::start(&cfg.yaml());
    let resp = http_request_timeout(
        "GET",
        &format!("{}/v2/library/app/manifests/v1", ferry.url()),
        &[("Accept", OCI_MANIFEST)],
        Duration::from_secs(60),
    )
    .expect("hedging did not answer from the second upstream");
    assert_eq!(resp.body, image.manifest_bytes);
    assert!(slow.count("GET", "/manifests/v1") >= 1, "the first upstream was asked first");
    assert!(slow.wait_for_active_connections(0, Duration::from_secs(10)), "the losing request was not cancelled");
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
}

/// Header lines, names lower-cased.
type Headers = Vec<(String, String)>;

/// Reads one HTTP request head: (method, path, headers).
fn read_head(conn: &mut std::net::TcpStream) -> Option<(String, String, Headers)> {
    use std::io::Read;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((method, path, headers))
}

fn respond(conn: &mut std::net::TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    use std::io::Write;
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.write_all(body);
}

/// Serves one connection at a time on `listener` with `handle`, until the test ends.
fn serve_forever(
    listener: std::net::TcpListener,
    handle: impl Fn(String, String, Headers, &mut std::net::TcpStream) + Send + 'static,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming().take(10_000) {
            let Ok(mut conn) = conn else { continue };
            if let Some((m, p, h)) = read_head(&mut conn) {
                handle(m, p, h, &mut conn);
            }
        }
    });
}

#[test]
fn blob_redirects_to_another_host_are_followed_without_the_authorization_header() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[256 * 1024], 116);
    // The "CDN": another host (127.0.0.2), serving blob bytes, recording what it was sent.
    let cdn = std::net::TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let cdn_port = cdn.local_addr().unwrap().port();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Headers>>> = Default::default();
    let (seen2, reg_url) = (seen.clone(), registry.url());
    serve_forever(cdn, move |_, path, headers, conn| {
        seen2.lock().unwrap().push(headers);
        let digest = path.trim_start_matches("/cdn/");
        let blob = http_request("GET", &format!("{reg_url}/v2/library/app/blobs/{digest}"), &[]).unwrap();
        respond(conn, "200 OK", &[("Content-Type".into(), "application/octet-stream".into())], &blob.body);
    });
    // The registry front: Basic auth required; blob GETs are redirected to the CDN.
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front_url = format!("http://{}", front.local_addr().unwrap());
    let (reg_url, auth) = (registry.url(), basic_auth("mirror", "pw"));
    serve_forever(front, move |method, path, headers, conn| {
        let get = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
        if get("authorization").as_deref() != Some(auth.as_str()) {
            let challenge = [("WWW-Authenticate".to_owned(), "Basic realm=\"front\"".to_owned())];
            return respond(conn, "401 Unauthorized", &challenge, b"{}");
        }
        if method == "GET" && path.contains("/blobs/") {
            let digest = path.rsplit('/').next().unwrap_or_default();
            let to = [("Location".to_owned(), format!("http://127.0.0.2:{cdn_port}/cdn/{digest}"))];
            return respond(conn, "307 Temporary Redirect", &to, b"");
        }
        let accept = get("accept").unwrap_or_default();
        let up = http_request(&method, &format!("{reg_url}{path}"), &[("Accept", &accept)]).unwrap();
        let keep: Vec<(String, String)> = up
            .headers
            .iter()
            .filter(|(k, _)| matches!(k.to_ascii_lowercase().as_str(), "content-type" | "docker-content-digest"))
            .cloned()
            .collect();
        respond(conn, &format!("{} X", up.status), &keep, &up.body);
    });
    let cfg =
        FerryConfig::new(work.path().join("data")).registry("docker.io", [upstream(&front_url).creds("mirror", "pw")]);
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), image.blob_digests().len(), "every blob came from the CDN");
    for headers in seen.iter() {
        assert!(!headers.iter().any(|(k, _)| k == "authorization"), "credentials leaked to the CDN: {headers:?}");
    }
}

#[test]
fn a_manifest_that_is_not_one_is_an_upstream_fault_never_cached() {
    let work = tmp_dir();
    let (registry, image) = seeded(work.path(), &[2048], 121);
    // A captive portal or broken mirror: 200 and an HTML body.
    let (bad, bad_log) = recording_server("127.0.0.1:0", "200 OK", vec![], "<html>log in first</html>");
    let cfg = FerryConfig::new(work.path().join("data"))
        // Asked what tags mean only: its blobs would fail their digests (tested elsewhere).
        .registry(
            "docker.io",
            [upstream(format!("http://{bad}")).opt("capabilities", ["resolve"]), upstream(registry.url())],
        );
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    assert!(!bad_log.lock().unwrap().is_empty(), "the broken upstream was asked first");
    let page = scrape(&ferry);
    assert_eq!(metric(&page, &format!("ferry_upstream_invalid_manifests_total{{upstream=\"{bad}\"}}")), 1.0, "{page}");

    // Alone, the broken upstream's answer is refused and nothing of it is stored.
    let alone = FerryConfig::new(work.path().join("alone")).registry("docker.io", [upstream(format!("http://{bad}"))]);
    let alone = Ferry::start(&alone.yaml());
    let resp = http_request("GET", &format!("{}/v2/library/app/manifests/v1", alone.url()), &[]).unwrap();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains("invalid manifest"), "{}", resp.text());
    let stored = work.path().join("alone/objects/manifests/sha256");
    assert!(!stored.exists() || fs::read_dir(&stored).unwrap().next().is_none(), "nothing cached");
}

//! Operating Ferry: Prometheus metrics from a real scrape, HTTPS with HTTP/2 and a certificate
//! reloaded on SIGHUP, graceful SIGTERM, health endpoints and JSON logs.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

fn series(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sorted = labels.to_vec();
    sorted.sort();
    let inner: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    metric(page, &format!("{name}{{{}}}", inner.join(",")))
}

#[test]
fn metrics_show_a_miss_then_a_hit_bytes_by_source_and_upstream_requests() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[100_000, 50_000], 601);
    push_layout(&layout, "v1", &format!("{}/library/m:v1", registry.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(registry.url())])
        .set("cache.tag_ttl", "1h")
        .set("metrics.listen", "127.0.0.1:0");
    let ferry = Ferry::start(&cfg.yaml());
    let blob_bytes: u64 = image.layers.iter().map(|(_, s)| s).sum::<u64>() + image.config_bytes.len() as u64;
    // Upstreams are labelled by name (default: host:port), never by URL.
    let up = registry.host();

    pull_to_dir(&format!("{}/library/m:v1", ferry.host()), work.path().join("a")).unwrap();
    let page = scrape(&ferry);
    assert_eq!(series(&page, "ferry_cache_requests_total", &[("kind", "blob"), ("result", "miss")]), 3.0, "{page}");
    assert_eq!(series(&page, "ferry_cache_requests_total", &[("kind", "blob"), ("result", "hit")]), 0.0);
    assert_eq!(series(&page, "ferry_cache_requests_total", &[("kind", "manifest"), ("result", "miss")]), 1.0);
    assert_eq!(series(&page, "ferry_upstream_requests_total", &[("status", "200"), ("upstream", &up)]), 4.0, "{page}");
    assert_eq!(series(&page, "ferry_upstream_bytes_total", &[("upstream", &up)]), blob_bytes as f64);
    assert!(series(&page, "ferry_bytes_served_total", &[("source", "upstream")]) >= blob_bytes as f64);
    assert_eq!(series(&page, "ferry_bytes_served_total", &[("source", "cache")]), 0.0);

    pull_to_dir(&format!("{}/library/m:v1", ferry.host()), work.path().join("b")).unwrap();
    eventually("three blobs accounted", || metric(&scrape(&ferry), "ferry_cache_blobs") == 3.0);
    let page = scrape(&ferry);
    assert_eq!(series(&page, "ferry_cache_requests_total", &[("kind", "blob"), ("result", "hit")]), 3.0, "{page}");
    assert_eq!(series(&page, "ferry_cache_requests_total", &[("kind", "manifest"), ("result", "hit")]), 1.0);
    assert_eq!(series(&page, "ferry_upstream_requests_total", &[("status", "200"), ("upstream", &up)]), 4.0);
    assert!(series(&page, "ferry_bytes_served_total", &[("source", "cache")]) >= blob_bytes as f64);
    assert_eq!(series(&page, "ferry_upstream_up", &[("upstream", &up)]), 1.0);
    assert_eq!(metric(&page, "ferry_cache_blobs"), 3.0);
    assert_eq!(metric(&page, "ferry_cache_size_bytes"), blob_bytes as f64);
    assert!(
        series(&page, "ferry_http_requests_total", &[("method", "GET"), ("route", "blob"), ("status", "200")]) >= 6.0
    );
    assert!(!page.contains("library/m"), "a repository name became a label");

    for path in ["/healthz", "/readyz"] {
        assert_eq!(http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap().status, 200, "{path}");
    }

    // The operations-only listener serves the same metrics and nothing of the registry API.
    let log = ferry.log_text();
    let marker = "operations endpoints on http://";
    let ops = log[log.find(marker).expect("ops listener logged") + marker.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect::<String>();
    let ops_page = http_request("GET", &format!("http://{ops}/metrics"), &[]).unwrap();
    assert_eq!(ops_page.status, 200);
    assert!(ops_page.text().contains("ferry_cache_requests_total"));
    assert_eq!(http_request("GET", &format!("http://{ops}/v2/"), &[]).unwrap().status, 404);
}

/// A self-signed certificate for 127.0.0.1 in `dir` (cert.pem, key.pem), common name `cn`.
fn self_signed(dir: &Path, cn: &str) {
    fs::create_dir_all(dir).unwrap();
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={cn}"))
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn https_with_http2_and_a_certificate_reloaded_on_sighup() {
    require_tool("openssl");
    require_tool("curl");
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[20_000], 602);
    push_layout(&layout, "v1", &format!("{}/library/tls:v1", registry.host()), false).unwrap();
    let tls = work.path().join("tls");
    self_signed(&tls, "ferry-one");
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(registry.url())])
        .set("tls.cert", tls.join("cert.pem"))
        .set("tls.key", tls.join("key.pem"));
    let mut ferry = Ferry::start(&cfg.yaml());
    assert!(ferry.log_text().contains(&format!("listening on https://{}", ferry.host())));
    let base = format!("https://{}", ferry.host());

    // skopeo verifies the certificate from --src-cert-dir (a *.crt there is a trusted CA).
    let certs = work.path().join("certs.d");
    fs::create_dir_all(&certs).unwrap();
    fs::copy(tls.join("cert.pem"), certs.join("ferry.crt")).unwrap();
    let out = work.path().join("out");
    skopeo_ok(&[
        "copy",
        "--src-cert-dir",
        certs.to_str().unwrap(),
        &format!("docker://{}/library/tls:v1", ferry.host()),
        &format!("dir:{}", out.display()),
    ])
    .unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), image.manifest_bytes);

    // HTTP/2 by ALPN for a client that offers it; HTTP/1.1 for one that does not.
    let cacert = tls.join("cert.pem");
    let cacert = cacert.to_str().unwrap();
    let (ok, version) =
        curl(&["--http2", "--cacert", cacert, "-o", "/dev/null", "-w", "%{http_version}", &format!("{base}/v2/")]);
    assert!(ok && version == "2", "{version}");
    let (ok, version) =
        curl(&["--http1.1", "--cacert", cacert, "-o", "/dev/null", "-w", "%{http_version}", &format!("{base}/v2/")]);
    assert!(ok && version == "1.1", "{version}");

    // A new certificate on disk + SIGHUP: new handshakes use it, without a restart.
    let old = tls.join("old.pem");
    fs::copy(tls.join("cert.pem"), &old).unwrap();
    self_signed(&tls, "ferry-two");
    let kill = Command::new("kill").args(["-HUP", &ferry.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    assert!(ferry.wait_for_log("TLS certificate reloaded", Duration::from_secs(10)), "{}", ferry.log_text());
    let (ok, _) = curl(&["--cacert", cacert, "-o", "/dev/null", &format!("{base}/v2/")]);
    assert!(ok, "the new certificate is served");
    let (ok, err) = curl(&["--cacert", old.to_str().unwrap(), "-o", "/dev/null", &format!("{base}/v2/")]);
    assert!(!ok, "the old certificate is still served: {err}");
    assert!(ferry.is_running());
}

#[test]
fn sigterm_lets_a_large_download_finish_then_exits_zero() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[64 << 20], 603);
    push_layout(&layout, "v1", &format!("{}/library/big:v1", registry.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(registry.url())])
        .set("shutdown_grace", "60s")
        .set("log.format", "json");
    let mut ferry = Ferry::start(&cfg.yaml());
    let (layer, size) = image.layers[0].clone();
    let path = format!("/v2/library/big/blobs/{layer}");
    // Warm the cache so the download below is served from disk.
    assert_eq!(sha256_bytes(&http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap().body), layer);

    let mut conn = TcpStream::connect(ferry.host()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", ferry.host()).unwrap();
    let mut received = Vec::with_capacity(size as usize + 4096);
    let mut buf = vec![0u8; 64 * 1024];
    while received.len() < (1 << 20) {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0);
        received.extend_from_slice(&buf[..n]);
    }
    // SIGTERM mid-download: no new connections, but this response completes.
    assert!(Command::new("kill").args(["-TERM", &ferry.pid().to_string()]).status().unwrap().success());
    assert!(ferry.wait_for_log("shutting down", Duration::from_secs(10)), "{}", ferry.log_text());
    assert!(TcpStream::connect(ferry.host()).is_err(), "still accepting after SIGTERM");
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    let split = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(received.starts_with(b"HTTP/1.1 200"));
    assert_eq!(received.len() - split, size as usize, "the download was cut short");
    assert_eq!(sha256_bytes(&received[split..]), layer);
    let status = ferry.terminate_within(Duration::from_secs(30)).expect("ferry exits after the download");
    assert_eq!(status.code(), Some(0), "{}", ferry.log_text());
    // JSON logs: one object per line, access lines included.
    let access = ferry.log_text().lines().find(|l| l.contains("\"target\":\"ferry::access\"")).map(str::to_owned);
    let access: serde_json::Value = serde_json::from_str(&access.expect("an access log line")).unwrap();
    assert!(access["fields"]["status"].is_number(), "{access}");
}

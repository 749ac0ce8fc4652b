//! The cache end to end: one upstream fetch per blob however many clients, fetches that outlive
//! their first client, tag freshness and revalidation, stale-if-error, and a bounded disk.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// Ferry storing under `storage`, mirroring docker.io from `upstream`.
fn config(storage: &Path, upstream_url: &str) -> FerryConfig {
    FerryConfig::new(storage).registry("docker.io", [upstream(upstream_url)])
}

fn blob_gets(upstream: &Registry, digest: &str) -> usize {
    upstream.count_requests("GET", &format!("/blobs/{digest}"))
}

fn manifest_requests(upstream: &Registry, method: &str, reference: &str) -> usize {
    upstream.count_requests(method, &format!("/manifests/{reference}"))
}

/// Bytes of committed blobs under a Ferry storage root.
fn stored_blob_bytes(root: &Path) -> u64 {
    let mut total = 0;
    for shard in fs::read_dir(store_path(root, "blobs/sha256")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            total += f.unwrap().metadata().unwrap().len();
        }
    }
    total
}

#[test]
fn twenty_concurrent_cold_pulls_cause_one_upstream_get_per_blob() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[16 << 20, 4 << 20, 1024], 21);
    push_layout(&layout, "v1", &format!("{}/library/crowd:v1", upstream.host()), false).unwrap();
    let ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url()).yaml());

    let pulls: Vec<_> = (0..20)
        .map(|i| {
            let src = format!("{}/library/crowd:v1", ferry.host());
            let dest = work.path().join(format!("out{i}"));
            std::thread::spawn(move || pull_to_dir(&src, &dest).map(|_| dest))
        })
        .collect();
    for p in pulls {
        let dest = p.join().unwrap().unwrap();
        assert_eq!(fs::read(dest.join("manifest.json")).unwrap(), image.manifest_bytes);
        for digest in image.blob_digests() {
            assert_eq!(sha256_file(dest.join(digest_hex(&digest))), digest);
        }
    }
    for digest in image.blob_digests() {
        assert_eq!(blob_gets(&upstream, &digest), 1, "upstream GETs of {digest}");
    }
    assert_eq!(manifest_requests(&upstream, "GET", "v1"), 1, "one upstream manifest fetch");
}

#[test]
fn a_client_leaving_early_does_not_cancel_the_fetch() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[200 << 20], 22);
    push_layout(&layout, "v1", &format!("{}/library/big:v1", upstream.host()), false).unwrap();
    let ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url()).yaml());
    let (layer, size) = image.layers[0].clone();
    let path = format!("/v2/library/big/blobs/{layer}");

    // Read the first MiB of the cold blob, then hang up.
    let mut conn = TcpStream::connect(ferry.host()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", ferry.host()).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < (1 << 20) {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        got += n;
    }
    drop(conn);

    // The next client gets the whole blob, and the upstream served it only once.
    let full = http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap();
    assert_eq!(full.status, 200);
    assert_eq!(full.body.len() as u64, size);
    assert_eq!(sha256_bytes(&full.body), layer);
    assert_eq!(blob_gets(&upstream, &layer), 1);
    let again = http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap();
    assert_eq!(sha256_bytes(&again.body), layer);
    assert_eq!(blob_gets(&upstream, &layer), 1);
}

#[test]
fn tags_are_free_within_the_ttl_then_revalidated_with_one_head() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let first = build_image(&layout, "v1", &[2048], 31);
    push_layout(&layout, "v1", &format!("{}/library/fresh:v1", upstream.host()), false).unwrap();
    let manifest_url = |ferry: &Ferry| format!("{}/v2/library/fresh/manifests/v1", ferry.url());
    let get = |ferry: &Ferry| http_request("GET", &manifest_url(ferry), &[("Accept", OCI_MANIFEST)]).unwrap();

    // A long TTL: the second pull by tag costs the upstream nothing.
    let long = Ferry::start(&config(&work.path().join("long"), &upstream.url()).set("cache.tag_ttl", "1h").yaml());
    assert_eq!(get(&long).body, first.manifest_bytes);
    let before = (manifest_requests(&upstream, "GET", "v1"), manifest_requests(&upstream, "HEAD", "v1"));
    assert_eq!(get(&long).body, first.manifest_bytes);
    assert_eq!((manifest_requests(&upstream, "GET", "v1"), manifest_requests(&upstream, "HEAD", "v1")), before);

    // A TTL that has always passed (0 s: no test waits for time to pass; the TTL's arithmetic
    // is covered in-process with a manual clock, src/cache/tests.rs): one HEAD revalidates
    // and no body moves.
    let short = Ferry::start(&config(&work.path().join("short"), &upstream.url()).set("cache.tag_ttl", "0s").yaml());
    assert_eq!(get(&short).body, first.manifest_bytes);
    let gets = manifest_requests(&upstream, "GET", "v1");
    let heads = manifest_requests(&upstream, "HEAD", "v1");
    let revalidated = get(&short);
    assert_eq!(revalidated.body, first.manifest_bytes);
    assert_eq!(manifest_requests(&upstream, "HEAD", "v1"), heads + 1);
    assert_eq!(manifest_requests(&upstream, "GET", "v1"), gets);

    // The tag moves upstream: after the TTL, the new digest is served.
    let second = build_image(&layout, "v1", &[4096], 32);
    push_layout(&layout, "v1", &format!("{}/library/fresh:v1", upstream.host()), false).unwrap();
    let moved = get(&short);
    assert_eq!(moved.body, second.manifest_bytes);
    assert_eq!(moved.header("docker-content-digest"), Some(second.manifest_digest.as_str()));
}

#[test]
fn expired_tags_are_served_stale_when_every_upstream_is_down() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[8192], 41);
    push_layout(&layout, "v1", &format!("{}/library/stale:v1", upstream.host()), false).unwrap();
    // tag_ttl 0 s: the tag is past its TTL at once (no sleeping for it).
    let ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url()).set("cache.tag_ttl", "0s").yaml());
    pull_to_dir(&format!("{}/library/stale:v1", ferry.host()), work.path().join("a")).unwrap();
    upstream.stop();
    let out = work.path().join("b");
    pull_to_dir(&format!("{}/library/stale:v1", ferry.host()), &out).unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), image.manifest_bytes);
    assert!(ferry.log_text().contains("serving stale tag"), "stale service is logged");
    let never = http_request("GET", &format!("{}/v2/library/never/manifests/v1", ferry.url()), &[]).unwrap();
    assert_eq!(never.status, 503, "{}", never.text());
}

#[test]
fn cached_manifests_and_tags_survive_a_restart() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[8192], 51);
    push_layout(&layout, "v1", &format!("{}/library/durable:v1", upstream.host()), false).unwrap();
    let mut ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url()).yaml());
    pull_to_dir(&format!("{}/library/durable:v1", ferry.host()), work.path().join("a")).unwrap();
    upstream.stop();
    ferry.restart();
    let out = work.path().join("b");
    pull_to_dir(&format!("{}/library/durable:v1", ferry.host()), &out).unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), image.manifest_bytes);
}

#[test]
fn max_size_evicts_least_recently_used_blobs() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let one = build_image(&layout, "one", &[6 << 20], 61);
    let two = build_image(&layout, "two", &[6 << 20], 62);
    push_layout(&layout, "one", &format!("{}/library/evict:one", upstream.host()), false).unwrap();
    push_layout(&layout, "two", &format!("{}/library/evict:two", upstream.host()), false).unwrap();
    let data = work.path().join("data");
    let max = 10u64 << 20;
    let ferry = Ferry::start(&config(&data, &upstream.url()).set("storage.max_size", "10MiB").yaml());

    // Eviction runs just after a blob's verdict, off the client's path: poll (bounded).
    let settles_under_max = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stored_blob_bytes(&data) > max {
            assert!(std::time::Instant::now() < deadline, "{} bytes stored", stored_blob_bytes(&data));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    pull_to_dir(&format!("{}/library/evict:one", ferry.host()), work.path().join("one")).unwrap();
    wait_cached(&data, &one.blob_digests());
    settles_under_max();
    let out = work.path().join("two");
    pull_to_dir(&format!("{}/library/evict:two", ferry.host()), &out).unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), two.manifest_bytes);
    wait_cached(&data, &two.blob_digests());
    settles_under_max();
    let (one_layer, _) = &one.layers[0];
    let (two_layer, _) = &two.layers[0];
    let shard = |d: &str| store_path(&data, &blob_key(d));
    assert!(!shard(one_layer).exists(), "the older image's layer was evicted");
    assert!(shard(two_layer).exists(), "the newer image's layer stays");

    // The evicted image still pulls (fetched again).
    let again = work.path().join("one-again");
    pull_to_dir(&format!("{}/library/evict:one", ferry.host()), &again).unwrap();
    assert_eq!(sha256_file(again.join(digest_hex(one_layer))), *one_layer);
    assert_eq!(blob_gets(&upstream, one_layer), 2);
    let metrics = http_request("GET", &format!("{}/metrics", ferry.url()), &[]).unwrap().text();
    assert!(metrics.lines().any(|l| l.starts_with("ferry_cache_evictions_total") && !l.ends_with(" 0")), "{metrics}");
}

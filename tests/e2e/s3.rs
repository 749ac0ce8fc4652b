//! Ferry on S3-compatible object storage (`storage.s3`): a real S3 server (s3s-fs) whose bucket
//! the tests read as a directory, real Distribution upstreams and real skopeo pulls and pushes.
//! Several Ferrys on one bucket are replicas sharing one store.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::harness::fault::{Fault, FaultProxy};
use crate::harness::*;

const PREFIX: &str = "mirror/";
const ALICE: Creds<'static> = ("alice", "alice-pw");

/// A Ferry config mirroring docker.io from `upstream`, storing in `s3`'s bucket (local staging
/// under `root`).
fn on_bucket(root: &Path, s3: &S3Server, upstream_url: &str) -> FerryConfig {
    FerryConfig::new(root).registry("docker.io", [upstream(upstream_url)]).set("storage.s3", s3.section(PREFIX))
}

/// The bucket key of blob `digest` under [`PREFIX`].
fn bucket_key(digest: &str) -> String {
    format!("{PREFIX}{}", blob_key(digest))
}

fn assert_image(dir: &Path, image: &Image) {
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), image.manifest_bytes);
    for d in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&d))), d, "blob {d} as pulled");
    }
}

/// Files under `root/blobs` (the local store, which a bucket-backed Ferry without a hot tier
/// never fills) and `root/tmp` (staging, empty once every fetch ended).
fn local_files(root: &Path, dir: &str) -> usize {
    let mut n = 0;
    let mut dirs = vec![root.join(dir)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

fn ferry_cache(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ferry_bin()).arg("cache").args(args).arg("--config").arg(config).output().unwrap()
}

#[test]
fn a_cold_pull_lands_in_the_bucket_and_a_second_replica_serves_it_with_every_upstream_down() {
    let s3 = S3Server::start();
    let mut registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    // 12 MiB: three 5 MiB parts, so the commit is a multipart upload.
    let image = build_image(&layout, "v1", &[12 << 20, 300 << 10], 71);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", registry.host()), false).unwrap();

    let a_root = work.path().join("a");
    let a = Ferry::start(&on_bucket(&a_root, &s3, &registry.url()).yaml());
    let out = work.path().join("pulled-a");
    pull_to_dir(&format!("{}/library/app:v1", a.host()), &out).unwrap();
    assert_image(&out, &image);
    for d in image.blob_digests() {
        eventually("the verified blob is in the bucket", || s3.object_path(&bucket_key(&d)).exists());
        assert_eq!(sha256_file(s3.object_path(&bucket_key(&d))), d, "the bucket holds exactly the verified bytes");
    }
    let records = s3.keys(&format!("{PREFIX}objects/manifests/"));
    assert_eq!(records.len(), 1, "one manifest record: {records:?}");
    assert_eq!(s3.keys(&format!("{PREFIX}objects/tags/docker.io/library/app/")).len(), 1, "the tag entry");
    eventually("staging emptied", || local_files(&a_root, "tmp") == 0);
    assert_eq!(local_files(&a_root, "blobs"), 0, "without a hot tier nothing is kept on local disk");
    assert_eq!(s3.pending_upload_parts(), 0, "every multipart upload completed");

    // A second replica with an empty local disk, and no upstream at all.
    registry.stop();
    let b_root = work.path().join("b");
    let b = Ferry::start(&on_bucket(&b_root, &s3, &registry.url()).yaml());
    let out = work.path().join("pulled-b");
    pull_to_dir(&format!("{}/library/app@{}", b.host(), image.manifest_digest), &out).unwrap();
    assert_image(&out, &image);
    let page = scrape(&b);
    assert_eq!(metric(&page, r#"ferry_cache_requests_total{kind="blob",result="hit"}"#), 3.0, "every blob is a hit");
    assert_eq!(metric(&page, r#"ferry_cache_requests_total{kind="blob",result="miss"}"#), 0.0);

    // The admin commands work on the bucket.
    let stats = ferry_cache(&b.config_path(), &["stats"]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("store:      s3://ferry/mirror") && text.contains("blobs:      3"), "{text}");
    let verify = ferry_cache(&b.config_path(), &["verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("blobs verified: 3"));
    let prune = ferry_cache(&b.config_path(), &["prune", "--max-size", "1MiB"]);
    assert!(prune.status.success(), "{}", String::from_utf8_lossy(&prune.stderr));
    assert!(!s3.object_path(&bucket_key(&image.layers[0].0)).exists(), "prune removed the big layer from the bucket");
    let left: u64 =
        s3.keys(&format!("{PREFIX}blobs/")).iter().map(|k| fs::metadata(s3.object_path(k)).unwrap().len()).sum();
    assert!(left <= 1 << 20, "the bucket's blobs fit in 1 MiB after prune: {left}");
}

#[test]
fn a_corrupt_upstream_blob_never_appears_in_the_bucket() {
    let s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[11 << 20], 72);
    push_layout(&layout, "v1", &format!("{}/library/bad:v1", registry.host()), false).unwrap();
    let proxy = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::CorruptByte(9 << 20)));
    let root = work.path().join("data");
    // The liar first; the real registry serves the retry (the liar's circuit is then open).
    let cfg =
        on_bucket(&root, &s3, &proxy.url()).registry("docker.io", [upstream(proxy.url()), upstream(registry.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let layer = &image.layers[0].0;

    match http_request("GET", &format!("{}/v2/library/bad/blobs/{layer}", ferry.url()), &[]) {
        Ok(r) => assert_ne!(r.status, 200, "a corrupt blob is never served whole"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "cut before its last byte: {e}"),
    }
    eventually("the fetch ended", || metric(&scrape(&ferry), "ferry_inflight_fetches") == 0.0);
    assert!(s3.keys(&format!("{PREFIX}blobs/")).is_empty(), "nothing unverified in the bucket");
    eventually("any upload begun alongside the fetch is aborted", || s3.pending_upload_parts() == 0);
    eventually("staging emptied", || local_files(&root, "tmp") == 0);

    let r = http_request("GET", &format!("{}/v2/library/bad/blobs/{layer}", ferry.url()), &[]).unwrap();
    assert_eq!((r.status, sha256_bytes(&r.body)), (200, layer.clone()));
    eventually("the good blob is in the bucket", || s3.object_path(&bucket_key(layer)).exists());
    assert_eq!(sha256_file(s3.object_path(&bucket_key(layer))), *layer);
    assert_eq!(proxy.count("GET", layer), 1, "the corrupt fetch was not retried from the liar");
}

#[test]
fn with_redirect_a_hit_is_a_307_to_a_presigned_url_that_needs_no_authorization() {
    let s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[2 << 20], 73);
    push_layout(&layout, "v1", &format!("{}/library/redir:v1", registry.host()), false).unwrap();
    let cfg = on_bucket(&work.path().join("data"), &s3, &registry.url())
        .set("storage.s3.redirect", Yaml::Bare("true".into()));
    let ferry = Ferry::start(&cfg.yaml());
    // The first pull is a miss: streamed by Ferry while it fills the bucket.
    pull_to_dir(&format!("{}/library/redir:v1", ferry.host()), work.path().join("first")).unwrap();
    let layer = &image.layers[0].0;
    eventually("cached", || s3.object_path(&bucket_key(layer)).exists());

    let r = http_request("GET", &format!("{}/v2/library/redir/blobs/{layer}", ferry.url()), &[]).unwrap();
    assert_eq!(r.status, 307);
    assert_eq!(r.header("docker-content-digest"), Some(layer.as_str()));
    let location = r.header("location").expect("a Location").to_owned();
    assert!(location.starts_with(&s3.url()) && location.contains("X-Amz-Signature="), "{location}");
    let direct = http_request("GET", &location, &[]).unwrap();
    assert_eq!((direct.status, sha256_bytes(&direct.body)), (200, layer.clone()), "the URL alone fetches the blob");
    // Same URL, last hex digit of the signature changed.
    let forged = match location.strip_suffix('0') {
        Some(rest) => format!("{rest}1"),
        None => format!("{}0", &location[..location.len() - 1]),
    };
    assert!(location.rsplit('&').next().unwrap().starts_with("X-Amz-Signature="), "{location}");
    let refused = http_request("GET", &forged, &[]).unwrap();
    assert_eq!(refused.status, 403, "the URL is really signed: {}", refused.text());
    let head = http_request("HEAD", &format!("{}/v2/library/redir/blobs/{layer}", ferry.url()), &[]).unwrap();
    assert_eq!(head.status, 200, "HEAD is answered by Ferry");

    // A real client follows the redirect.
    let out = work.path().join("second");
    pull_to_dir(&format!("{}/library/redir:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
}

#[test]
fn a_push_to_one_replica_is_pulled_from_another() {
    let s3 = S3Server::start();
    let work = tmp_dir();
    let htpasswd = write_htpasswd(work.path(), &[ALICE]);
    let replica = |name: &str| {
        let cfg = on_bucket(&work.path().join(name), &s3, "http://127.0.0.1:9")
            .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd).delete(true));
        Ferry::start(&cfg.yaml())
    };
    let (a, b) = (replica("a"), replica("b"));
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[7 << 20, 64 << 10], 74);
    push_layout_creds(&layout, "v1", &format!("{}/internal/app:v1", a.host()), false, ALICE).unwrap();
    for d in image.blob_digests() {
        assert_eq!(sha256_file(s3.object_path(&bucket_key(&d))), d, "pushed blob in the bucket");
    }
    let out = work.path().join("pulled");
    pull_to_dir_creds(&format!("{}/internal/app:v1", b.host()), &out, ALICE).unwrap();
    assert_image(&out, &image);
    let tags = http_request(
        "GET",
        &format!("{}/v2/internal/app/tags/list", b.url()),
        &[("Authorization", &basic_auth(ALICE.0, ALICE.1))],
    )
    .unwrap();
    assert_eq!(tags.status, 200);
    assert!(tags.text().contains("\"v1\""), "{}", tags.text());
}

#[test]
fn a_hot_tier_keeps_hot_blobs_on_local_disk_and_serves_them_with_the_bucket_down() {
    let mut s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[6 << 20, 1 << 20], 75);
    push_layout(&layout, "v1", &format!("{}/library/hot:v1", registry.host()), false).unwrap();
    let hot = |root: &Path, upstream_url: &str| {
        Ferry::start(&on_bucket(root, &s3, upstream_url).set("storage.hot_tier", "6MiB").yaml())
    };
    // A fetch keeps what fits: the 1 MiB layer and the config, not the 6 MiB layer beside them.
    let a_root = work.path().join("a");
    let a = hot(&a_root, &registry.url());
    pull_to_dir(&format!("{}/library/hot:v1", a.host()), work.path().join("a-pull")).unwrap();
    let (big, small) = (&image.layers[0].0, &image.layers[1].0);
    eventually("kept locally", || local_blob(&a_root, small) && local_blob(&a_root, &image.config_digest));
    eventually("in the bucket", || image.blob_digests().iter().all(|d| s3.object_path(&bucket_key(d)).exists()));

    // Another replica fills its tier from the bucket on the way through.
    let b_root = work.path().join("b");
    let b = hot(&b_root, "http://127.0.0.1:9");
    let r = http_request("GET", &format!("{}/v2/library/hot/blobs/{small}", b.url()), &[]).unwrap();
    assert_eq!((r.status, sha256_bytes(&r.body)), (200, small.clone()));
    eventually("filled from the bucket", || local_blob(&b_root, small));
    assert_eq!(sha256_file(b_root.join("blobs/sha256").join(&digest_hex(small)[..2]).join(digest_hex(small))), *small);

    s3.stop();
    let r = http_request("GET", &format!("{}/v2/library/hot/blobs/{small}", b.url()), &[]).unwrap();
    assert_eq!((r.status, sha256_bytes(&r.body)), (200, small.clone()), "a hot blob needs no bucket");
    let r = http_request("GET", &format!("{}/v2/library/hot/blobs/{big}", b.url()), &[]).unwrap();
    assert_eq!(r.status, 503, "a blob only in the bucket, with the bucket and every upstream down, is unavailable");
    assert!(
        r.text().contains("UNAVAILABLE") && !r.text().contains(&s3.url()),
        "no endpoint in the answer: {}",
        r.text()
    );
    assert!(!local_blob(&b_root, big));
}

#[test]
fn sigkill_while_a_blob_uploads_alongside_its_fetch_leaves_no_object_under_its_key() {
    let s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[12 << 20], 76);
    push_layout(&layout, "v1", &format!("{}/library/crash:v1", registry.host()), false).unwrap();
    // The layer stalls after 7 MiB: one 5 MiB part is durable and uploading, the blob is not.
    let proxy = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::StallAfter(7 << 20)));
    let root = work.path().join("data");
    let cfg = FerryConfig::new(&root)
        .registry("docker.io", [upstream(proxy.url()).opt("idle_timeout", "5m")])
        .set("storage.s3", s3.section(PREFIX));
    let mut ferry = Ferry::start(&cfg.yaml());
    let layer = image.layers[0].0.clone();
    let url = format!("{}/v2/library/crash/blobs/{layer}", ferry.url());
    let pull = std::thread::spawn(move || http_request("GET", &url, &[]));
    eventually("a part uploaded alongside the fetch", || s3.pending_upload_parts() >= 1);
    assert!(s3.keys(&format!("{PREFIX}blobs/")).is_empty(), "nothing visible before the verdict");
    ferry.kill9();
    assert!(pull.join().unwrap().is_err(), "the pull died with its server");
    assert!(s3.keys(&format!("{PREFIX}blobs/")).is_empty(), "a crash mid-upload leaves no object under a blob key");

    proxy.set_fault(Fault::PassThrough);
    ferry.restart();
    let r = http_request("GET", &format!("{}/v2/library/crash/blobs/{layer}", ferry.url()), &[]).unwrap();
    assert_eq!((r.status, sha256_bytes(&r.body)), (200, layer.clone()));
    eventually("the blob is in the bucket", || s3.object_path(&bucket_key(&layer)).exists());
    assert_eq!(sha256_file(s3.object_path(&bucket_key(&layer))), layer);
    assert!(s3.pending_upload_parts() >= 1, "the interrupted upload is left for the bucket's lifecycle rule");
}

#[test]
fn with_the_bucket_down_pulls_still_succeed_and_caching_resumes_when_it_returns() {
    let mut s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let warm = build_image(&layout, "warm", &[1 << 20], 77);
    let cold = build_image(&layout, "cold", &[6 << 20, 70 << 10], 78);
    for tag in ["warm", "cold"] {
        push_layout(&layout, tag, &format!("{}/library/app:{tag}", registry.host()), false).unwrap();
    }
    let root = work.path().join("data");
    let cfg = on_bucket(&root, &s3, &registry.url())
        .set("storage.hot_tier", "64MiB")
        .set("storage.s3.max_retries", Yaml::Bare("1".into()));
    let ferry = Ferry::start(&cfg.yaml());
    pull_to_dir(&format!("{}/library/app:warm", ferry.host()), work.path().join("warm-1")).unwrap();
    eventually("warm is in the bucket", || warm.blob_digests().iter().all(|d| s3.object_path(&bucket_key(d)).exists()));
    assert_eq!(http_request("GET", &format!("{}/readyz", ferry.url()), &[]).unwrap().text(), "ready\n");

    s3.stop();
    let ready = http_request("GET", &format!("{}/readyz", ferry.url()), &[]).unwrap();
    assert_eq!(ready.status, 200, "a replica that cannot reach the bucket still serves");
    assert!(ready.text().starts_with("ready, degraded: the bucket"), "{}", ready.text());
    let out = work.path().join("cold-1");
    pull_to_dir(&format!("{}/library/app:cold", ferry.host()), &out).unwrap();
    assert_image(&out, &cold);
    let out = work.path().join("warm-2");
    pull_to_dir(&format!("{}/library/app:warm", ferry.host()), &out).unwrap();
    assert_image(&out, &warm);
    let page = scrape(&ferry);
    assert!(metric(&page, r#"ferry_storage_errors_total{op="commit"}"#) >= 1.0, "the failed uploads are counted");
    assert!(metric(&page, "ferry_cache_write_errors_total") >= 1.0);
    assert!(!s3.object_path(&bucket_key(&cold.layers[0].0)).exists());

    s3.restart();
    let out = work.path().join("cold-2");
    pull_to_dir(&format!("{}/library/app:cold", ferry.host()), &out).unwrap();
    assert_image(&out, &cold);
    eventually("caching resumed by itself", || {
        cold.blob_digests().iter().all(|d| s3.object_path(&bucket_key(d)).exists())
    });
    assert_eq!(http_request("GET", &format!("{}/readyz", ferry.url()), &[]).unwrap().text(), "ready\n");
}

#[test]
fn containerd_follows_the_redirect_to_the_bucket_and_gets_every_byte() {
    let s3 = S3Server::start();
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[3 << 20, 200 << 10], 79);
    push_layout(&layout, "v1", &format!("{}/library/redir:v1", registry.host()), false).unwrap();
    let cfg = on_bucket(&work.path().join("data"), &s3, &registry.url())
        .set("storage.s3.redirect", Yaml::Bare("true".into()));
    let ferry = Ferry::start(&cfg.yaml());
    pull_to_dir(&format!("{}/library/redir:v1", ferry.host()), work.path().join("warm")).unwrap();
    eventually("cached", || image.blob_digests().iter().all(|d| s3.object_path(&bucket_key(d)).exists()));

    let hosts = hosts_dir(&work.path().join("certs.d"), ferry.host(), &["docker.io"]);
    let containerd = Containerd::start();
    let out =
        containerd.ctr(&["content", "fetch", "--hosts-dir", &hosts.to_string_lossy(), "docker.io/library/redir:v1"]);
    assert!(out.status.success(), "ctr content fetch: {}\n{}", String::from_utf8_lossy(&out.stderr), ferry.log_text());
    for d in image.blob_digests() {
        let got = containerd.ctr(&["content", "get", &d]);
        assert_eq!(sha256_bytes(&got.stdout), d, "containerd holds the bytes of {d}");
        let redirected =
            ferry.log_text().lines().any(|l| l.contains(&format!("/blobs/{d}")) && l.contains("status=307"));
        assert!(redirected, "containerd was sent to the bucket for {d}");
    }
}

#[test]
fn cache_verify_aborts_uploads_a_crash_left_and_says_when_the_server_cannot_list_them() {
    // s3s-fs implements no ListMultipartUploads: verify says so instead of "none".
    let s3 = S3Server::start();
    let work = tmp_dir();
    let quiet = Ferry::start(&on_bucket(&work.path().join("q"), &s3, "http://127.0.0.1:9").yaml());
    let out = ferry_cache(&quiet.config_path(), &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the S3 server cannot list them"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // moto does: a fetch killed mid-upload leaves one, which verify finds and aborts.
    let moto = MotoServer::start();
    let registry = Registry::start();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[12 << 20], 80);
    push_layout(&layout, "v1", &format!("{}/library/left:v1", registry.host()), false).unwrap();
    let proxy = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::StallAfter(7 << 20)));
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(proxy.url()).opt("idle_timeout", "5m")])
        .set("storage.s3", moto.section(PREFIX));
    let mut ferry = Ferry::start(&cfg.yaml());
    let layer = image.layers[0].0.clone();
    let url = format!("{}/v2/library/left/blobs/{layer}", ferry.url());
    let pull = std::thread::spawn(move || http_request("GET", &url, &[]));
    eventually("an upload begun alongside the fetch", || !moto.pending_uploads().is_empty());
    ferry.kill9();
    assert!(pull.join().unwrap().is_err());
    assert_eq!(moto.pending_uploads(), vec![bucket_key(&layer)], "the crash left the upload");

    // (moto answers every upload's Initiated as 2010-11-10, so the default `1d` cannot be told
    // from `0s` here; the unit test of storage::abandoned reads the age.)
    let out = ferry_cache(&ferry.config_path(), &["verify", "--abandoned-after", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("ABANDONED UPLOAD {} (aborted)", bucket_key(&layer))), "{text}");
    assert!(moto.pending_uploads().is_empty(), "verify aborted it");
}

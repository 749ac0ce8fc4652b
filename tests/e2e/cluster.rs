//! Replicas that act as one mirror (`cluster:`): three Ferrys on one bucket (a real s3s-fs)
//! and one Redis (Debian's redis-server), real Distribution upstreams, real skopeo pulls.
//! What is asserted is what an operator sees: the upstream's access log (one GET per blob and
//! per manifest across the cluster), the bytes and digests clients got, and the metrics.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use crate::harness::encoding::percent_encode;
use crate::harness::fault::{Fault, FaultProxy};
use crate::harness::*;

const PREFIX: &str = "cluster/";
const ALICE: Creds<'static> = ("alice", "alice-pw");

/// Three (or `n`) replicas of one mirror, with what they share.
struct Cluster {
    work: TempDir,
    s3: S3Server,
    redis: RedisServer,
    replicas: Vec<Ferry>,
}

/// What a test changes in every replica's config.
type Tweak<'a> = &'a dyn Fn(FerryConfig) -> FerryConfig;

impl Cluster {
    fn start(n: usize, upstream_url: &str, tweak: Tweak<'_>) -> Cluster {
        let work = tmp_dir();
        let (s3, redis) = (S3Server::start(), RedisServer::start());
        let secret = work.path().join("cluster.secret");
        std::fs::write(&secret, "a cluster secret shared by the replicas").unwrap();
        let replicas = (0..n)
            .map(|i| {
                let cfg = replica_config(&work.path().join(format!("r{i}")), &s3, &redis, &secret, upstream_url);
                Ferry::start(&tweak(cfg).yaml())
            })
            .collect();
        Cluster { work, s3, redis, replicas }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

/// One replica: its own port (advertised to the others), its own local root, the shared bucket
/// and Redis, a 2 s lease so a dead owner is taken over quickly.
fn replica_config(root: &Path, s3: &S3Server, redis: &RedisServer, secret: &Path, upstream_url: &str) -> FerryConfig {
    let port = free_port();
    FerryConfig::new(root)
        .registry("docker.io", [upstream(upstream_url).opt("idle_timeout", "5m")])
        .set("storage.s3", s3.section(PREFIX))
        .set("listen", format!("127.0.0.1:{port}"))
        .set("cluster.redis", redis.url())
        .set("cluster.advertise", format!("http://127.0.0.1:{port}"))
        .set("cluster.secret_file", secret)
        .set("cluster.lease_ttl", "2s")
}

fn assert_image(dir: &Path, image: &Image) {
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), image.manifest_bytes);
    for d in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&d))), d, "blob {d} as pulled");
    }
}

/// The sha256 of a whole blob GET through `ferry`, or the failure.
fn get_blob(host: &str, digest: &str) -> Result<String, String> {
    let url = format!("http://{host}/v2/library/app/blobs/{digest}");
    match Client::new(Duration::from_secs(120)).get(&url, &[], usize::MAX) {
        Ok(r) if r.status == 200 => Ok(sha256_bytes(&r.body)),
        Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn twenty_four_pulls_over_three_replicas_make_one_upstream_get_per_blob_and_per_manifest() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[6 << 20, 2 << 20, 1 << 20, 300 << 10], 91);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", registry.host()), false).unwrap();
    let before = registry.count_requests("GET", "/manifests/");
    let cluster = Cluster::start(3, &registry.url(), &|c| c);

    let pulls: Vec<_> = (0..24)
        .map(|i| {
            let src = format!("{}/library/app:v1", cluster.replicas[i % 3].host());
            let dest = cluster.dir(&format!("pull{i}"));
            thread::spawn(move || pull_to_dir_within(&src, &dest, Duration::from_secs(120)).map(|_| dest))
        })
        .collect();
    for p in pulls {
        assert_image(&p.join().unwrap().unwrap(), &image);
    }
    for d in image.blob_digests() {
        assert_eq!(registry.count_requests("GET", &format!("/blobs/{d}")), 1, "one upstream GET of {d}");
    }
    assert_eq!(registry.count_requests("GET", "/manifests/") - before, 1, "one upstream GET of the manifest");
    let streamed: f64 =
        cluster.replicas.iter().map(|r| metric(&scrape(r), "ferry_cluster_fetches_total{role=\"owner\"}")).sum();
    assert_eq!(streamed, image.blob_digests().len() as f64, "one owner per blob across the cluster");
}

#[test]
fn the_owner_killed_mid_fetch_is_taken_over_and_the_other_replicas_clients_see_no_error() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[48 << 20], 92);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", registry.host()), false).unwrap();
    let layer = image.layers[0].0.clone();
    // The layer stalls after 8 MiB: the kill is surely mid-fetch.
    let proxy = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::StallAfter(8 << 20)));
    let mut cluster = Cluster::start(3, &proxy.url(), &|c| c);

    let owner_host = cluster.replicas[0].host().to_owned();
    let (l1, l2) = (layer.clone(), layer.clone());
    let dead = thread::spawn(move || get_blob(&owner_host, &l1));
    assert!(proxy.wait_for_count("GET", &layer, 1, Duration::from_secs(30)), "the owner asked the upstream");
    let follower_hosts: Vec<String> = cluster.replicas[1..].iter().map(|r| r.host().to_owned()).collect();
    let followers: Vec<_> = follower_hosts
        .iter()
        .cloned()
        .map(|h| {
            let l = l2.clone();
            thread::spawn(move || get_blob(&h, &l))
        })
        .collect();
    for r in &cluster.replicas[1..] {
        eventually("the other replicas stream from the owner", || {
            metric(&scrape(r), "ferry_cluster_fetches_total{role=\"peer\"}") == 1.0
        });
    }
    assert_eq!(proxy.count("GET", &layer), 1, "followers do not ask the upstream");
    // The operator's view from another replica names the owner and its one fetch.
    let r1 = &cluster.replicas[1];
    let stats = std::process::Command::new(ferry_bin())
        .args(["cache", "stats", "--config"])
        .arg(r1.config_path())
        .args(["--server", &r1.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&stats.stdout);
    let owner_line = format!("    {}  1", cluster.replicas[0].url());
    assert!(text.contains("fetches in progress, by owner:") && text.contains(&owner_line), "{text}");
    cluster.replicas[0].kill9();
    assert!(dead.join().unwrap().is_err(), "the dead owner's client lost its stream");
    proxy.set_fault(Fault::PassThrough);
    for f in followers {
        assert_eq!(f.join().unwrap().as_deref(), Ok(layer.as_str()), "a follower's client got the whole blob");
    }
    let takeovers: f64 = cluster.replicas[1..]
        .iter()
        .map(|r| metric(&scrape(r), "ferry_cluster_fetches_total{role=\"takeover\"}"))
        .sum();
    assert_eq!(takeovers, 1.0, "one survivor took over");
    assert_eq!(proxy.count("GET", &layer), 2, "the owner's request and the one resumed by the survivor");
    // The dead owner's client retries through a survivor (as through a balancer).
    assert_eq!(get_blob(&follower_hosts[0], &layer).as_deref(), Ok(layer.as_str()));
    for key in cluster.s3.keys(&format!("{PREFIX}blobs/")) {
        let hex = key.rsplit('/').next().unwrap();
        assert_eq!(sha256_file(cluster.s3.object_path(&key)), format!("sha256:{hex}"), "{key} hashes to its key");
    }
}

#[test]
fn a_push_a_token_and_a_delete_on_one_replica_hold_on_every_other_and_a_forged_token_opens_none() {
    let registry = Registry::start();
    let work = tmp_dir();
    let htpasswd = write_htpasswd(work.path(), &[ALICE]);
    let hosted = |c: FerryConfig| c.hosted(Hosted::new(["internal"]).htpasswd(&htpasswd).delete(true));
    let cluster = Cluster::start(2, &registry.url(), &hosted);
    let layout = work.path().join("layout");
    build_image(&layout, "v1", &[200 << 10], 93);
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    push_layout_creds(&layout, "v1", &format!("{}/internal/app:v1", a.host()), false, ALICE).unwrap();

    let scope = "repository:internal/app:pull";
    let auth = basic_auth(ALICE.0, ALICE.1);
    let url = format!("{}/auth/token?service=ferry&scope={}", a.url(), percent_encode(scope));
    let reply = http_request("GET", &url, &[("Authorization", &auth)]).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let token = json["token"].as_str().unwrap().to_owned();
    let manifest = |ferry: &Ferry, token: &str| {
        let bearer = format!("Bearer {token}");
        let accept = ("Accept", OCI_MANIFEST);
        http_request(
            "GET",
            &format!("{}/v2/internal/app/manifests/v1", ferry.url()),
            &[("Authorization", &bearer), accept],
        )
        .unwrap()
        .status
    };
    assert_eq!(manifest(a, &token), 200, "on the replica that issued it");
    assert_eq!(manifest(b, &token), 200, "on another replica");
    let (claims, sig) = token.split_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let forged = format!("{claims}.{flipped}{}", &sig[1..]);
    assert_eq!(manifest(a, &forged), 401, "a forged token on the issuer");
    assert_eq!(manifest(b, &forged), 401, "a forged token on another replica");

    // A delete on one replica is a 404 on the other at once: hosted content is read from the
    // bucket, never from a replica's cache.
    let on = |ferry: &Ferry, method: &str, reference: &str| {
        let url = format!("{}/v2/internal/app/manifests/{reference}", ferry.url());
        http_request(method, &url, &[("Authorization", &auth), ("Accept", OCI_MANIFEST)]).unwrap()
    };
    let digest = on(b, "HEAD", "v1").header("docker-content-digest").unwrap().to_owned();
    assert_eq!(on(a, "DELETE", &digest).status, 202, "deleted through the first replica");
    assert_eq!(on(b, "GET", "v1").status, 404, "gone on the other one too");
    assert_eq!(on(b, "GET", &digest).status, 404);
}

#[test]
fn after_one_replica_resolved_a_tag_the_others_do_not_ask_the_upstream_within_the_ttl_until_it_is_forgotten() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[100 << 10], 94);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", registry.host()), false).unwrap();
    let (gets, heads) =
        (registry.count_requests("GET", "/manifests/v1"), registry.count_requests("HEAD", "/manifests/"));
    let cluster = Cluster::start(3, &registry.url(), &|c| c.set("cache.tag_ttl", "1h"));
    for (i, r) in cluster.replicas.iter().enumerate() {
        let out = cluster.dir(&format!("p{i}"));
        pull_to_dir(&format!("{}/library/app:v1", r.host()), &out).unwrap();
        assert_image(&out, &image);
    }
    assert_eq!(registry.count_requests("GET", "/manifests/v1") - gets, 1, "one upstream GET of the tag");
    assert_eq!(registry.count_requests("HEAD", "/manifests/") - heads, 0, "no revalidation within the TTL");

    // The tag moves upstream; forgetting it on one replica reaches every replica's memory.
    let moved = build_image(&layout, "v2", &[100 << 10], 90);
    push_layout(&layout, "v2", &format!("{}/library/app:v1", registry.host()), false).unwrap();
    let forget = format!("{}/_ferry/forget?image=app:v1", cluster.replicas[0].url());
    let reply = http_request("POST", &forget, &[]).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("\"every_replica\":true"), "{}", reply.text());
    for (i, r) in cluster.replicas.iter().enumerate().rev() {
        let out = cluster.dir(&format!("moved{i}"));
        pull_to_dir(&format!("{}/library/app:v1", r.host()), &out).unwrap();
        assert_image(&out, &moved);
    }
    assert_eq!(registry.count_requests("GET", "/manifests/v1") - gets, 2, "one more upstream GET, for the cluster");
}

#[test]
fn with_redis_stopped_every_replica_keeps_serving_and_with_it_back_they_fetch_once_again() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    // One image per replica: each must fetch (and so ask Redis) to serve its pull; a replica
    // that only served what another stored would rightly never notice Redis is gone.
    let alone: Vec<_> = (0..3).map(|i| build_image(&layout, &format!("alone{i}"), &[1 << 20], 95 + i as u64)).collect();
    let two = build_image(&layout, "two", &[3 << 20], 99);
    for tag in ["alone0", "alone1", "alone2", "two"] {
        push_layout(&layout, tag, &format!("{}/library/app:{tag}", registry.host()), false).unwrap();
    }
    let mut cluster = Cluster::start(3, &registry.url(), &|c| c.set("cluster.redis_timeout", "300ms"));

    cluster.redis.stop();
    for (i, r) in cluster.replicas.iter().enumerate() {
        let out = cluster.dir(&format!("alone{i}"));
        pull_to_dir(&format!("{}/library/app:alone{i}", r.host()), &out).unwrap();
        assert_image(&out, &alone[i]);
        assert_eq!(metric(&scrape(r), "ferry_cluster_degraded"), 1.0, "replica {i} says it works alone");
        let ready = http_request("GET", &format!("{}/readyz", r.url()), &[]).unwrap();
        assert_eq!(ready.status, 200, "replica {i} stays ready without Redis");
    }

    cluster.redis.restart();
    for r in &cluster.replicas {
        eventually("the replica rejoined", || metric(&scrape(r), "ferry_cluster_degraded") == 0.0);
    }
    let pulls: Vec<_> = (0..9)
        .map(|i| {
            let src = format!("{}/library/app:two", cluster.replicas[i % 3].host());
            let dest = cluster.dir(&format!("back{i}"));
            thread::spawn(move || pull_to_dir(&src, &dest).map(|_| dest))
        })
        .collect();
    for p in pulls {
        assert_image(&p.join().unwrap().unwrap(), &two);
    }
    for d in two.layers.iter().map(|(d, _)| d) {
        assert_eq!(registry.count_requests("GET", &format!("/blobs/{d}")), 1, "one upstream GET of {d} again");
    }
}

/// One request to a replica, as alice.
fn as_alice(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let auth = basic_auth(ALICE.0, ALICE.1);
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    http_request_body(method, &format!("{base}{path}"), &all, body).unwrap()
}

/// Opens an upload session on `base`: its location (a path).
fn open_upload(base: &str) -> String {
    let reply = as_alice(base, "POST", "/v2/internal/app/blobs/uploads/", &[], b"");
    assert_eq!(reply.status, 202, "{}", reply.text());
    reply.header("location").unwrap().to_owned()
}

fn range(start: usize, len: usize) -> String {
    format!("{start}-{}", start + len - 1)
}

#[test]
fn a_chunked_push_spread_over_the_replicas_completes_and_outlives_the_replica_that_opened_it() {
    let registry = Registry::start();
    let work = tmp_dir();
    let htpasswd = write_htpasswd(work.path(), &[ALICE]);
    let hosted = |c: FerryConfig| c.hosted(Hosted::new(["internal"]).htpasswd(&htpasswd).delete(true));
    let mut cluster = Cluster::start(3, &registry.url(), &hosted);
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[3 << 20, 700 << 10], 96);
    let urls: Vec<String> = cluster.replicas.iter().map(|r| r.url()).collect();

    for (i, digest) in image.blob_digests().iter().enumerate() {
        let blob = std::fs::read(blob_path(&layout, digest)).unwrap();
        // The first session is opened on replica 0, which then dies: the session lives on.
        let location = open_upload(&urls[if i == 0 { 0 } else { 2 }]);
        if i == 0 {
            cluster.replicas[0].kill9();
        }
        let (a, b) = (blob.len() / 3, 2 * blob.len() / 3);
        let first = as_alice(&urls[1], "PATCH", &location, &[("Content-Range", &range(0, a))], &blob[..a]);
        assert_eq!((first.status, first.header("range")), (202, Some(format!("0-{}", a - 1).as_str())));
        let skip = as_alice(&urls[2], "PATCH", &location, &[("Content-Range", &range(b, blob.len() - b))], &blob[b..]);
        assert_eq!(skip.status, 416, "a chunk out of order, on another replica: {}", skip.text());
        let second = as_alice(&urls[2], "PATCH", &location, &[("Content-Range", &range(a, b - a))], &blob[a..b]);
        assert_eq!(second.status, 202, "{}", second.text());
        let status = as_alice(&urls[1], "GET", &location, &[], b"");
        assert_eq!((status.status, status.header("range")), (204, Some(format!("0-{}", b - 1).as_str())));
        let put = format!("{location}?digest={digest}");
        let last = as_alice(&urls[1], "PUT", &put, &[("Content-Range", &range(b, blob.len() - b))], &blob[b..]);
        assert_eq!(last.status, 201, "the closing PUT on a third replica: {}", last.text());
        assert_eq!(as_alice(&urls[2], "GET", &location, &[], b"").status, 404, "the session is finished everywhere");
    }

    // A session whose bytes do not hash to the digest is refused, and finished.
    let location = open_upload(&urls[1]);
    assert_eq!(as_alice(&urls[2], "PATCH", &location, &[], b"not the layer").status, 202);
    let wrong = as_alice(&urls[1], "PUT", &format!("{location}?digest={}", image.layers[0].0), &[], b"");
    assert_eq!(wrong.status, 400);
    assert!(wrong.text().contains("DIGEST_INVALID"), "{}", wrong.text());
    // A cancelled one is gone on every replica.
    let location = open_upload(&urls[2]);
    assert_eq!(as_alice(&urls[1], "PATCH", &location, &[], b"abc").status, 202);
    assert_eq!(as_alice(&urls[1], "DELETE", &location, &[], b"").status, 204);
    assert_eq!(as_alice(&urls[2], "GET", &location, &[], b"").status, 404);
    assert_eq!(cluster.s3.keys(&format!("{PREFIX}objects/uploads/")), Vec::<String>::new(), "no chunk is left");

    let manifest = as_alice(
        &urls[2],
        "PUT",
        "/v2/internal/app/manifests/v1",
        &[("Content-Type", OCI_MANIFEST)],
        &image.manifest_bytes,
    );
    assert_eq!(manifest.status, 201, "{}", manifest.text());
    for (i, r) in cluster.replicas[1..].iter().enumerate() {
        let out = cluster.dir(&format!("pulled{i}"));
        pull_to_dir_creds(&format!("{}/internal/app:v1", r.host()), &out, ALICE).unwrap();
        assert_image(&out, &image);
    }
}

#[test]
fn the_size_cap_holds_for_the_bucket_one_replica_evicts_at_a_time_and_pushed_blobs_stay() {
    let registry = Registry::start();
    let work = tmp_dir();
    let htpasswd = write_htpasswd(work.path(), &[ALICE]);
    let layout = work.path().join("layout");
    let images: Vec<Image> =
        (0..6).map(|i| build_image(&layout, &format!("v{i}"), &[3 << 20], 110 + i as u64)).collect();
    for i in 0..6 {
        push_layout(&layout, &format!("v{i}"), &format!("{}/library/app:v{i}", registry.host()), false).unwrap();
    }
    let cap: u64 = 10 << 20;
    let tweak =
        |c: FerryConfig| c.set("storage.max_size", "10MiB").hosted(Hosted::new(["internal"]).htpasswd(&htpasswd));
    let cluster = Cluster::start(3, &registry.url(), &tweak);
    let blob_keys = || cluster.s3.keys(&format!("{PREFIX}blobs/"));
    let stored = |digest: &str| blob_keys().iter().any(|k| k.ends_with(digest_hex(digest)));
    // The first image is pulled through the cache, then pushed to a hosted repository: its
    // blobs, the least recently used, are hosted content now and must never be evicted.
    let pushed = &images[0];
    let hosted_blobs = pushed.blob_digests();
    let cache_bytes = || -> u64 {
        blob_keys()
            .iter()
            .filter(|k| !hosted_blobs.iter().any(|d| k.ends_with(digest_hex(d))))
            .map(|k| std::fs::metadata(cluster.s3.object_path(k)).unwrap().len())
            .sum()
    };
    pull_to_dir(&format!("{}/library/app:v0", cluster.replicas[0].host()), cluster.dir("v0")).unwrap();
    push_layout_creds(&layout, "v0", &format!("{}/internal/app:v0", cluster.replicas[1].host()), false, ALICE).unwrap();

    for (i, image) in images.iter().enumerate().skip(1) {
        let out = cluster.dir(&format!("v{i}"));
        pull_to_dir(&format!("{}/library/app:v{i}", cluster.replicas[i % 3].host()), &out).unwrap();
        assert_image(&out, image);
        eventually("the bucket's cached blobs are back under the cap", || cache_bytes() <= cap);
    }
    let proxied: Vec<String> = images[1..].iter().flat_map(|i| i.blob_digests()).collect();
    let gone = proxied.iter().filter(|d| !stored(d)).count();
    assert!(gone >= 2, "18 MiB pulled through a 10 MiB cap evicts layers ({gone} gone)");
    let evictions: f64 = cluster.replicas.iter().map(|r| metric(&scrape(r), "ferry_cache_evictions_total")).sum();
    assert_eq!(evictions, gone as f64, "each evicted blob was evicted once, by one replica");
    for d in &hosted_blobs {
        assert!(stored(d), "pushed blob {d} stays");
    }
    let out = cluster.dir("hosted");
    pull_to_dir_creds(&format!("{}/internal/app:v0", cluster.replicas[2].host()), &out, ALICE).unwrap();
    assert_image(&out, pushed);
}

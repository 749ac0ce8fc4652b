//! Scenario 7: a warm blob served from S3-compatible storage (a real s3s-fs on loopback), side
//! by side in one run: a direct GET of the object from the same S3 server (a presigned URL, as
//! `storage.s3.redirect` hands out), Ferry streaming it from the bucket, Ferry with a hot tier
//! (a local copy), and Ferry on the filesystem backend. CPU per GiB: the Ferry process, plus
//! the S3 server's over the same transfer.

use super::*;
use harness::S3Server;

/// The four ways to the same bytes, in the order of the table's cell.
#[derive(Clone, Copy)]
enum Via {
    Direct,
    Bucket,
    HotTier,
    Disk,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct from S3",
            Via::Bucket => "Ferry on S3",
            Via::HotTier => "Ferry on S3 + hot tier",
            Via::Disk => "Ferry on disk",
        }
    }
}

/// A Ferry on `s3`'s bucket under `prefix` (the same prefix: replicas sharing one store).
fn start_on_bucket(upstream: &str, s3: &S3Server, extra: &[(&str, harness::Yaml)]) -> Server {
    let dir = harness::tmp_dir();
    let mut config = FerryConfig::new(dir.path().join("cache"))
        .registry(REGISTRY, [harness::upstream(upstream)])
        .set("storage.s3", s3.section("bench/"));
    for (key, value) in extra {
        config = config.set(key, value.clone());
    }
    let ferry = Ferry::launcher().bin(ferry_bin()).log_to_file().start(&config.yaml());
    Server { url: ferry.url(), proc: Running::Ferry(ferry), dir }
}

/// Scenario 7 (see the module docs) for the first layer of `img`.
pub(super) fn warm_from_s3(upstream: &Registry, img: &BenchImage, rounds: usize) -> Vec<Row> {
    progress("7: s3s-fs, and Ferry on it (bucket, hot tier, redirect) and on disk");
    let s3 = S3Server::start();
    let (digest, size) = img.image.layers[0].clone();
    let blob = |s: &Server| format!("{}/v2/{}/blobs/{digest}", s.url, img.repo);
    let bucket = start_on_bucket(&upstream.url(), &s3, &[]);
    pull_image(&bucket.url, img.repo, img.tag).unwrap_or_else(|e| panic!("{e}"));
    let key = format!("bench/{}", harness::blob_key(&digest));
    harness::eventually("the blob is in the bucket", || s3.object_path(&key).exists());
    let hot = start_on_bucket(&upstream.url(), &s3, &[("storage.hot_tier", (2 * size).to_string().as_str().into())]);
    let redirect =
        start_on_bucket(&upstream.url(), &s3, &[("storage.s3.redirect", harness::Yaml::Bare("true".into()))]);
    let disk = start_ferry(&upstream.url());
    pull_image(&disk.url, img.repo, img.tag).unwrap_or_else(|e| panic!("{e}"));
    // One read through the hot tier fills it; the presigned URL comes from the redirect.
    let r = Client::new(IO_TIMEOUT).get(&blob(&hot), &[], 0);
    assert!(r.as_ref().is_ok_and(|r| r.status == 200 && r.len == size), "hot tier fill read");
    let local = hot.dir.path().join("cache").join(harness::blob_key(&digest));
    harness::eventually("the hot tier holds the blob", || local.exists());
    let located = harness::http_request("GET", &blob(&redirect), &[]).expect("redirect");
    assert_eq!(located.status, 307, "a redirect to the bucket");
    let direct_url = located.header("location").expect("a Location").to_owned();

    let mut mbs: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cpu: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for via in rotated(&[Via::Direct, Via::Bucket, Via::HotTier, Via::Disk], round) {
            let (url, server) = match via {
                Via::Direct => (direct_url.clone(), None),
                Via::Bucket => (blob(&bucket), Some(&bucket)),
                Via::HotTier => (blob(&hot), Some(&hot)),
                Via::Disk => (blob(&disk), Some(&disk)),
            };
            let meter = CpuMeter::start(server.map_or(s3.pid(), |s| s.proc.pid()), s3.pid());
            let speed = curl_speed(&url, size);
            let used = meter.per_gib(size);
            // Direct: the S3 server is both "server" and "upstream"; count it once.
            let cost = if server.is_some() { used.server + used.upstream } else { used.server };
            progress(format!(
                "7 round {}/{rounds}: {:<24} {speed:7.0} MB/s, {cost:.2} CPU s/GiB",
                round + 1,
                via.label()
            ));
            mbs.entry(via.label()).or_default().push(speed);
            cpu.entry(via.label()).or_default().push(cost);
        }
    }
    let m = |v: Via| median(&mbs[v.label()]);
    let r = |a: Via, b: Via| times(median(&ratios(&mbs[a.label()], &mbs[b.label()])));
    let mut row = Row::new(
        "7",
        format!("warm {} blob from S3 (s3s-fs), 1 stream (curl), MB/s", human(size)),
        "S3 ≥ 0.8x direct; hot tier ≈ disk",
    );
    row.ferry = format!("S3 {:.0}, hot tier {:.0}, disk {:.0}", m(Via::Bucket), m(Via::HotTier), m(Via::Disk));
    row.direct = format!("{:.0}", m(Via::Direct));
    row.ratio = format!("S3 ÷ direct {}, hot tier ÷ disk {}", r(Via::Bucket, Via::Direct), r(Via::HotTier, Via::Disk));
    let c = |v: Via| median(&cpu[v.label()]);
    let mut cpu_row = Row::new("7", "CPU s per GiB served (Ferry + s3s-fs; direct: s3s-fs)", "–");
    cpu_row.ferry = format!("S3 {:.2}, hot tier {:.2}, disk {:.2}", c(Via::Bucket), c(Via::HotTier), c(Via::Disk));
    cpu_row.direct = format!("{:.2}", c(Via::Direct));
    vec![row, cpu_row]
}

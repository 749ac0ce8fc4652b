//! Scenario 8: replicas that act as one mirror (`cluster:`). A cold blob, three Ferry replicas
//! on one s3s-fs bucket and one redis-server, and `clients` concurrent curl clients spread
//! round-robin over the replicas. Measured: the upstream GETs of the blob (from its access log;
//! 1 is the point of a cluster, and anything else fails the bench), the herd's wall time as a
//! multiple of one client's through one replica alone (the same configuration, a cluster of
//! one), and the replicas' CPU per GiB delivered, summed, with s3s-fs's and the upstream's
//! beside it. Every measurement starts on a fresh bucket, a fresh Redis and fresh replicas:
//! cold.
//!
//! The timed rounds check each client's status and length (curl to /dev/null, as scenario 3
//! does), because on two shared cores the clients' own sha256 of every copy (32 x 256 MiB)
//! would cost more CPU than the replicas and the wall ratio would mostly time the clients. One
//! more herd after them, on a fresh cluster too, hashes every client's body as it arrives (as a
//! container runtime verifies a layer) and fails the bench on any byte that differs.

use super::*;
use harness::{RedisServer, S3Server};
use sha2::{Digest as _, Sha256};
use std::process::Stdio;

/// Where the replicas keep the mirror in the bucket.
const PREFIX: &str = "bench/";
/// Replicas of the herd's cluster.
const REPLICAS: usize = 3;
/// Bound of one client's transfer (curl `--max-time`), and of reaping it afterwards.
const CLIENT_MAX_TIME: Duration = Duration::from_secs(120);
const REAP: Duration = Duration::from_secs(10);

/// Fresh replicas of one mirror and what they share.
struct Cluster {
    /// The shared secret and each replica's local root.
    _work: TempDir,
    s3: S3Server,
    _redis: RedisServer,
    replicas: Vec<Ferry>,
}

impl Cluster {
    fn start(n: usize, upstream: &str) -> Cluster {
        let work = harness::tmp_dir();
        let (s3, redis) = (S3Server::start(), RedisServer::start());
        let secret = work.path().join("cluster.secret");
        fs::write(&secret, "a bench secret shared by the replicas").expect("write the cluster secret");
        let replicas =
            (0..n).map(|i| start_replica(&work.path().join(format!("r{i}")), &s3, &redis, &secret, upstream)).collect();
        Cluster { _work: work, s3, _redis: redis, replicas }
    }
}

/// One replica: its own port (advertised to the others) and local root, the shared bucket,
/// Redis and secret. A port from `free_port` may be taken before Ferry binds it: three tries.
fn start_replica(root: &Path, s3: &S3Server, redis: &RedisServer, secret: &Path, upstream: &str) -> Ferry {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let config = FerryConfig::new(root)
            .registry(REGISTRY, [harness::upstream(upstream)])
            .set("storage.s3", s3.section(PREFIX))
            .set("listen", format!("127.0.0.1:{port}"))
            .set("cluster.redis", redis.url())
            .set("cluster.advertise", format!("http://127.0.0.1:{port}"))
            .set("cluster.secret_file", secret);
        match Ferry::launcher().bin(ferry_bin()).log_to_file().try_start(&config.yaml()) {
            Ok(ferry) => return ferry,
            Err(e) => last = e,
        }
    }
    panic!("a cluster replica did not start: {last}");
}

/// CPU (user+sys) seconds per GiB the clients received.
#[derive(Clone, Copy, Debug)]
struct ClusterCpu {
    /// Every replica's, summed.
    replicas: f64,
    s3: f64,
    upstream: f64,
}

/// CPU counters of the replicas, s3s-fs and the upstream when a transfer starts.
struct ClusterMeter {
    pids: Vec<u32>,
    at_start: Vec<f64>,
}

impl ClusterMeter {
    fn start(cluster: &Cluster, upstream: &Registry) -> ClusterMeter {
        let mut pids: Vec<u32> = cluster.replicas.iter().map(Ferry::pid).collect();
        pids.extend([cluster.s3.pid(), upstream.pid()]);
        let at_start = pids.iter().map(|&p| cpu_seconds(p)).collect();
        ClusterMeter { pids, at_start }
    }

    /// CPU since [`ClusterMeter::start`] per GiB of `bytes`, once every process is idle again
    /// (the bucket upload after the last client is done counts). Before the cluster is dropped.
    fn per_gib(&self, bytes: u64) -> ClusterCpu {
        let gib = bytes as f64 / GIB as f64;
        let used: Vec<f64> = settled_all(&self.pids).iter().zip(&self.at_start).map(|(now, was)| now - was).collect();
        let n = used.len() - 2;
        ClusterCpu { replicas: used[..n].iter().sum::<f64>() / gib, s3: used[n] / gib, upstream: used[n + 1] / gib }
    }
}

/// What a client checks of the blob it got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// HTTP 200 and exactly the blob's length (curl to /dev/null).
    Length,
    /// That, and the bytes hash to the blob's digest.
    Sha256,
}

/// One client's GET of blob `digest` from `url`, checked as `check` says.
fn client_get(url: &str, digest: &str, size: u64, check: Check) -> Result<(), String> {
    if check == Check::Sha256 {
        return hashed_get(url, digest, size);
    }
    let max_time = CLIENT_MAX_TIME.as_secs().to_string();
    let out = run_bounded(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            &max_time,
            "-o",
            "/dev/null",
            "-w",
            "HTTP %{http_code} %{size_download}",
            url,
        ]),
        CLIENT_MAX_TIME + REAP,
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && said.trim() == format!("HTTP 200 {size}") {
        return Ok(());
    }
    Err(format!("GET {url}: curl {}, {said} (of {size} bytes) {}", out.status, String::from_utf8_lossy(&out.stderr)))
}

/// One client: `curl` into a pipe, the body hashed as it arrives. Ok when the answer is 200
/// with exactly `size` bytes that hash to `digest`. curl's `--max-time` bounds the transfer,
/// and a curl that outlives it is killed through its own handle.
fn hashed_get(url: &str, digest: &str, size: u64) -> Result<(), String> {
    let max_time = CLIENT_MAX_TIME.as_secs().to_string();
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", &max_time, "-o", "-", "-w", "%{stderr}HTTP %{http_code}", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn curl: {e}"))?;
    let (mut hasher, mut got) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 256 * 1024];
    let mut body = child.stdout.take().expect("curl's stdout");
    let read = loop {
        match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) => break Err(format!("read curl's output: {e}")),
        }
    };
    drop(body);
    let mut said = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut said);
    }
    let status = harness::wait_bounded(child, REAP)?;
    read?;
    let hashed = format!("sha256:{}", hex::encode(hasher.finalize()));
    if status.success() && said.trim_end().ends_with("HTTP 200") && got == size && hashed == digest {
        return Ok(());
    }
    Err(format!("GET {url}: curl {status}, {} ({got} of {size} bytes, {hashed})", said.trim()))
}

/// One client per URL, released together; wall time until the last has all its bytes, checked.
fn checked_herd(urls: &[String], digest: &str, size: u64, check: Check) -> f64 {
    let barrier = Barrier::new(urls.len() + 1);
    thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    client_get(url, digest, size, check)
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        for h in handles {
            h.join().unwrap_or_else(|_| Err("client panicked".into())).unwrap_or_else(|e| panic!("{e}"));
        }
        t.elapsed().as_secs_f64()
    })
}

/// What one measurement saw.
struct Run {
    wall: f64,
    gets: Fetches,
    cpu: ClusterCpu,
    /// `ferry_cluster_fetches_total` over the replicas: (owner, peer, takeover).
    roles: [f64; 3],
}

/// `clients` clients round-robin over a fresh cluster of `replicas` GET the layer of `img`.
fn measure(upstream: &Registry, img: &BenchImage, replicas: usize, clients: usize, check: Check) -> Run {
    let (digest, size) = img.image.layers[0].clone();
    let blobs = [(digest.clone(), size)];
    let cluster = Cluster::start(replicas, &upstream.url());
    let urls: Vec<String> = (0..clients)
        .map(|i| format!("{}/v2/{}/blobs/{digest}", cluster.replicas[i % replicas].url(), img.repo))
        .collect();
    let before = upstream_gets(upstream, &blobs);
    let meter = ClusterMeter::start(&cluster, upstream);
    let wall = checked_herd(&urls, &digest, size, check);
    let cpu = meter.per_gib(size * clients as u64);
    let pages: Vec<String> = cluster.replicas.iter().map(harness::scrape).collect();
    let roles = ["owner", "peer", "takeover"].map(|role| {
        let series = format!("ferry_cluster_fetches_total{{role=\"{role}\"}}");
        pages.iter().map(|page| harness::metric(page, &series)).sum()
    });
    drop(cluster);
    let gets = settled_gets(upstream, &blobs, &before)[0];
    assert_eq!(
        gets.gets, 1,
        "{clients} client(s) over {replicas} replica(s) made {} upstream GETs of {digest} ({} bytes): a Ferry bug",
        gets.gets, gets.bytes
    );
    Run { wall, gets, cpu, roles }
}

fn describe(run: &Run, size: u64) -> String {
    let [owner, peer, takeover] = run.roles;
    format!(
        "{}, {} upstream GET ({:.2}x blob bytes), fetches: owner {owner}, peer {peer}, takeover {takeover}; \
         {:.2} CPU s/GiB replicas (+{:.2} s3s-fs, +{:.2} upstream)",
        secs(run.wall),
        run.gets.gets,
        run.gets.bytes as f64 / size as f64,
        run.cpu.replicas,
        run.cpu.s3,
        run.cpu.upstream
    )
}

/// Scenario 8 (see the module docs) for the one layer of `img`, `rounds` rounds alternating the
/// herd over [`REPLICAS`] replicas and the single client through one replica alone.
pub(super) fn cold_herd_over_replicas(
    upstream: &Registry,
    img: &BenchImage,
    clients: usize,
    rounds: usize,
) -> Vec<Row> {
    progress(format!("8: {REPLICAS} replicas on one s3s-fs bucket and one Redis, {clients} cold clients"));
    let size = img.image.layers[0].1;
    let (mut one, mut herd): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for alone in rotated(&[true, false], round) {
            let (replicas, n) = if alone { (1, 1) } else { (REPLICAS, clients) };
            let run = measure(upstream, img, replicas, n, Check::Length);
            progress(format!(
                "8 round {}/{rounds}: {n:>2} client(s), {replicas} replica(s): {}",
                round + 1,
                describe(&run, size)
            ));
            if alone { &mut one } else { &mut herd }.push(run);
        }
    }
    let hashed = measure(upstream, img, REPLICAS, clients, Check::Sha256);
    progress(format!(
        "8 sha256 check: {clients} clients, every body hashed to its digest: {}",
        describe(&hashed, size)
    ));
    rows(&one, &herd, &hashed, size, clients)
}

/// The scenario's two rows: GETs and wall time (of the timed rounds, and of the sha256 check);
/// CPU.
fn rows(one: &[Run], herd: &[Run], hashed: &Run, size: u64, clients: usize) -> Vec<Row> {
    let of = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let (t1, tn) = (of(one, |r| r.wall), of(herd, |r| r.wall));
    let wall = times(median(&ratios(&tn, &t1)));
    let gets: Vec<String> = herd.iter().map(|r| r.gets.gets.to_string()).collect();
    let upstream_bytes = median(&of(herd, |r| r.gets.bytes as f64)) / size as f64;
    let mut row = Row::new(
        "8",
        format!(
            "{REPLICAS} replicas (one s3s-fs bucket, one Redis), {clients} cold clients round-robin, {} blob \
             (curl): upstream GETs; wall ÷ 1 client on 1 replica",
            human(size)
        ),
        "1 upstream GET; wall ≤ 1.3× one client",
    );
    row.ferry = format!(
        "{} GET per round, {} in the sha256 check ({upstream_bytes:.2}x blob bytes); {wall} ({} vs {})",
        gets.join(", "),
        hashed.gets.gets,
        secs(median(&tn)),
        secs(median(&t1))
    );
    row.ratio =
        format!("wall {clients} clients ÷ 1 client {wall}; {clients} sha256-checking clients {}", secs(hashed.wall));
    let cpu = |runs: &[Run]| {
        format!(
            "{:.2} (+{:.2} s3s-fs, +{:.2} upstream)",
            median(&of(runs, |r| r.cpu.replicas)),
            median(&of(runs, |r| r.cpu.s3)),
            median(&of(runs, |r| r.cpu.upstream))
        )
    };
    let mut cpu_row = Row::new("8", format!("CPU s per GiB delivered, {REPLICAS} replicas summed (user+sys)"), "–");
    cpu_row.ferry = format!("{clients} clients: {}; 1 client on 1 replica: {}", cpu(herd), cpu(one));
    cpu_row.ratio = format!(
        "replica CPU per GiB, {clients} clients ÷ 1 client {}",
        times(median(&ratios(&of(herd, |r| r.cpu.replicas), &of(one, |r| r.cpu.replicas))))
    );
    vec![row, cpu_row]
}

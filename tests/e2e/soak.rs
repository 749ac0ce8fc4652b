//! The soak: mixed pulls and pushes from many clients through a fault proxy that injects
//! resets, stalls and 5xx, beside a crowd of idle and slowloris connections. Not in the default
//! run (`#[ignore]`): `scripts/soak.sh` runs it, bounded by `FERRY_SOAK_SECS` (default 600).
//! It reports requests, errors that a retry did not fix (the goal is 0), p99 latency, Ferry's
//! RSS and descriptors over time (the goal: flat), and bytes verified.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::fault::{Fault, FaultProxy};
use crate::harness::*;

const CLIENTS: usize = 64;
const CROWD: usize = 200;

/// Ferry's resident memory (KiB) and open descriptors.
fn usage(pid: u32) -> (u64, usize) {
    (rss(pid) / 1024, open_fds(pid))
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    latencies_ms: Mutex<Vec<u64>>,
}

impl Tally {
    /// Runs `op` up to three times; counts what a retry could not fix.
    fn run(&self, mut op: impl FnMut() -> Result<u64, String>) {
        for attempt in 0..3 {
            let started = Instant::now();
            self.requests.fetch_add(1, Ordering::Relaxed);
            match op() {
                Ok(bytes) => {
                    self.bytes.fetch_add(bytes, Ordering::Relaxed);
                    if let Ok(mut l) = self.latencies_ms.lock() {
                        l.push(started.elapsed().as_millis() as u64);
                    }
                    return;
                }
                Err(e) if attempt == 2 => {
                    eprintln!("soak: unrecovered error: {e}");
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One pull by digest, verified.
fn pull_blob(ferry: &str, digest: &str) -> Result<u64, String> {
    let r = http_request("GET", &format!("{ferry}/v2/library/soak/blobs/{digest}"), &[]).map_err(|e| e.to_string())?;
    if r.status != 200 || sha256_bytes(&r.body) != digest {
        return Err(format!("blob {digest}: HTTP {}", r.status));
    }
    Ok(r.body.len() as u64)
}

/// One monolithic push of `bytes` to a hosted repository.
fn push_blob(ferry: &str, auth: &str, bytes: &[u8]) -> Result<u64, String> {
    let digest = sha256_bytes(bytes);
    let url = format!("{ferry}/v2/internal/soak/blobs/uploads/?digest={digest}");
    let r = http_request_body("POST", &url, &[("Authorization", auth)], bytes).map_err(|e| e.to_string())?;
    match r.status {
        201 => Ok(bytes.len() as u64),
        s => Err(format!("push: HTTP {s}")),
    }
}

#[test]
#[ignore = "the soak: run by scripts/soak.sh"]
fn soak() {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600).min(600);
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[64 << 10, 1 << 20, 4 << 20, 256 << 10], 900);
    push_layout(&layout, "v1", &format!("{}/library/soak:v1", registry.host()), false).unwrap();
    let chaos = FaultProxy::start(&registry.host(), Fault::PassThrough);
    let htpasswd = write_htpasswd(work.path(), &[("soak", "soak-pass")]);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry(
            "docker.io",
            [upstream(chaos.url()).opt("idle_timeout", "2s").opt("first_byte_timeout", "2s"), upstream(registry.url())],
        )
        .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd))
        .set("storage.max_size", "5MiB")
        .set("limits.client_idle_timeout", "5s");
    let ferry = Ferry::launcher().log_to_file().start(&cfg.yaml());
    let (url, pid) = (ferry.url(), ferry.pid());
    let auth = basic_auth("soak", "soak-pass");
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let digests = image.blob_digests();

    std::thread::scope(|s| {
        // Chaos: the proxy cycles through resets, stalls and 5xx.
        let chaos_stop = stop.clone();
        s.spawn(move || {
            let faults = [Fault::PassThrough, Fault::Status(503), Fault::TruncateAfter(4096), Fault::StallAfter(8192)];
            for f in faults.iter().cycle() {
                if chaos_stop.load(Ordering::Relaxed) {
                    break;
                }
                chaos.set_fault(f.clone());
                std::thread::park_timeout(Duration::from_secs(2));
            }
        });
        // The crowd: sockets that never send, and slowloris ones that trickle a header.
        s.spawn(|| {
            let host = url.trim_start_matches("http://").to_owned();
            while !stop.load(Ordering::Relaxed) {
                let mut crowd: Vec<TcpStream> = (0..CROWD).filter_map(|_| TcpStream::connect(&host).ok()).collect();
                for c in crowd.iter_mut().step_by(2) {
                    let _ = c.write_all(b"GET /v2/ HTTP/1.1\r\nX-Slow: ");
                }
                std::thread::park_timeout(Duration::from_secs(3));
            }
        });
        for client in 0..CLIENTS {
            let (tally, stop, digests, url, auth) =
                (tally.clone(), stop.clone(), digests.clone(), url.clone(), auth.clone());
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if client % 8 == 0 {
                        let body = format!("soak push {client} {n}").repeat(512);
                        tally.run(|| push_blob(&url, &auth, body.as_bytes()));
                    } else {
                        let d = &digests[(client + n as usize) % digests.len()];
                        tally.run(|| pull_blob(&url, d));
                    }
                }
            });
        }
        // The report: usage every 10 s, until the deadline.
        let started = Instant::now();
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            let (rss, fds) = usage(pid);
            samples.push((started.elapsed().as_secs(), rss, fds));
            eprintln!(
                "soak: t={:>4}s rss={rss} KiB fds={fds} requests={}",
                started.elapsed().as_secs(),
                tally.requests.load(Ordering::Relaxed)
            );
            std::thread::park_timeout(Duration::from_secs(10).min(deadline.saturating_duration_since(Instant::now())));
        }
        stop.store(true, Ordering::Relaxed);
        let mut lat = tally.latencies_ms.lock().unwrap().clone();
        lat.sort_unstable();
        let p99 = lat.get(lat.len().saturating_sub(1).min(lat.len() * 99 / 100)).copied().unwrap_or(0);
        println!(
            "soak: {secs}s, {} requests ({} retried, {} unrecovered), p99 {p99} ms, {} MiB verified, rss {:?} KiB, fds {:?}",
            tally.requests.load(Ordering::Relaxed),
            tally.retried.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            tally.bytes.load(Ordering::Relaxed) >> 20,
            samples.iter().map(|s| s.1).collect::<Vec<_>>(),
            samples.iter().map(|s| s.2).collect::<Vec<_>>(),
        );
    });
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "errors that a retry did not fix");
}

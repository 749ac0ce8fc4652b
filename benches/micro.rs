//! Criterion micro benches for Ferry's hot-path building blocks (issue 7):
//!
//! * `digest`: [`DigestVerifier`] over 64 MiB fed in 1 MiB chunks, the way a fetch hashes what
//!   it streams. The issue asks to confirm ≥ 1.5 GB/s (sha2 picks SHA-NI at run time).
//! * `parse`: [`RepoName::parse`], [`Reference::parse`] and [`Digest::parse`], run on every
//!   request. (`server`'s path splitting is private, so it is not benched here.)
//! * `blob_read`: [`FsStorage::read_blob`] streaming a 256 MiB committed blob from the page
//!   cache, i.e. the cache-hit read path without HTTP.
//!
//! `cargo bench --bench micro`; throughput is printed by Criterion as GiB/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::distribution::{Digest, DigestVerifier, Reference, RepoName};
use ferry::storage::{FsStorage, Storage};
use futures_util::StreamExt;

const MIB: usize = 1 << 20;

/// Deterministic filler; the content does not change sha256's speed, but zero pages could be
/// special-cased by the kernel on the read path.
fn filler(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend_from_slice(&state.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn digest(c: &mut Criterion) {
    let data = filler(64 * MIB);
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(data.len() as u64));
    // ~50 ms per iteration: 20 samples need about 10 s.
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(12));
    g.bench_function("DigestVerifier/64MiB_in_1MiB_chunks", |b| {
        b.iter(|| {
            let mut v = DigestVerifier::new();
            for chunk in data.chunks(MIB) {
                v.update(black_box(chunk));
            }
            black_box(v.finish())
        })
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let digest = format!("sha256:{}", "3f".repeat(32));
    let mut g = c.benchmark_group("parse");
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("RepoName/library_alpine", |b| b.iter(|| RepoName::parse(black_box("library/alpine"))));
    g.bench_function("RepoName/4_components_separators", |b| {
        b.iter(|| RepoName::parse(black_box("team-a/platform__tools/build.images/app-server_v2")))
    });
    g.bench_function("Reference/tag", |b| b.iter(|| Reference::parse(black_box("3.19.1-alpine"))));
    g.bench_function("Reference/digest", |b| b.iter(|| Reference::parse(black_box(&digest))));
    g.bench_function("Digest/sha256", |b| b.iter(|| Digest::parse(black_box(&digest))));
    g.bench_function("RepoName/invalid_uppercase", |b| b.iter(|| RepoName::parse(black_box("library/Alpine"))));
    g.finish();
}

fn blob_read(c: &mut Criterion) {
    const SIZE: usize = 256 * MIB;
    // Same runtime shape as `ferry serve` (multi-thread, one worker per core).
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let dir = tempfile::Builder::new().prefix("ferry-micro-").tempdir().expect("temp dir");
    let storage = FsStorage::open(dir.path()).expect("open storage");
    let data = filler(SIZE);
    let digest = Digest::of(&data);
    let path = storage.blob_path(&digest);
    std::fs::create_dir_all(path.parent().expect("blob dir")).expect("create blob dir");
    std::fs::write(&path, &data).expect("write blob");
    drop(data);

    let mut g = c.benchmark_group("blob_read");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("FsStorage::read_blob/256MiB_page_cache", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut stream =
                    storage.read_blob(&digest, 0, SIZE as u64).await.expect("read_blob").expect("blob present");
                let mut total = 0usize;
                while let Some(chunk) = stream.next().await {
                    total += chunk.expect("chunk").len();
                }
                assert_eq!(total, SIZE);
                total
            })
        })
    });
    g.finish();
}

criterion_group!(benches, digest, parse, blob_read);
criterion_main!(benches);

//! Crash safety and a bounded, fallible disk: SIGKILL in the middle of cold pulls, a
//! filesystem that fills up, and the `ferry cache` maintenance commands.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::fault::{Fault, FaultProxy};
use crate::harness::*;

fn assert_image(dir: &Path, image: &Image) {
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), image.manifest_bytes);
    for d in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&d))), d, "blob {d}");
    }
}

fn ferry_cmd(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ferry_bin()).arg("cache").args(args).arg("--config").arg(config).output().unwrap()
}

/// Every committed blob hashes to its name.
fn assert_store_consistent(data: &Path) {
    // A bucket has no directory until something is stored under it.
    let Ok(shards) = fs::read_dir(store_path(data, "blobs/sha256")) else { return };
    for shard in shards {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(sha256_file(&path), format!("sha256:{name}"), "a visible blob is not what its name says");
        }
    }
}

fn staging_files(data: &Path) -> usize {
    fs::read_dir(data.join("tmp")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn sigkill_during_ten_cold_pulls_leaves_a_clean_cache() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let images: Vec<Image> = (0..10)
        .map(|i| {
            let tag = format!("t{i}");
            let img = build_image(&layout, &tag, &[3 << 20], 200 + i);
            push_layout(&layout, &tag, &format!("{}/library/crash:{tag}", registry.host()), false).unwrap();
            img
        })
        .collect();
    // Every layer stalls after 1 MiB, so all ten fetches are surely mid-way when Ferry dies.
    let proxy = FaultProxy::start(&registry.host(), Fault::on_blobs(Fault::StallAfter(1 << 20)));
    let data = work.path().join("data");
    let cfg = FerryConfig::new(&data).registry("docker.io", [upstream(proxy.url()).opt("idle_timeout", "5m")]);
    let mut ferry = Ferry::start(&cfg.yaml());
    let pulls: Vec<_> = (0..10)
        .map(|i| {
            let src = format!("{}/library/crash:t{i}", ferry.host());
            let dest = work.path().join(format!("dead{i}"));
            std::thread::spawn(move || pull_to_dir(&src, &dest))
        })
        .collect();
    eventually("ten fetches in flight", || metric(&scrape(&ferry), "ferry_inflight_fetches") >= 10.0);
    assert!(staging_files(&data) >= 10, "fetches are staged");
    ferry.kill9();
    for p in pulls {
        assert!(p.join().unwrap().is_err(), "a pull survived SIGKILL of its server");
    }
    assert_store_consistent(&data);

    proxy.set_fault(Fault::PassThrough);
    ferry.restart();
    assert_eq!(staging_files(&data), 0, "leftovers are removed at start-up");
    let verify = ferry_cmd(&ferry.config_path(), &["verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    for (i, img) in images.iter().enumerate() {
        let out = work.path().join(format!("ok{i}"));
        pull_to_dir(&format!("{}/library/crash:t{i}", ferry.host()), &out).unwrap();
        assert_image(&out, img);
        wait_cached(&data, &img.blob_digests());
    }
    assert_store_consistent(&data);
    let verify = ferry_cmd(&ferry.config_path(), &["verify"]);
    let text = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(verify.status.success() && text.contains("blobs verified: 20"), "{text}");
}

/// A tmpfs of `mib` MiB mounted for the test's lifetime (needs root, as CI has).
struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    fn mount(dir: PathBuf, mib: u32) -> TinyFs {
        fs::create_dir_all(&dir).unwrap();
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(&dir).output();
        match out {
            Ok(o) if o.status.success() => TinyFs { dir },
            other => panic!("this test mounts a tmpfs and needs root (CI runs as root): {other:?}"),
        }
    }

    fn resize(&self, mib: u32) {
        let o = Command::new("mount").args(["-o", &format!("remount,size={mib}m")]).arg(&self.dir).output().unwrap();
        assert!(o.status.success(), "{o:?}");
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_full_disk_never_fails_a_pull_and_caching_resumes_with_space() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let big = build_image(&layout, "big", &[12 << 20, 2048], 301);
    let later = build_image(&layout, "later", &[6 << 20], 302);
    push_layout(&layout, "big", &format!("{}/library/full:big", registry.host()), false).unwrap();
    push_layout(&layout, "later", &format!("{}/library/full:later", registry.host()), false).unwrap();
    let data = work.path().join("data");
    let tiny = TinyFs::mount(data.clone(), 4);
    let ferry = Ferry::start(&FerryConfig::new(&data).registry("docker.io", [upstream(registry.url())]).yaml());

    // Two clients at once: both must get every byte although the disk fills up mid-blob.
    let pulls: Vec<_> = (0..2)
        .map(|i| {
            let src = format!("{}/library/full:big", ferry.host());
            let dest = work.path().join(format!("big{i}"));
            std::thread::spawn(move || pull_to_dir(&src, &dest).map(|_| dest))
        })
        .collect();
    for p in pulls {
        assert_image(&p.join().unwrap().unwrap(), &big);
    }
    assert_store_consistent(&data);
    let (layer, _) = &big.layers[0];
    assert!(!cached_blob(&data, layer));
    eventually("staging files removed", || staging_files(&data) == 0);
    assert!(metric(&scrape(&ferry), "ferry_cache_write_errors_total") >= 1.0);
    assert!(ferry.log_text().contains("streaming the rest uncached"));

    // Space returns: the next blob is cached again.
    tiny.resize(64);
    let out = work.path().join("later");
    pull_to_dir(&format!("{}/library/full:later", ferry.host()), &out).unwrap();
    assert_image(&out, &later);
    wait_cached(&data, &later.blob_digests());
    assert_store_consistent(&data);
}

#[test]
fn cache_verify_quarantines_a_corrupted_blob_and_prune_and_stats_work() {
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[64 * 1024, 32 * 1024], 401);
    push_layout(&layout, "v1", &format!("{}/library/maint:v1", registry.host()), false).unwrap();
    let data = work.path().join("data");
    let ferry = Ferry::start(&FerryConfig::new(&data).registry("docker.io", [upstream(registry.url())]).yaml());
    pull_to_dir(&format!("{}/library/maint:v1", ferry.host()), work.path().join("a")).unwrap();
    wait_cached(&data, &image.blob_digests());

    let stats = ferry_cmd(&ferry.config_path(), &["stats", "--server", &ferry.url()]);
    let text = String::from_utf8_lossy(&stats.stdout).into_owned();
    assert!(stats.status.success(), "{text}");
    assert!(
        text.contains("blobs:      3") && text.contains("manifests:  1") && text.contains("tags:       1"),
        "{text}"
    );
    assert!(text.contains("ferry_cache_requests_total{kind=\"blob\",result=\"miss\"} 3"), "{text}");

    // Bit rot in a cached layer: verify finds it, quarantines it, exits non-zero.
    let (layer, _) = &image.layers[0];
    let path = store_path(&data, &blob_key(layer));
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 1;
    fs::write(&path, bytes).unwrap();
    let verify = ferry_cmd(&ferry.config_path(), &["verify"]);
    let text = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert_eq!(verify.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("MISMATCH {layer}")), "{text}");
    assert!(!path.exists() && store_path(&data, &format!("quarantine/{}", digest_hex(layer))).exists());
    // The next pull fetches it again, correct.
    let out = work.path().join("b");
    pull_to_dir(&format!("{}/library/maint:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    wait_cached(&data, &image.blob_digests());
    assert!(ferry_cmd(&ferry.config_path(), &["verify"]).status.success());

    let prune = ferry_cmd(&ferry.config_path(), &["prune", "--max-size", "40KiB"]);
    assert!(prune.status.success(), "{prune:?}");
    let total: u64 = fs::read_dir(store_path(&data, "blobs/sha256"))
        .unwrap()
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 40 * 1024, "{total} bytes left");
}

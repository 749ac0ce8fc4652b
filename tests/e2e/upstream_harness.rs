//! Proves the end-to-end harness (`harness/`) against the real tools, without Ferry:
//! images generated in-process survive a push to and pull from a real `docker-registry`
//! via `skopeo` byte for byte, and the registry's access log counts the blob fetches.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

/// Asserts that `dir` (a skopeo `dir:` copy) holds every blob of `image`, byte-identical to the
/// generated layout's copy.
fn assert_dir_has_image_blobs(dir: &Path, layout: &Path, image: &Image) {
    for digest in image.blob_digests() {
        let pulled = dir.join(digest_hex(&digest));
        assert_eq!(sha256_file(&pulled), digest, "pulled blob {}", pulled.display());
        assert_eq!(
            fs::read(&pulled).unwrap(),
            fs::read(blob_path(layout, &digest)).unwrap(),
            "pulled blob {digest} differs from the generated one"
        );
    }
    for (digest, size) in &image.layers {
        assert_eq!(fs::metadata(dir.join(digest_hex(digest))).unwrap().len(), *size);
    }
}

/// GETs of `/blobs/<digest>` answered 200, per digest.
fn blob_gets(registry: &Registry, digest: &str) -> usize {
    let path = format!("/blobs/{digest}");
    registry.requests().iter().filter(|e| e.method == "GET" && e.status == 200 && e.path.ends_with(&path)).count()
}

#[test]
fn single_arch_image_round_trips_through_registry() {
    require_tool("tar");
    let registry = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 3 << 20], 42);

    // Generated content is what it claims to be.
    assert_eq!(sha256_bytes(&image.manifest_bytes), image.manifest_digest);
    assert_eq!(sha256_file(blob_path(&layout, &image.config_digest)), image.config_digest);
    for (digest, size) in &image.layers {
        let path = blob_path(&layout, digest);
        assert_eq!(sha256_file(&path), *digest);
        assert_eq!(fs::metadata(&path).unwrap().len(), *size);
        let listing = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
        assert!(listing.status.success(), "tar rejects layer {digest}: {listing:?}");
        assert_eq!(String::from_utf8_lossy(&listing.stdout).lines().count(), 1);
    }
    assert_eq!(image.layers[0].1, 512 + 1024 + 1024);
    assert_eq!(image.layers[1].1, 512 + (3 << 20) + 1024);
    let again = build_image(work.path().join("again"), "v1", &[1024, 3 << 20], 42);
    assert_eq!(again.manifest_digest, image.manifest_digest, "not deterministic");

    // Push, then read the manifest back by tag, by digest and over plain HTTP.
    let reference = format!("{}/e2e/single:v1", registry.host());
    push_layout(&layout, "v1", &reference, false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inspect_raw(&reference).unwrap(), image.manifest_bytes);
    let by_digest = format!("{}/e2e/single@{}", registry.host(), image.manifest_digest);
    assert_eq!(inspect_raw(&by_digest).unwrap(), image.manifest_bytes);
    let response =
        http_request("GET", &format!("{}/v2/e2e/single/manifests/v1", registry.url()), &[("Accept", OCI_MANIFEST)])
            .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("docker-content-digest"), Some(image.manifest_digest.as_str()));
    assert_eq!(response.body, image.manifest_bytes);
    assert_eq!(list_tags(&format!("{}/e2e/single", registry.host())).unwrap(), ["v1"]);

    // Pushing fetches no blob: every GET below comes from the pulls.
    assert_eq!(registry.count_requests("GET", "/blobs/"), 0);

    let pulled = work.path().join("pulled-dir");
    pull_to_dir(&reference, &pulled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(pulled.join("manifest.json")).unwrap(), image.manifest_bytes);
    assert_dir_has_image_blobs(&pulled, &layout, &image);
    assert_eq!(registry.count_requests("GET", "/blobs/"), image.blob_digests().len());
    for digest in image.blob_digests() {
        assert_eq!(blob_gets(&registry, &digest), 1, "GETs of {digest}");
    }

    let oci = work.path().join("pulled-oci");
    pull_to_oci(&reference, &oci, "copy").unwrap_or_else(|e| panic!("{e}"));
    let oci_index: serde_json::Value = serde_json::from_slice(&fs::read(oci.join("index.json")).unwrap()).unwrap();
    assert_eq!(oci_index["manifests"][0]["digest"], image.manifest_digest.as_str());
    assert_eq!(oci_index["manifests"][0]["annotations"][REF_NAME_ANNOTATION], "copy");
    for digest in image.blob_digests().iter().chain([&image.manifest_digest]) {
        assert_eq!(sha256_file(blob_path(&oci, digest)), *digest);
    }
    assert_eq!(registry.count_requests("GET", "/blobs/"), 2 * image.blob_digests().len());
    // inspect, plain HTTP, dir: pull, oci: pull.
    assert_eq!(registry.count_requests("GET", "/manifests/v1"), 4);
    assert_eq!(registry.count_requests("DELETE", "/"), 0);
}

#[test]
fn multi_arch_index_round_trips_with_auth_and_restart() {
    let creds = ("ferry", "s3cret-pass");
    let mut registry = Registry::start_with(RegistryOpts { htpasswd: Some((creds.0.into(), creds.1.into())) });
    assert_eq!(registry.creds(), Some(creds));
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let platforms = [("linux", "amd64"), ("linux", "arm64")];
    let index = build_index(&layout, "multi", &platforms, 7);
    assert_eq!(sha256_bytes(&index.index_bytes), index.index_digest);
    assert_eq!(index.images.len(), 2);
    let parsed: serde_json::Value = serde_json::from_slice(&index.index_bytes).unwrap();
    assert_eq!(parsed["mediaType"], OCI_INDEX);
    for (entry, image) in parsed["manifests"].as_array().unwrap().iter().zip(&index.images) {
        assert_eq!(entry["digest"], image.manifest_digest.as_str());
        assert_eq!(entry["platform"]["architecture"], image.platform.1.as_str());
    }

    // The registry really demands the credentials.
    let v2 = format!("{}/v2/", registry.url());
    let anonymous = http_request("GET", &v2, &[]).unwrap();
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.header("www-authenticate").unwrap().starts_with("Basic"));
    let auth = basic_auth(creds.0, creds.1);
    assert_eq!(http_request("GET", &v2, &[("Authorization", &auth)]).unwrap().status, 200);

    let reference = format!("{}/e2e/multi:m", registry.host());
    let denied = push_layout(&layout, "multi", &reference, true).unwrap_err();
    assert!(denied.contains("unauthorized"), "unexpected error: {denied}");
    push_layout_creds(&layout, "multi", &reference, true, creds).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inspect_raw_creds(&reference, creds).unwrap(), index.index_bytes);

    let pulled = work.path().join("all");
    pull_to_dir_creds(&reference, &pulled, creds).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(pulled.join("manifest.json")).unwrap(), index.index_bytes);
    for image in &index.images {
        let manifest = pulled.join(format!("{}.manifest.json", digest_hex(&image.manifest_digest)));
        assert_eq!(fs::read(manifest).unwrap(), image.manifest_bytes);
        assert_dir_has_image_blobs(&pulled, &layout, image);
    }
    for digest in index.blob_digests() {
        assert_eq!(blob_gets(&registry, &digest), 1, "GETs of {digest}");
    }
    // The anonymous push was refused; every blob GET carried the credentials.
    assert_eq!(registry.count_requests("GET", "/blobs/"), index.blob_digests().len());
    let requests = registry.requests();
    assert!(requests.iter().any(|e| e.method == "HEAD" && e.status == 401));
    let refused_gets: Vec<&AccessLogEntry> =
        requests.iter().filter(|e| e.method == "GET" && e.path.contains("/blobs/") && e.status != 200).collect();
    assert!(refused_gets.is_empty(), "{refused_gets:?}");

    // A restart keeps port and storage; a single-platform pull fetches only that image.
    let port = registry.port();
    let old_pid = registry.pid();
    registry.restart();
    assert_eq!(registry.port(), port);
    assert_ne!(registry.pid(), old_pid);
    let arm = &index.images[1];
    let arm_dir = work.path().join("arm64");
    pull_platform_to_dir_creds(&reference, &arm_dir, ("linux", "arm64"), creds).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(arm_dir.join("manifest.json")).unwrap(), arm.manifest_bytes);
    assert_dir_has_image_blobs(&arm_dir, &layout, arm);
    for digest in arm.blob_digests() {
        assert_eq!(blob_gets(&registry, &digest), 2, "GETs of {digest}");
    }
    for digest in index.images[0].blob_digests() {
        assert_eq!(blob_gets(&registry, &digest), 1, "GETs of {digest}");
    }

    registry.stop();
    assert!(!registry.is_running());
    assert!(http_request("GET", &v2, &[]).is_err(), "registry still answering after stop");
}

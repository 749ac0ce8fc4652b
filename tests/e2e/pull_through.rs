//! Pull-through end to end: a real Distribution upstream, real skopeo, the real `ferry` binary.
//! Images are pulled through Ferry, compared byte for byte with what was generated, then pulled
//! again with the upstream stopped, from Ferry's cache alone.

use std::fs;
use std::path::Path;

use crate::harness::{self, *};
use serde_json::Value;

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A Ferry config mirroring docker.io from `upstreams`, in order.
fn mirror_config(storage: &Path, upstreams: &[String]) -> String {
    FerryConfig::new(storage).registry("docker.io", upstreams.iter().map(upstream)).yaml()
}

/// Asserts that a skopeo `dir:` copy holds `image`'s manifest and blobs, byte for byte.
fn assert_pulled(dir: &Path, layout: &Path, manifest_file: &str, image: &Image) {
    assert_eq!(fs::read(dir.join(manifest_file)).unwrap(), image.manifest_bytes, "manifest bytes differ");
    for digest in image.blob_digests() {
        let pulled = dir.join(digest_hex(&digest));
        assert_eq!(sha256_file(&pulled), digest);
        assert_eq!(fs::metadata(&pulled).unwrap().len(), fs::metadata(blob_path(layout, &digest)).unwrap().len());
    }
}

fn error_code(resp: &HttpResponse) -> String {
    let v: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", resp.text()));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn single_arch_image_pulls_through_then_from_cache_with_upstream_gone() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 3 << 20], 7);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", upstream.host()), false).unwrap();
    let ferry = Ferry::start(&mirror_config(&work.path().join("data"), &[upstream.url()]));

    // Cold pull: `app` is Docker Hub shorthand for `library/app`.
    let cold = work.path().join("cold");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &cold).unwrap();
    assert_pulled(&cold, &layout, "manifest.json", &image);
    for digest in image.blob_digests() {
        assert_eq!(upstream.count_requests("GET", &format!("/blobs/{digest}")), 1, "one upstream GET for {digest}");
    }
    assert_eq!(inspect_raw(&format!("{}/library/app:v1", ferry.host())).unwrap(), image.manifest_bytes);

    // Warm pull: no blob goes upstream again.
    let warm = work.path().join("warm");
    pull_to_dir(&format!("{}/library/app:v1", ferry.host()), &warm).unwrap();
    assert_pulled(&warm, &layout, "manifest.json", &image);
    for digest in image.blob_digests() {
        assert_eq!(upstream.count_requests("GET", &format!("/blobs/{digest}")), 1, "{digest} fetched again");
    }

    // The upstream is gone: by digest and by tag still work, from disk.
    upstream.stop();
    let offline = work.path().join("offline");
    pull_to_dir(&format!("{}/library/app@{}", ferry.host(), image.manifest_digest), &offline).unwrap();
    assert_pulled(&offline, &layout, "manifest.json", &image);
    let offline_tag = work.path().join("offline-tag");
    pull_to_dir(&format!("{}/app:v1", ferry.host()), &offline_tag).unwrap();
    assert_pulled(&offline_tag, &layout, "manifest.json", &image);
}

#[test]
fn oci_index_and_docker_list_pull_through_byte_exact() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let index = build_index(&layout, "multi", &[("linux", "amd64"), ("linux", "arm64")], 11);
    push_layout(&layout, "multi", &format!("{}/team/multi:v1", upstream.host()), true).unwrap();
    // The same images as Docker schema 2: a manifest list over Docker v2 manifests.
    skopeo_ok(&[
        "copy",
        "--all",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{}/team/dockerlist:v1", upstream.host()),
    ])
    .unwrap();
    let docker_list = inspect_raw(&format!("{}/team/dockerlist:v1", upstream.host())).unwrap();
    let ferry = Ferry::start(&mirror_config(&work.path().join("data"), &[upstream.url()]));

    let oci = work.path().join("oci");
    pull_to_dir(&format!("{}/team/multi:v1", ferry.host()), &oci).unwrap();
    assert_eq!(fs::read(oci.join("manifest.json")).unwrap(), index.index_bytes, "index trimmed or converted");
    for image in &index.images {
        assert_pulled(&oci, &layout, &format!("{}.manifest.json", digest_hex(&image.manifest_digest)), image);
    }

    let docker = work.path().join("docker");
    pull_to_dir(&format!("{}/team/dockerlist:v1", ferry.host()), &docker).unwrap();
    let pulled_list = fs::read(docker.join("manifest.json")).unwrap();
    assert_eq!(pulled_list, docker_list);
    let list: Value = serde_json::from_slice(&pulled_list).unwrap();
    assert_eq!(list["mediaType"], DOCKER_LIST);
    assert_eq!(list["manifests"][0]["mediaType"], DOCKER_V2);

    // Offline, by the index digest: every platform's manifest and blob comes from the cache.
    upstream.stop();
    let offline = work.path().join("offline");
    pull_to_dir(&format!("{}/team/multi@{}", ferry.host(), index.index_digest), &offline).unwrap();
    assert_eq!(fs::read(offline.join("manifest.json")).unwrap(), index.index_bytes);
    for image in &index.images {
        assert_pulled(&offline, &layout, &format!("{}.manifest.json", digest_hex(&image.manifest_digest)), image);
    }
}

#[test]
fn manifest_and_blob_headers_match_the_upstream_and_ranges_work() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[200 * 1024], 3);
    push_layout(&layout, "v1", &format!("{}/library/hdr:v1", upstream.host()), false).unwrap();
    skopeo_ok(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/library/hdr:docker", upstream.host()),
    ])
    .unwrap();
    let ferry = Ferry::start(&mirror_config(&work.path().join("data"), &[upstream.url()]));

    for (tag, accept) in [("v1", OCI_MANIFEST), ("docker", DOCKER_V2)] {
        let accept_all = format!("{accept}, {OCI_INDEX}, {DOCKER_LIST}");
        let direct = http_request(
            "GET",
            &format!("{}/v2/library/hdr/manifests/{tag}", upstream.url()),
            &[("Accept", &accept_all)],
        )
        .unwrap();
        assert_eq!(direct.status, 200);
        for method in ["GET", "HEAD"] {
            let via =
                http_request(method, &format!("{}/v2/hdr/manifests/{tag}", ferry.url()), &[("Accept", &accept_all)])
                    .unwrap();
            assert_eq!(via.status, 200, "{method} {tag}: {}", via.text());
            for h in ["content-type", "docker-content-digest", "content-length"] {
                assert_eq!(via.header(h), direct.header(h), "{method} {tag}: header {h}");
            }
            assert_eq!(via.header("docker-distribution-api-version"), Some("registry/2.0"));
            let want: &[u8] = if method == "GET" { &direct.body } else { b"" };
            assert_eq!(via.body, want, "{method} {tag}: body");
        }
    }

    let (layer, size) = image.layers[0].clone();
    let blob_url = format!("{}/v2/library/hdr/blobs/{layer}", ferry.url());
    let original = fs::read(blob_path(&layout, &layer)).unwrap();
    // A range on a cold blob is served from the fetch in progress.
    let part = http_request("GET", &blob_url, &[("Range", "bytes=1000-1999")]).unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some(format!("bytes 1000-1999/{size}").as_str()));
    assert_eq!(part.body, original[1000..2000]);
    let head = http_request("HEAD", &blob_url, &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(size.to_string().as_str()));
    assert_eq!(head.header("docker-content-digest"), Some(layer.as_str()));
    assert!(head.body.is_empty());
    let tail = http_request("GET", &blob_url, &[("Range", "bytes=-10")]).unwrap();
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, original[original.len() - 10..]);
    let whole = http_request("GET", &blob_url, &[]).unwrap();
    assert_eq!(sha256_bytes(&whole.body), layer);
    let beyond = http_request("GET", &blob_url, &[("Range", &format!("bytes={size}-"))]).unwrap();
    assert_eq!(beyond.status, 416);
    assert_eq!(upstream.count_requests("GET", &format!("/blobs/{layer}")), 1, "the blob was fetched once");
}

#[test]
fn bad_requests_get_the_spec_error_json() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let ferry = Ferry::start(&mirror_config(&work.path().join("data"), &[upstream.url()]));
    let digest = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("GET", "/v2/Upper/app/manifests/v1".into(), 400, "NAME_INVALID"),
        ("GET", "/v2/a/../b/manifests/v1".into(), 400, "NAME_INVALID"),
        ("GET", "/v2/a__-b/manifests/v1".into(), 400, "NAME_INVALID"),
        ("GET", "/v2/library/app/blobs/sha256:xyz".into(), 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/app/blobs/md5:abc".into(), 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/app/manifests/sha256:12".into(), 400, "DIGEST_INVALID"),
        // Distribution and the OCI conformance tests: a reference that cannot be a tag names
        // no manifest (404), on reads; a PUT of one is invalid (400, tests/e2e/hosted.rs).
        ("GET", "/v2/library/app/manifests/-bad-tag".into(), 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/library/app/manifests/-bad-tag".into(), 404, ""),
        ("GET", "/v2/library/nothing/manifests/v1".into(), 404, "MANIFEST_UNKNOWN"),
        ("GET", format!("/v2/library/nothing/manifests/{digest}"), 404, "MANIFEST_UNKNOWN"),
        ("GET", format!("/v2/library/nothing/blobs/{digest}"), 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/org/app/manifests/v1?ns=evil.example".into(), 404, "NAME_UNKNOWN"),
        ("GET", "/v2/evil.example/org/app/manifests/v1".into(), 404, "NAME_UNKNOWN"),
        ("PUT", "/v2/library/app/manifests/v1".into(), 405, "UNSUPPORTED"),
        ("POST", "/v2/library/app/blobs/uploads/".into(), 405, "UNSUPPORTED"),
        ("DELETE", format!("/v2/library/app/blobs/{digest}"), 405, "UNSUPPORTED"),
        ("GET", "/v2/nothing-here".into(), 404, "NAME_UNKNOWN"),
    ];
    for (method, path, status, code) in cases {
        let resp = http_request(method, &format!("{}{path}", ferry.url()), &[]).unwrap();
        assert_eq!(resp.status, status, "{method} {path}: {}", resp.text());
        assert_eq!(resp.header("content-type"), Some("application/json"), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(error_code(&resp), code, "{method} {path}: {}", resp.text());
        }
    }
    // The unknown registry was never dialled, and the refusal does not tell an anonymous
    // client which registries are mirrored.
    let resp = http_request("GET", &format!("{}/v2/evil.example/x/manifests/v1", ferry.url()), &[]).unwrap();
    assert!(resp.text().contains("evil.example") && !resp.text().contains("docker.io"), "{}", resp.text());
    let v2 = http_request("GET", &format!("{}/v2/", ferry.url()), &[]).unwrap();
    assert_eq!(v2.status, 200);
    assert_eq!(v2.header("docker-distribution-api-version"), Some("registry/2.0"));
}

#[test]
fn client_credentials_are_never_forwarded_and_ferry_uses_its_own() {
    let upstream = Registry::start_with(RegistryOpts { htpasswd: Some(("ferry".into(), "s3cret-pass".into())) });
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[4096], 5);
    let dest = format!("{}/library/private:v1", upstream.host());
    push_layout_creds(&layout, "v1", &dest, false, ("ferry", "s3cret-pass")).unwrap();

    // Without its own credentials, Ferry cannot pull, even when the client sends valid ones
    // (Docker sends its Docker Hub credentials to every mirror; they must go nowhere).
    let anon = Ferry::start(&mirror_config(&work.path().join("anon"), &[upstream.url()]));
    let auth = basic_auth("ferry", "s3cret-pass");
    let resp = http_request(
        "GET",
        &format!("{}/v2/library/private/manifests/v1", anon.url()),
        &[("Authorization", &auth), ("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains(&upstream.host()), "the error names the upstream: {}", resp.text());
    assert!(!resp.text().contains(&upstream.url()), "by name, not by URL: {}", resp.text());
    assert!(!anon.log_text().contains("s3cret-pass"));

    // With credentials in its config, Ferry pulls for an anonymous client (Basic auth).
    let config = FerryConfig::new(work.path().join("authed"))
        .registry("docker.io", [harness::upstream(upstream.url()).creds("ferry", "s3cret-pass")]);
    let authed = Ferry::start(&config.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/library/private:v1", authed.host()), &out).unwrap();
    assert_pulled(&out, &layout, "manifest.json", &image);
    assert!(!authed.log_text().contains("s3cret-pass"), "a secret reached the log");
}

#[test]
fn connection_refused_first_upstream_is_skipped() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[64 * 1024], 9);
    push_layout(&layout, "v1", &format!("{}/library/fo:v1", upstream.host()), false).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let ferry = Ferry::start(&mirror_config(&work.path().join("data"), &[dead, upstream.url()]));
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/fo:v1", ferry.host()), &out).unwrap();
    assert_pulled(&out, &layout, "manifest.json", &image);
}

#[test]
fn check_config_names_the_key_path_and_version_prints() {
    let work = tmp_dir();
    let bad = work.path().join("bad.yml");
    fs::write(
        &bad,
        "registries:\n  docker.io:\n    upstreams:\n      - url: \"http://ok.example\"\n      - url: \"ftp://nope\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(ferry_bin()).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registries.docker.io.upstreams[1].url"), "{err}");

    let typo = work.path().join("typo.yml");
    fs::write(&typo, "storage:\n  rooot: /x\n").unwrap();
    let out = std::process::Command::new(ferry_bin()).args(["check-config", "--config"]).arg(&typo).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rooot"));

    let good = work.path().join("good.yml");
    fs::write(
        &good,
        "registries:\n  docker.io:\n    upstreams:\n      - {url: \"https://registry-1.docker.io\", username: u, password: hunter2}\n",
    )
    .unwrap();
    let out = std::process::Command::new(ferry_bin()).args(["check-config", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("registry-1.docker.io") && !printed.contains("hunter2"), "{printed}");

    let out = std::process::Command::new(ferry_bin()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ferry "), "{out:?}");
}

#[test]
fn denied_repositories_are_refused_before_any_upstream_request_and_allowed_ones_pull() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024], 71);
    for repo in ["library/app", "library/cryptominer-x", "someone/app"] {
        push_layout(&layout, "v1", &format!("{}/{repo}:v1", upstream.host()), false).unwrap();
    }
    let config = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [harness::upstream(upstream.url())])
        .registry_opt("docker.io", "allow", ["library/*"])
        .registry_opt("docker.io", "deny", ["*/cryptominer*"]);
    let ferry = Ferry::start(&config.yaml());

    let out = work.path().join("pulled");
    pull_to_dir(&format!("{}/library/app:v1", ferry.host()), &out).unwrap();
    assert_pulled(&out, &layout, "manifest.json", &image);
    let before = upstream.requests().len();
    for (name, why) in [
        ("cryptominer-x", "denied by registries.docker.io.deny[0] = */cryptominer*"),
        ("someone/app", "not in registries.docker.io.allow"),
    ] {
        for what in ["manifests/v1".to_owned(), format!("blobs/{}", image.layers[0].0)] {
            let r = http_request("GET", &format!("{}/v2/{name}/{what}", ferry.url()), &[]).unwrap();
            assert_eq!((r.status, error_code(&r).as_str()), (403, "DENIED"), "{name}/{what}");
            assert!(r.text().contains(why), "{}", r.text());
        }
        assert!(pull_to_dir(&format!("{}/{name}:v1", ferry.host()), work.path().join("no")).is_err());
    }
    assert_eq!(upstream.requests().len(), before, "a denied repository reached the upstream");
    assert!(metric(&scrape(&ferry), "ferry_pulls_denied_total{registry=\"docker.io\"}") >= 4.0);

    let bad = work.path().join("bad.yml");
    let text = format!(
        "{}    deny: [\"[a-\"]\n",
        "registries:\n  docker.io:\n    upstreams: [{url: \"https://r.example\"}]\n"
    );
    fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(ferry_bin()).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registries.docker.io.deny[0]") && err.contains("not a glob"), "{err}");
}

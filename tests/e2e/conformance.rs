//! A walk through the OCI distribution-spec's four conformance categories — pull, push, content
//! discovery, content management — against Ferry's hosted namespace, with raw HTTP so that
//! every status code and header the spec names is checked as a client receives it.

use crate::harness::*;
use serde_json::{json, Value};

const USER: Creds<'static> = ("conformance", "s3cret");
const REPO: &str = "internal/conformance/app";

struct Reg {
    ferry: Ferry,
    _work: tempfile::TempDir,
}

impl Reg {
    fn start(delete: bool) -> Reg {
        let work = tmp_dir();
        let htpasswd = write_htpasswd(work.path(), &[USER]);
        let cfg = FerryConfig::new(work.path().join("data"))
            .registry("docker.io", [upstream("http://127.0.0.1:9")])
            .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd).delete(delete));
        Reg { ferry: Ferry::start(&cfg.yaml()), _work: work }
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let auth = basic_auth(USER.0, USER.1);
        let mut all = headers.to_vec();
        all.push(("Authorization", &auth));
        let url = if path.starts_with("http://") { path.to_owned() } else { format!("{}{path}", self.ferry.url()) };
        http_request_body(method, &url, &all, body).unwrap()
    }

    fn get(&self, path: &str) -> HttpResponse {
        self.call("GET", path, &[], b"")
    }

    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_bytes(bytes);
        let r = self.call("POST", &format!("/v2/{repo}/blobs/uploads/?digest={digest}"), &[], bytes);
        assert_eq!(r.status, 201, "{}", r.text());
        digest
    }

    fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> HttpResponse {
        self.call("PUT", &format!("/v2/{repo}/manifests/{reference}"), &[("Content-Type", media_type)], bytes)
    }
}

fn code(r: &HttpResponse) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_owned()
}

fn json_body(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// An image: config + one layer, pushed; returns (manifest bytes, manifest digest, layer digest).
fn push_image(reg: &Reg, repo: &str, tag: &str, seed: u8) -> (Vec<u8>, String, String) {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
    let layer: Vec<u8> = (0..50_000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let config_digest = reg.push_blob(repo, &config);
    let layer_digest = reg.push_blob(repo, &layer);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let r = reg.push_manifest(repo, tag, OCI_MANIFEST, &manifest);
    assert_eq!(r.status, 201, "{}", r.text());
    (manifest.clone(), sha256_bytes(&manifest), layer_digest)
}

#[test]
fn pull() {
    let reg = Reg::start(true);
    let (manifest, digest, layer) = push_image(&reg, REPO, "latest", 3);

    for reference in ["latest", digest.as_str()] {
        let path = format!("/v2/{REPO}/manifests/{reference}");
        let head = reg.call("HEAD", &path, &[("Accept", OCI_MANIFEST)], b"");
        assert_eq!(head.status, 200);
        assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(head.header("content-length"), Some(manifest.len().to_string().as_str()));
        let get = reg.call("GET", &path, &[("Accept", OCI_MANIFEST)], b"");
        assert_eq!(get.status, 200);
        assert_eq!(get.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(get.body, manifest, "manifest bytes must be exactly what was pushed");
    }
    let missing = reg.get(&format!("/v2/{REPO}/manifests/nope"));
    assert_eq!((missing.status, code(&missing).as_str()), (404, "MANIFEST_UNKNOWN"));
    let missing = reg.get(&format!("/v2/{REPO}/manifests/{}", sha256_bytes(b"x")));
    assert_eq!((missing.status, code(&missing).as_str()), (404, "MANIFEST_UNKNOWN"));

    let path = format!("/v2/{REPO}/blobs/{layer}");
    let head = reg.call("HEAD", &path, &[], b"");
    assert_eq!((head.status, head.header("content-length")), (200, Some("50000")));
    assert_eq!(head.header("docker-content-digest"), Some(layer.as_str()));
    let get = reg.get(&path);
    assert_eq!(sha256_bytes(&get.body), layer);
    let part = reg.call("GET", &path, &[("Range", "bytes=100-199")], b"");
    assert_eq!((part.status, part.body.len()), (206, 100));
    assert_eq!(part.header("content-range"), Some("bytes 100-199/50000"));
    assert_eq!(reg.call("GET", &path, &[("Range", "bytes=60000-")], b"").status, 416);
    let missing = reg.get(&format!("/v2/{REPO}/blobs/{}", sha256_bytes(b"none")));
    assert_eq!((missing.status, code(&missing).as_str()), (404, "BLOB_UNKNOWN"));
    // A blob of another repository is not readable through this one.
    let elsewhere = reg.get(&format!("/v2/internal/other/blobs/{layer}"));
    assert_eq!(elsewhere.status, 404);
}

#[test]
fn push() {
    let reg = Reg::start(true);
    // POST then PUT (monolithic).
    let data = b"monolithic".to_vec();
    let digest = sha256_bytes(&data);
    let post = reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/"), &[], b"");
    assert_eq!(post.status, 202);
    let location = post.header("location").unwrap().to_owned();
    assert!(post.header("docker-upload-uuid").is_some());
    let put =
        reg.call("PUT", &format!("{location}?digest={digest}"), &[("Content-Type", "application/octet-stream")], &data);
    assert_eq!(put.status, 201, "{}", put.text());
    let blob_location = put.header("location").unwrap().to_owned();
    assert_eq!(reg.get(&blob_location).body, data);

    // Single POST.
    let single =
        reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/?digest={}", sha256_bytes(b"single")), &[], b"single");
    assert_eq!(single.status, 201);
    // The empty blob.
    let empty = sha256_bytes(b"");
    assert_eq!(reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/?digest={empty}"), &[], b"").status, 201);
    assert_eq!(reg.call("HEAD", &format!("/v2/{REPO}/blobs/{empty}"), &[], b"").status, 200);

    // Chunked, with the last chunk in the closing PUT, and a status check between.
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_bytes(&data);
    let post = reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/"), &[("Content-Length", "0")], b"");
    let mut location = post.header("location").unwrap().to_owned();
    let patch = reg.call("PATCH", &location, &[("Content-Range", "0-39999")], &data[..40_000]);
    assert_eq!((patch.status, patch.header("range")), (202, Some("0-39999")));
    location = patch.header("location").unwrap().to_owned();
    let status = reg.get(&location);
    assert_eq!((status.status, status.header("range")), (204, Some("0-39999")));
    let put =
        reg.call("PUT", &format!("{location}?digest={digest}"), &[("Content-Range", "40000-69999")], &data[40_000..]);
    assert_eq!(put.status, 201, "{}", put.text());
    assert_eq!(put.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(reg.get(&format!("/v2/{REPO}/blobs/{digest}")).body, data);

    // Streamed PATCH without Content-Range appends.
    let post = reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/"), &[], b"");
    let location = post.header("location").unwrap().to_owned();
    assert_eq!(reg.call("PATCH", &location, &[], b"abc").status, 202);
    let patch = reg.call("PATCH", &location, &[], b"def");
    assert_eq!(patch.header("range"), Some("0-5"));
    assert_eq!(reg.call("PUT", &format!("{location}?digest={}", sha256_bytes(b"abcdef")), &[], b"").status, 201);

    // Cancel.
    let post = reg.call("POST", &format!("/v2/{REPO}/blobs/uploads/"), &[], b"");
    let location = post.header("location").unwrap().to_owned();
    assert_eq!(reg.call("DELETE", &location, &[], b"").status, 204);
    let gone = reg.get(&location);
    assert_eq!((gone.status, code(&gone).as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));

    // Mount: 201 from a repository holding it, 202 (a fresh upload) otherwise.
    let m = reg.call("POST", &format!("/v2/internal/mounted/blobs/uploads/?mount={digest}&from={REPO}"), &[], b"");
    assert_eq!(m.status, 201);
    assert_eq!(m.header("location"), Some(format!("/v2/internal/mounted/blobs/{digest}").as_str()));
    let m =
        reg.call("POST", &format!("/v2/internal/mounted/blobs/uploads/?mount={digest}&from=internal/none"), &[], b"");
    assert_eq!(m.status, 202);
    assert!(m.header("location").is_some());

    // Manifests by tag and by digest, then an index over them.
    let (manifest, mdigest, _) = push_image(&reg, REPO, "v1", 5);
    let by_digest = reg.push_manifest(REPO, &mdigest, OCI_MANIFEST, &manifest);
    assert_eq!(by_digest.status, 201);
    assert_eq!(by_digest.header("location"), Some(format!("/v2/{REPO}/manifests/{mdigest}").as_str()));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": mdigest, "size": manifest.len(),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .unwrap();
    let r = reg.push_manifest(REPO, "multi", OCI_INDEX, &index);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(reg.get(&format!("/v2/{REPO}/manifests/multi")).body, index);
    // An index over a manifest this repository does not have.
    let bad = String::from_utf8(index).unwrap().replace(&mdigest, &sha256_bytes(b"other"));
    let r = reg.push_manifest(REPO, "bad", OCI_INDEX, bad.as_bytes());
    assert_eq!((r.status, code(&r).as_str()), (404, "MANIFEST_BLOB_UNKNOWN"));
}

#[test]
fn content_discovery() {
    let reg = Reg::start(true);
    let (manifest, digest, _) = push_image(&reg, REPO, "a", 7);
    for tag in ["c", "b", "e", "d"] {
        assert_eq!(reg.push_manifest(REPO, tag, OCI_MANIFEST, &manifest).status, 201);
    }
    let tags = |path: &str| {
        let r = reg.get(path);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_body(&r);
        assert_eq!(v["name"], REPO);
        (v["tags"].clone(), r.header("link").map(str::to_owned))
    };
    assert_eq!(tags(&format!("/v2/{REPO}/tags/list")), (json!(["a", "b", "c", "d", "e"]), None));
    let (page, link) = tags(&format!("/v2/{REPO}/tags/list?n=2"));
    assert_eq!(page, json!(["a", "b"]));
    assert_eq!(link.as_deref(), Some(format!("</v2/{REPO}/tags/list?n=2&last=b>; rel=\"next\"").as_str()));
    assert_eq!(tags(&format!("/v2/{REPO}/tags/list?n=2&last=b")).0, json!(["c", "d"]));
    assert_eq!(tags(&format!("/v2/{REPO}/tags/list?last=c")).0, json!(["d", "e"]));
    assert_eq!(tags(&format!("/v2/{REPO}/tags/list?n=0")), (json!([]), None));
    let unknown = reg.get("/v2/internal/nothing/tags/list");
    assert_eq!((unknown.status, code(&unknown).as_str()), (404, "NAME_UNKNOWN"));

    // Referrers: none yet is an empty index, not a 404.
    let path = format!("/v2/{REPO}/referrers/{digest}");
    let r = reg.get(&path);
    assert_eq!(r.status, 200);
    assert_eq!(json_body(&r)["manifests"], json!([]));
    let empty = reg.push_blob(REPO, b"{}");
    for (kind, n) in [("application/vnd.example.sig", 1), ("application/vnd.example.sbom", 2)] {
        let artifact = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": kind, "digest": empty, "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len()},
            "annotations": {"n": n.to_string()},
        }))
        .unwrap();
        let r = reg.push_manifest(REPO, &sha256_bytes(&artifact), OCI_MANIFEST, &artifact);
        assert_eq!(r.status, 201);
        assert_eq!(r.header("oci-subject"), Some(digest.as_str()));
    }
    let all = json_body(&reg.get(&path));
    assert_eq!(all["mediaType"], OCI_INDEX);
    let mut kinds: Vec<&str> =
        all["manifests"].as_array().unwrap().iter().map(|d| d["artifactType"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["application/vnd.example.sbom", "application/vnd.example.sig"],
        "artifactType falls back to the config's mediaType"
    );
    let filtered = reg.get(&format!("{path}?artifactType=application/vnd.example.sig"));
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    let v = json_body(&filtered);
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["annotations"]["n"], "1");
    assert_eq!(reg.get(&format!("/v2/{REPO}/referrers/not-a-digest")).status, 400);

    // Catalog, paginated.
    push_image(&reg, "internal/zeta", "1", 9);
    push_image(&reg, "internal/alpha", "1", 9);
    let r = reg.get("/v2/_catalog?n=2");
    assert_eq!(json_body(&r)["repositories"], json!(["internal/alpha", REPO]));
    assert_eq!(
        r.header("link"),
        Some(format!("</v2/_catalog?n=2&last={}>; rel=\"next\"", REPO.replace('/', "%2F")).as_str())
    );
    let r = reg.get(&format!("/v2/_catalog?n=2&last={REPO}"));
    assert_eq!(json_body(&r)["repositories"], json!(["internal/zeta"]));
}

#[test]
fn content_management() {
    let reg = Reg::start(true);
    let (_, digest, layer) = push_image(&reg, REPO, "keep", 11);
    assert_eq!(
        reg.push_manifest(REPO, "drop", OCI_MANIFEST, &reg.get(&format!("/v2/{REPO}/manifests/keep")).body).status,
        201
    );

    // Deleting a tag leaves the manifest.
    assert_eq!(reg.call("DELETE", &format!("/v2/{REPO}/manifests/drop"), &[], b"").status, 202);
    assert_eq!(reg.get(&format!("/v2/{REPO}/manifests/drop")).status, 404);
    assert_eq!(reg.get(&format!("/v2/{REPO}/manifests/{digest}")).status, 200);
    assert_eq!(json_body(&reg.get(&format!("/v2/{REPO}/tags/list")))["tags"], json!(["keep"]));

    // Deleting the manifest by digest.
    assert_eq!(reg.call("DELETE", &format!("/v2/{REPO}/manifests/{digest}"), &[], b"").status, 202);
    let r = reg.get(&format!("/v2/{REPO}/manifests/{digest}"));
    assert_eq!((r.status, code(&r).as_str()), (404, "MANIFEST_UNKNOWN"));
    assert_eq!(reg.get(&format!("/v2/{REPO}/manifests/keep")).status, 404);

    // Deleting a blob.
    assert_eq!(reg.call("DELETE", &format!("/v2/{REPO}/blobs/{layer}"), &[], b"").status, 202);
    let r = reg.get(&format!("/v2/{REPO}/blobs/{layer}"));
    assert_eq!((r.status, code(&r).as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(reg.call("DELETE", &format!("/v2/{REPO}/blobs/{layer}"), &[], b"").status, 404);

    // With deletes disabled: 405 UNSUPPORTED, and nothing goes.
    let locked = Reg::start(false);
    let (_, digest, layer) = push_image(&locked, REPO, "keep", 12);
    for path in [format!("/v2/{REPO}/manifests/{digest}"), format!("/v2/{REPO}/blobs/{layer}")] {
        let r = locked.call("DELETE", &path, &[], b"");
        assert_eq!((r.status, code(&r).as_str()), (405, "UNSUPPORTED"));
        assert_eq!(locked.get(&path).status, 200);
    }
}

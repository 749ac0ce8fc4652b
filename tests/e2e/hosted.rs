//! Hosted namespaces end to end: real skopeo pushes and pulls, raw HTTP for the protocol's
//! corners, the real `ferry` binary (serve and gc). Every refusal is checked for what a user sees
//! (status, error code, challenge) and for what it must not leave behind in storage.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;
use serde_json::{json, Value};

const ALICE: Creds<'static> = ("alice", "alice-pw");
const BOB: Creds<'static> = ("bob", "bob-pw");
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Ferry with `internal` and `team-a` hosted (users from `htpasswd`, deletes allowed), docker.io
/// mirrored from `upstream_url`; `hosted` adds to the `hosted:` section.
fn config(data: &Path, htpasswd: &Path, upstream_url: &str, hosted: impl FnOnce(Hosted) -> Hosted) -> String {
    let section = Hosted::new(["internal", "team-a"]).htpasswd(htpasswd).delete(true);
    FerryConfig::new(data).registry("docker.io", [upstream(upstream_url)]).hosted(hosted(section)).yaml()
}

struct Setup {
    work: tempfile::TempDir,
    ferry: Ferry,
}

impl Setup {
    fn start(hosted: impl FnOnce(Hosted) -> Hosted) -> Setup {
        Setup::start_with_upstream("http://127.0.0.1:9", hosted)
    }

    fn start_with_upstream(upstream: &str, hosted: impl FnOnce(Hosted) -> Hosted) -> Setup {
        let work = tmp_dir();
        let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
        let ferry = Ferry::start(&config(&work.path().join("data"), &htpasswd, upstream, hosted));
        Setup { work, ferry }
    }

    fn data(&self) -> PathBuf {
        self.work.path().join("data")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.ferry.url())
    }

    fn req(
        &self,
        method: &str,
        path: &str,
        creds: Option<Creds<'_>>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        let auth = creds.map(|(u, p)| basic_auth(u, p));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        http_request_body(method, &self.url(path), &all, body).unwrap()
    }

    /// POST + monolithic PUT; returns the digest.
    fn upload(&self, repo: &str, creds: Creds<'_>, bytes: &[u8]) -> String {
        let digest = sha256_bytes(bytes);
        let post = self.req("POST", &format!("/v2/{repo}/blobs/uploads/"), Some(creds), &[], b"");
        assert_eq!(post.status, 202, "{}", post.text());
        let location = post.header("location").unwrap().to_owned();
        let put = self.req("PUT", &format!("{location}?digest={digest}"), Some(creds), &[], bytes);
        assert_eq!(put.status, 201, "{}", put.text());
        digest
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> HttpResponse {
        self.req(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            Some(ALICE),
            &[("Content-Type", media_type)],
            bytes,
        )
    }

    /// Every file under the storage root's blobs and hosted metadata.
    fn stored(&self) -> Vec<String> {
        let mut out = files_under(&self.data().join("blobs"));
        out.extend(files_under(&store_path(&self.data(), "objects/hosted")));
        out.extend(files_under(&store_path(&self.data(), "objects/manifests")));
        out
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out.sort();
    out
}

fn code(resp: &HttpResponse) -> String {
    let v: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", resp.text()));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_owned()
}

/// A 401 with Ferry's default challenge: Bearer, pointing at its own token endpoint.
fn assert_challenge(resp: &HttpResponse) {
    assert_eq!(resp.status, 401, "{}", resp.text());
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer realm=\"http://127.0.0.1:")
            && challenge.ends_with("/auth/token\",service=\"ferry\""),
        "{challenge}"
    );
    assert_eq!(code(resp), "UNAUTHORIZED");
}

/// A small OCI image manifest over already-uploaded blobs.
fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> =
        layers.iter().map(|(d, s)| json!({"mediaType": OCI_LAYER_TAR, "digest": d, "size": s})).collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

fn assert_dir_has_image(dir: &Path, manifest_file: &str, image: &Image, layout: &Path) {
    assert_eq!(fs::read(dir.join(manifest_file)).unwrap(), image.manifest_bytes, "manifest bytes differ");
    for digest in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&digest))), digest);
        assert_eq!(fs::read(dir.join(digest_hex(&digest))).unwrap(), fs::read(blob_path(layout, &digest)).unwrap());
    }
}

#[test]
fn skopeo_pushes_multi_layer_and_multi_arch_images_and_pulls_them_back_byte_identical() {
    let s = Setup::start(|h| h);
    let layout = s.work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 3 << 20, 100 * 1024], 21);
    let host = s.ferry.host().to_owned();
    push_layout_creds(&layout, "v1", &format!("{host}/internal/app:v1"), false, ALICE).unwrap();
    let pulled = s.work.path().join("pulled");
    pull_to_dir_creds(&format!("{host}/internal/app:v1"), &pulled, ALICE).unwrap();
    assert_dir_has_image(&pulled, "manifest.json", &image, &layout);
    assert_eq!(
        inspect_raw_creds(&format!("{host}/internal/app@{}", image.manifest_digest), BOB).unwrap(),
        image.manifest_bytes
    );

    // Multi-arch, nested namespace path.
    let index = build_index(&layout, "multi", &[("linux", "amd64"), ("linux", "arm64")], 22);
    push_layout_creds(&layout, "multi", &format!("{host}/team-a/tools/multi:v2"), true, ALICE).unwrap();
    let multi = s.work.path().join("multi");
    pull_to_dir_creds(&format!("{host}/team-a/tools/multi:v2"), &multi, ALICE).unwrap();
    assert_eq!(fs::read(multi.join("manifest.json")).unwrap(), index.index_bytes);
    for img in &index.images {
        assert_dir_has_image(&multi, &format!("{}.manifest.json", digest_hex(&img.manifest_digest)), img, &layout);
    }

    // Docker schema 2 media types too (what `docker push` sends).
    skopeo_ok(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:alice-pw",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{host}/internal/dockerfmt:v1"),
    ])
    .unwrap();
    let raw = inspect_raw_creds(&format!("{host}/internal/dockerfmt:v1"), ALICE).unwrap();
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["mediaType"], DOCKER_V2);
    let docker = s.work.path().join("docker");
    pull_to_dir_creds(&format!("{host}/internal/dockerfmt:v1"), &docker, ALICE).unwrap();
    assert_eq!(fs::read(docker.join("manifest.json")).unwrap(), raw);
}

#[test]
fn credentials_rights_and_proxied_pushes_are_enforced_and_store_nothing() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    build_image(&layout, "v1", &[2048], 31);
    push_layout(&layout, "v1", &format!("{}/library/pub:v1", upstream.host()), false).unwrap();
    let s = Setup::start_with_upstream(&upstream.url(), |h| {
        h.rule("team-a", &["alice"], "push").rule("team-a", &["bob"], "pull")
    });
    let host = s.ferry.host().to_owned();

    // The ping challenges anonymous clients (so they send credentials) and checks passwords.
    assert_challenge(&s.req("GET", "/v2/", None, &[], b""));
    assert_eq!(s.req("GET", "/v2/", Some(ALICE), &[], b"").status, 200);
    assert_challenge(&s.req("GET", "/v2/", Some(("alice", "wrong")), &[], b""));
    assert_challenge(&s.req("GET", "/v2/", Some(("mallory", "alice-pw")), &[], b""));
    assert!(s.ferry.wait_for_log("failed login", std::time::Duration::from_secs(5)));
    assert!(!s.ferry.log_text().contains("alice-pw"), "a password reached the log");

    // No or wrong credentials on a hosted namespace: 401 with the challenge.
    assert_challenge(&s.req("POST", "/v2/team-a/app/blobs/uploads/", None, &[], b""));
    assert_challenge(&s.req("POST", "/v2/team-a/app/blobs/uploads/", Some(("alice", "nope")), &[], b""));
    assert_challenge(&s.req("GET", "/v2/team-a/app/tags/list", None, &[], b""));
    assert!(push_layout(&layout, "v1", &format!("{host}/team-a/app:v1"), false).is_err());
    assert!(push_layout_creds(&layout, "v1", &format!("{host}/team-a/app:v1"), false, ("alice", "nope")).is_err());

    // A user who may only pull: 403 DENIED, and skopeo fails.
    let denied = s.req("POST", "/v2/team-a/app/blobs/uploads/", Some(BOB), &[], b"");
    assert_eq!(denied.status, 403);
    assert_eq!(code(&denied), "DENIED");
    assert!(push_layout_creds(&layout, "v1", &format!("{host}/team-a/app:v1"), false, BOB).is_err());
    // With the rules table, a namespace nobody is given is closed even to known users.
    assert_eq!(s.req("POST", "/v2/internal/x/blobs/uploads/", Some(ALICE), &[], b"").status, 403);

    // A push to a proxied namespace is refused, naming where pushes go.
    let refused = s.req("POST", "/v2/library/pub/blobs/uploads/", Some(ALICE), &[], b"");
    assert_eq!(refused.status, 405);
    assert_eq!(code(&refused), "UNSUPPORTED");
    assert!(refused.text().contains("internal/") && refused.text().contains("team-a/"), "{}", refused.text());
    let err = push_layout_creds(&layout, "v1", &format!("{host}/library/mine:v1"), false, ALICE).unwrap_err();
    assert!(err.contains("team-a/"), "{err}");

    assert!(s.stored().is_empty(), "refused requests stored something: {:?}", s.stored());

    // Proxied pulls stay anonymous; the push right works; the pull-only user can pull.
    let proxied = work.path().join("proxied");
    pull_to_dir(&format!("{host}/library/pub:v1"), &proxied).unwrap();
    push_layout_creds(&layout, "v1", &format!("{host}/team-a/app:v1"), false, ALICE).unwrap();
    pull_to_dir_creds(&format!("{host}/team-a/app:v1"), work.path().join("bob"), BOB).unwrap();
    assert!(pull_to_dir(&format!("{host}/team-a/app:v1"), work.path().join("anon")).is_err());
    upstream.stop();
}

#[test]
fn proxied_namespaces_can_require_credentials() {
    let mut upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    build_image(&layout, "v1", &[2048], 41);
    push_layout(&layout, "v1", &format!("{}/library/pub:v1", upstream.host()), false).unwrap();
    let s = Setup::start_with_upstream(&upstream.url(), |h| {
        h.opt("proxied_requires_auth", true).opt("anonymous_pull", true)
    });
    let host = s.ferry.host().to_owned();
    assert_challenge(&s.req("GET", "/v2/library/pub/manifests/v1", None, &[], b""));
    assert!(pull_to_dir(&format!("{host}/library/pub:v1"), work.path().join("anon")).is_err());
    pull_to_dir_creds(&format!("{host}/library/pub:v1"), work.path().join("alice"), ALICE).unwrap();
    // anonymous_pull opens hosted namespaces for reading, never for writing.
    push_layout_creds(&layout, "v1", &format!("{host}/internal/app:v1"), false, ALICE).unwrap();
    pull_to_dir(&format!("{host}/internal/app:v1"), work.path().join("anon-hosted")).unwrap();
    assert_challenge(&s.req("POST", "/v2/internal/app/blobs/uploads/", None, &[], b""));
    upstream.stop();
}

#[test]
fn bad_input_gets_the_spec_error_and_leaves_nothing_behind() {
    let s = Setup::start(|h| h);
    let blob = b"some layer bytes".to_vec();
    let digest = sha256_bytes(&blob);
    let wrong = sha256_bytes(b"other bytes");

    // Digest mismatch: monolithic PUT and single POST.
    let post = s.req("POST", "/v2/internal/bad/blobs/uploads/", Some(ALICE), &[], b"");
    let location = post.header("location").unwrap().to_owned();
    let put = s.req("PUT", &format!("{location}?digest={wrong}"), Some(ALICE), &[], &blob);
    assert_eq!((put.status, code(&put).as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(s.req("GET", &location, Some(ALICE), &[], b"").status, 404, "a failed upload stays open");
    let single = s.req("POST", &format!("/v2/internal/bad/blobs/uploads/?digest={wrong}"), Some(ALICE), &[], &blob);
    assert_eq!((single.status, code(&single).as_str()), (400, "DIGEST_INVALID"));
    for d in [&digest, &wrong] {
        assert_eq!(s.req("HEAD", &format!("/v2/internal/bad/blobs/{d}"), Some(ALICE), &[], b"").status, 404);
    }

    // Out-of-order chunk: 416, and the upload keeps its state.
    let post = s.req("POST", "/v2/internal/bad/blobs/uploads/", Some(ALICE), &[], b"");
    let location = post.header("location").unwrap().to_owned();
    let first = s.req("PATCH", &location, Some(ALICE), &[("Content-Range", "0-3")], &blob[..4]);
    assert_eq!(first.status, 202);
    assert_eq!(first.header("range"), Some("0-3"));
    let skip = s.req("PATCH", &location, Some(ALICE), &[("Content-Range", "8-11")], &blob[8..12]);
    assert_eq!(skip.status, 416, "{}", skip.text());
    let again = s.req("PATCH", &location, Some(ALICE), &[("Content-Range", "0-3")], &blob[..4]);
    assert_eq!(again.status, 416);
    let status = s.req("GET", &location, Some(ALICE), &[], b"");
    assert_eq!((status.status, status.header("range")), (204, Some("0-3")));
    assert_eq!(s.req("DELETE", &location, Some(ALICE), &[], b"").status, 204);

    // Manifests: a missing blob, invalid JSON, 5 MiB, a digest that does not match.
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = s.upload("internal/bad", ALICE, config);
    let missing = image_manifest((&config_digest, config.len()), &[(&digest, blob.len())]);
    let r = s.put_manifest("internal/bad", "v1", OCI_MANIFEST, &missing);
    assert_eq!((r.status, code(&r).as_str()), (404, "MANIFEST_BLOB_UNKNOWN"));
    let r = s.put_manifest("internal/bad", "v1", OCI_MANIFEST, b"{\"schemaVersion\": 2, ");
    assert_eq!((r.status, code(&r).as_str()), (400, "MANIFEST_INVALID"));
    let mut huge =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#.to_vec();
    huge.resize(5 << 20, b'a');
    huge.extend_from_slice(b"\"}}");
    let r = s.put_manifest("internal/bad", "v1", OCI_MANIFEST, &huge);
    assert_eq!(r.status, 413, "{}", r.text());
    let ok = image_manifest((&config_digest, config.len()), &[]);
    let r = s.put_manifest("internal/bad", &wrong, OCI_MANIFEST, &ok);
    assert_eq!((r.status, code(&r).as_str()), (400, "DIGEST_INVALID"));
    let r = s.put_manifest("internal/bad", "v1", "application/vnd.docker.distribution.manifest.v1+json", b"{}");
    assert_eq!((r.status, code(&r).as_str()), (400, "MANIFEST_INVALID"));
    let r = s.req("GET", "/v2/internal/bad/manifests/v1", Some(ALICE), &[], b"");
    assert_eq!((r.status, code(&r).as_str()), (404, "MANIFEST_UNKNOWN"));
    let r = s.req("GET", "/v2/internal/bad/tags/list", Some(ALICE), &[], b"");
    assert_eq!((r.status, code(&r).as_str()), (404, "NAME_UNKNOWN"), "a repository appeared: {}", r.text());

    // Names: `..` and uppercase.
    for name in ["internal/../etc", "internal/App", "internal//x", "internal/a..b"] {
        let r = s.req("POST", &format!("/v2/{name}/blobs/uploads/"), Some(ALICE), &[], b"");
        assert_eq!((r.status, code(&r).as_str()), (400, "NAME_INVALID"), "{name}");
    }

    // The only thing stored is the config blob uploaded on purpose, and no manifest.
    let stored = s.stored();
    assert!(stored.iter().any(|f| f.ends_with(digest_hex(&config_digest))), "{stored:?}");
    for f in &stored {
        assert!(f.contains(digest_hex(&config_digest)), "unexpected file after refused input: {f}\nall: {stored:?}");
    }
    assert!(
        files_under(&s.data().join("tmp")).is_empty(),
        "staging files left: {:?}",
        files_under(&s.data().join("tmp"))
    );
}

/// Sends a PATCH that announces `announced` bytes but delivers only `sent`, then hangs up
/// (a client whose connection broke mid-chunk). Returns once Ferry has answered or closed.
fn broken_patch(host: &str, path: &str, creds: Creds<'_>, announced: usize, sent: &[u8]) {
    let mut stream = TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n",
        basic_auth(creds.0, creds.1)
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(sent).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
}

#[test]
fn chunked_resumed_mounted_tagged_referred_and_deleted() {
    let s = Setup::start(|h| h.rule("internal", &["*"], "delete").rule("team-a", &["alice"], "delete"));
    let mut rng = SplitMix64::new(5);
    let mut blob = vec![0u8; 300_000];
    rng.fill(&mut blob);
    let digest = sha256_bytes(&blob);

    // Chunked: three PATCHes with Content-Range, then the closing PUT with the digest.
    let post = s.req("POST", "/v2/internal/chunked/blobs/uploads/", Some(ALICE), &[], b"");
    assert_eq!(post.status, 202);
    assert!(post.header("docker-upload-uuid").is_some());
    assert_eq!(post.header("range"), Some("0-0"));
    let mut location = post.header("location").unwrap().to_owned();
    for (start, end) in [(0usize, 99_999usize), (100_000, 199_999), (200_000, 299_999)] {
        let range = format!("{start}-{end}");
        let r = s.req("PATCH", &location, Some(ALICE), &[("Content-Range", &range)], &blob[start..=end]);
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.header("range"), Some(range.replace(&format!("{start}-"), "0-").as_str()));
        location = r.header("location").unwrap().to_owned();
    }
    let put = s.req("PUT", &format!("{location}?digest={digest}"), Some(ALICE), &[], b"");
    assert_eq!(put.status, 201, "{}", put.text());
    assert_eq!(put.header("location"), Some(format!("/v2/internal/chunked/blobs/{digest}").as_str()));
    let got = s.req("GET", &format!("/v2/internal/chunked/blobs/{digest}"), Some(BOB), &[], b"");
    assert_eq!(got.status, 200);
    assert!(got.body == blob, "blob bytes differ");
    let part =
        s.req("GET", &format!("/v2/internal/chunked/blobs/{digest}"), Some(BOB), &[("Range", "bytes=10-19")], b"");
    assert_eq!((part.status, &part.body[..]), (206, &blob[10..20]));

    // Resumed: the connection breaks mid-chunk; GET says how far it got; the rest follows.
    let mut other = vec![0u8; 200_000];
    rng.fill(&mut other);
    let other_digest = sha256_bytes(&other);
    let post = s.req("POST", "/v2/internal/resumed/blobs/uploads/", Some(ALICE), &[], b"");
    let location = post.header("location").unwrap().to_owned();
    broken_patch(s.ferry.host(), &location, ALICE, other.len(), &other[..123_457]);
    let status = s.req("GET", &location, Some(ALICE), &[], b"");
    assert_eq!(status.status, 204);
    // Every byte that arrived before the break was kept.
    assert_eq!(status.header("range"), Some("0-123456"));
    let from = 123_457;
    let rest_range = format!("{from}-{}", other.len() - 1);
    let r = s.req("PATCH", &location, Some(ALICE), &[("Content-Range", &rest_range)], &other[from..]);
    assert_eq!(r.status, 202, "{}", r.text());
    let put = s.req("PUT", &format!("{location}?digest={other_digest}"), Some(ALICE), &[], b"");
    assert_eq!(put.status, 201, "{}", put.text());

    // Cross-repository mount: 201 when readable, a normal 202 upload otherwise.
    let m = s.req(
        "POST",
        &format!("/v2/internal/mounted/blobs/uploads/?mount={digest}&from=internal/chunked"),
        Some(BOB),
        &[],
        b"",
    );
    assert_eq!(m.status, 201, "{}", m.text());
    assert_eq!(m.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(s.req("HEAD", &format!("/v2/internal/mounted/blobs/{digest}"), Some(BOB), &[], b"").status, 200);
    let secret = s.upload("team-a/secret", ALICE, b"team-a only");
    let m = s.req(
        "POST",
        &format!("/v2/internal/mounted/blobs/uploads/?mount={secret}&from=team-a/secret"),
        Some(BOB),
        &[],
        b"",
    );
    assert_eq!(m.status, 202, "bob may not read team-a, so no mount: {}", m.text());
    assert_eq!(s.req("HEAD", &format!("/v2/internal/mounted/blobs/{secret}"), Some(BOB), &[], b"").status, 404);

    // Tags with pagination.
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = s.upload("internal/chunked", ALICE, config);
    let manifest = image_manifest((&config_digest, config.len()), &[(&digest, blob.len())]);
    let manifest_digest = sha256_bytes(&manifest);
    for tag in ["v5", "v1", "v3", "v2", "v4"] {
        let r = s.put_manifest("internal/chunked", tag, OCI_MANIFEST, &manifest);
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.header("docker-content-digest"), Some(manifest_digest.as_str()));
    }
    let mut seen = Vec::new();
    let mut next = Some("/v2/internal/chunked/tags/list?n=2".to_owned());
    while let Some(path) = next.take() {
        let r = s.req("GET", &path, Some(BOB), &[], b"");
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["name"], "internal/chunked");
        let page: Vec<String> = v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
        assert!(page.len() <= 2);
        seen.extend(page);
        next = r.header("link").map(|l| l.trim_start_matches('<').split('>').next().unwrap().to_owned());
    }
    assert_eq!(seen, ["v1", "v2", "v3", "v4", "v5"]);

    // Referrers: an artifact whose subject is the image. s3s-fs (the S3 run's server) names a
    // file after the base64 of each key, so it cannot hold a key over 163 bytes; referrer keys
    // are longer (real S3 takes 1024). That part runs on disk only.
    let referrers = !on_s3();
    if !referrers {
        eprintln!("note: referrers are not checked on s3s-fs (its keys are at most 163 bytes)");
    }
    let artifact_digest = referrers.then(|| {
        let empty = s.upload("internal/chunked", ALICE, b"{}");
        let sbom = s.upload("internal/chunked", ALICE, b"{\"sbom\":true}");
        let artifact = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/json", "digest": sbom, "size": 13}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len()},
            "annotations": {"org.example.kind": "sbom"},
        }))
        .unwrap();
        let artifact_digest = sha256_bytes(&artifact);
        let r = s.put_manifest("internal/chunked", &artifact_digest, OCI_MANIFEST, &artifact);
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.header("oci-subject"), Some(manifest_digest.as_str()));
        let r = s.req("GET", &format!("/v2/internal/chunked/referrers/{manifest_digest}"), Some(BOB), &[], b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["manifests"][0]["digest"], artifact_digest.as_str());
        assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.example.sbom.v1");
        assert_eq!(v["manifests"][0]["annotations"]["org.example.kind"], "sbom");
        let path = format!("/v2/internal/chunked/referrers/{manifest_digest}?artifactType=application/vnd.example.sig");
        let r = s.req("GET", &path, Some(BOB), &[], b"");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 0);
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
        artifact_digest
    });

    // Delete: the manifest by digest is gone (and its tags), the referrer by digest too.
    let path = format!("/v2/internal/chunked/manifests/{manifest_digest}");
    assert_eq!(s.req("DELETE", &path, Some(BOB), &[], b"").status, 202);
    let r = s.req("GET", &path, Some(BOB), &[], b"");
    assert_eq!((r.status, code(&r).as_str()), (404, "MANIFEST_UNKNOWN"));
    assert_eq!(s.req("GET", "/v2/internal/chunked/manifests/v3", Some(BOB), &[], b"").status, 404);
    let r = s.req("GET", "/v2/internal/chunked/tags/list", Some(BOB), &[], b"");
    assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap()["tags"], json!([]));
    assert_eq!(s.req("DELETE", &path, Some(BOB), &[], b"").status, 404);
    if let Some(artifact_digest) = &artifact_digest {
        let apath = format!("/v2/internal/chunked/manifests/{artifact_digest}");
        assert_eq!(s.req("DELETE", &apath, Some(BOB), &[], b"").status, 202);
        let r = s.req("GET", &format!("/v2/internal/chunked/referrers/{manifest_digest}"), Some(BOB), &[], b"");
        assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap()["manifests"], json!([]));
    }

    // The catalog lists what the caller may read.
    let r = s.req("GET", "/v2/_catalog", Some(BOB), &[], b"");
    let repos = serde_json::from_slice::<Value>(&r.body).unwrap()["repositories"].clone();
    assert_eq!(repos, json!(["internal/chunked"]));
}

#[test]
fn gc_after_a_manifest_delete_frees_exactly_the_blobs_only_it_referenced() {
    let s = Setup::start(|h| h);
    let host = s.ferry.host().to_owned();
    let layout = s.work.path().join("layout");
    let shared = write_layer(&layout, 4096, 1);
    let only_a = write_layer(&layout, 8192, 2);
    let only_b = write_layer(&layout, 2048, 3);
    let a = build_image_with_layers(&layout, "a", &[shared.clone(), only_a.clone()], 51);
    let b = build_image_with_layers(&layout, "b", &[shared.clone(), only_b.clone()], 52);
    push_layout_creds(&layout, "a", &format!("{host}/internal/gc:a"), false, ALICE).unwrap();
    push_layout_creds(&layout, "b", &format!("{host}/internal/gc:b"), false, ALICE).unwrap();
    let blob_file = |d: &str| store_path(&s.data(), &blob_key(d));
    for d in a.blob_digests().iter().chain(&b.blob_digests()) {
        assert!(blob_file(d).exists(), "{d} not stored");
    }

    let gc = |dry: bool| {
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["gc", "--config"]).arg(s.ferry.config_path()).args(["--grace", "0s"]);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing is unreferenced yet.
    let out = gc(false);
    assert!(out.contains("removed 0 blobs"), "{out}");

    let path = format!("/v2/internal/gc/manifests/{}", a.manifest_digest);
    assert_eq!(s.req("DELETE", &path, Some(ALICE), &[], b"").status, 202);
    assert_eq!(s.req("GET", &path, Some(ALICE), &[], b"").status, 404);
    let dry = gc(true);
    assert!(dry.contains("would remove 2 blobs"), "{dry}");
    assert!(blob_file(&a.config_digest).exists(), "a dry run deleted something");
    let out = gc(false);
    let mut removed: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("removed blob "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    removed.sort();
    let mut expected = vec![a.config_digest.clone(), only_a.0.clone()];
    expected.sort();
    assert_eq!(removed, expected, "{out}");
    assert!(out.contains(&format!("removed manifest {}\n", a.manifest_digest)), "{out}");
    assert!(out.contains("and 1 manifests"), "{out}");
    for d in &expected {
        assert!(!blob_file(d).exists(), "{d} still stored");
    }
    for d in b.blob_digests() {
        assert!(blob_file(&d).exists(), "{d} (still referenced) was deleted");
    }
    // b still pulls whole; a's blobs are gone from the repository too.
    pull_to_dir_creds(&format!("{host}/internal/gc:b"), s.work.path().join("b"), ALICE).unwrap();
    let r = s.req("HEAD", &format!("/v2/internal/gc/blobs/{}", only_a.0), Some(ALICE), &[], b"");
    assert_eq!(r.status, 404);
    assert!(gc(false).contains("removed 0 blobs"));
}

#[test]
fn private_content_is_not_readable_through_proxied_paths_but_shared_public_layers_are() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    // A public base layer on the upstream, and a private image built on it plus its own layer.
    let base = write_layer(&layout, 8 * 1024, 31);
    let own = write_layer(&layout, 4 * 1024, 32);
    let public = build_image_with_layers(&layout, "public", std::slice::from_ref(&base), 33);
    let private = build_image_with_layers(&layout, "private", &[base.clone(), own.clone()], 34);
    push_layout(&layout, "public", &format!("{}/library/base:1", upstream.host()), false).unwrap();
    let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
    let ferry = Ferry::start(&config(&work.path().join("data"), &htpasswd, &upstream.url(), |h| h));
    push_layout_creds(&layout, "private", &format!("{}/internal/secret:1", ferry.host()), false, ALICE).unwrap();

    // Anyone can ask a proxied path for any digest; the private layer and manifest stay hidden.
    let anon = |path: String| http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap();
    let leak = anon(format!("/v2/library/base/blobs/{}", own.0));
    assert_eq!(leak.status, 404, "a private layer leaked through a proxied path");
    assert_eq!(code(&leak), "BLOB_UNKNOWN");
    let leak = anon(format!("/v2/library/base/manifests/{}", private.manifest_digest));
    assert_eq!(leak.status, 404, "a private manifest leaked through a proxied path");
    // The shared public base layer is confirmed upstream and served from the local copy.
    let shared = anon(format!("/v2/library/base/blobs/{}", base.0));
    assert_eq!(shared.status, 200);
    assert_eq!(sha256_bytes(&shared.body), base.0);
    let out = work.path().join("public");
    pull_to_dir(&format!("{}/library/base:1", ferry.host()), &out).unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), public.manifest_bytes);
}

#[test]
fn foreign_credentials_do_not_break_proxied_pulls_but_fail_on_hosted_and_login() {
    // Docker sends its Docker Hub credentials to a mirror that challenged it at /v2/.
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[2048], 35);
    push_layout(&layout, "v1", &format!("{}/library/pub:v1", upstream.host()), false).unwrap();
    let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
    let ferry = Ferry::start(&config(&work.path().join("data"), &htpasswd, &upstream.url(), |h| h));
    let hub_creds = basic_auth("dockerhub-user", "dockerhub-token");
    let get = |path: &str| {
        http_request(
            "GET",
            &format!("{}{path}", ferry.url()),
            &[("Authorization", &hub_creds), ("Accept", OCI_MANIFEST)],
        )
        .unwrap()
    };
    let proxied = get("/v2/library/pub/manifests/v1");
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(proxied.body, image.manifest_bytes);
    let out = work.path().join("out");
    pull_to_dir_creds(&format!("{}/library/pub:v1", ferry.host()), &out, ("dockerhub-user", "dockerhub-token"))
        .unwrap();
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), image.manifest_bytes);
    // The same credentials are refused where they matter: hosted content and the login ping.
    let hosted = get("/v2/internal/app/manifests/v1");
    assert_eq!(hosted.status, 401);
    assert_challenge(&hosted);
    assert_eq!(get("/v2/").status, 401, "docker login with wrong credentials must fail");
    let login =
        http_request("GET", &format!("{}/v2/", ferry.url()), &[("Authorization", &basic_auth(ALICE.0, ALICE.1))]);
    assert_eq!(login.unwrap().status, 200);
}

#[test]
fn docker_style_bearer_flow_anonymous_pulls_and_token_logins() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[2048], 36);
    push_layout(&layout, "v1", &format!("{}/library/pub:v1", upstream.host()), false).unwrap();
    let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
    let ferry = Ferry::start(&config(&work.path().join("data"), &htpasswd, &upstream.url(), |h| h));
    let url = |p: &str| format!("{}{p}", ferry.url());
    let token_of = |resp: HttpResponse| -> String {
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v: Value = serde_json::from_slice(&resp.body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };

    // Docker without credentials: ping, challenge, anonymous token, ping again, pull.
    let ping = http_request("GET", &url("/v2/"), &[]).unwrap();
    assert_challenge(&ping);
    let realm = format!("http://{}/auth/token", ferry.host());
    let anon = token_of(
        http_request("GET", &format!("{realm}?service=ferry&scope=repository:library/pub:pull"), &[]).unwrap(),
    );
    let bearer = format!("Bearer {anon}");
    assert_eq!(http_request("GET", &url("/v2/"), &[("Authorization", &bearer)]).unwrap().status, 200);
    let m = http_request(
        "GET",
        &url("/v2/library/pub/manifests/v1"),
        &[("Authorization", &bearer), ("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(m.body, image.manifest_bytes);
    // An anonymous token opens nothing hosted.
    let denied = http_request("GET", &url("/v2/internal/app/manifests/v1"), &[("Authorization", &bearer)]).unwrap();
    assert_challenge(&denied);
    // A forged or tampered token is refused.
    let forged = format!("Bearer {}x", anon);
    assert_eq!(http_request("GET", &url("/v2/"), &[("Authorization", &forged)]).unwrap().status, 401);

    // docker login: the token endpoint checks the password.
    let wrong =
        http_request("GET", &format!("{realm}?service=ferry"), &[("Authorization", &basic_auth("alice", "nope"))]);
    assert_eq!(wrong.unwrap().status, 401);
    let alice = token_of(
        http_request("GET", &format!("{realm}?service=ferry"), &[("Authorization", &basic_auth(ALICE.0, ALICE.1))])
            .unwrap(),
    );
    // A login token grants no repository: a push with it is sent back for a scoped token.
    let upload =
        http_request("POST", &url("/v2/internal/app/blobs/uploads/"), &[("Authorization", &format!("Bearer {alice}"))]);
    assert_challenge(&upload.unwrap());
    let scoped = |scope: &str| {
        let q = format!("{realm}?service=ferry&scope={scope}");
        token_of(http_request("GET", &q, &[("Authorization", &basic_auth(ALICE.0, ALICE.1))]).unwrap())
    };
    let push = format!("Bearer {}", scoped("repository:internal/app:pull,push"));
    let upload = http_request("POST", &url("/v2/internal/app/blobs/uploads/"), &[("Authorization", &push)]);
    assert_eq!(upload.unwrap().status, 202, "alice's push token opens her repository");
    // The scope is signed into the token: a pull token cannot push, and no token opens another
    // repository.
    let pull = format!("Bearer {}", scoped("repository:internal/app:pull"));
    let refused = http_request("POST", &url("/v2/internal/app/blobs/uploads/"), &[("Authorization", &pull)]).unwrap();
    assert_eq!(refused.status, 401, "{}", refused.text());
    let other = http_request("POST", &url("/v2/internal/other/blobs/uploads/"), &[("Authorization", &push)]).unwrap();
    assert_eq!(other.status, 401, "{}", other.text());

    // hosted.challenge: basic keeps plain Basic challenges.
    let basic =
        Ferry::start(&config(&work.path().join("basic"), &htpasswd, &upstream.url(), |h| h.opt("challenge", "basic")));
    let ping = http_request("GET", &format!("{}/v2/", basic.url()), &[]).unwrap();
    assert_eq!(ping.header("www-authenticate"), Some("Basic realm=\"ferry\""));
}

#[test]
fn an_untrusted_mirror_saying_yes_does_not_make_private_content_public() {
    // A pull-only mirror that answers 200 to anything (a HEAD from it proves nothing), before
    // the trusted registry, which does not have the private digests.
    let (mirror, mirror_log) = recording_server("127.0.0.1:0", "200 OK", vec![], "{}");
    let trusted = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let own = write_layer(&layout, 4 * 1024, 37);
    let private = build_image_with_layers(&layout, "private", std::slice::from_ref(&own), 38);
    let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry(
            "docker.io",
            [upstream(format!("http://{mirror}")).opt("capabilities", ["pull"]), upstream(trusted.url())],
        )
        .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd));
    let ferry = Ferry::start(&cfg.yaml());
    push_layout_creds(&layout, "private", &format!("{}/internal/secret:1", ferry.host()), false, ALICE).unwrap();
    let anon = |path: String| http_request("GET", &format!("{}{path}", ferry.url()), &[]).unwrap();
    for _ in 0..2 {
        // Twice: a first answer must not have marked the digest public for good either.
        let leak = anon(format!("/v2/library/anything/blobs/{}", own.0));
        assert_eq!(leak.status, 404, "a private layer leaked because an untrusted mirror said yes");
        let leak = anon(format!("/v2/library/anything/manifests/{}", private.manifest_digest));
        assert_eq!(leak.status, 404, "a private manifest leaked because an untrusted mirror said yes");
    }
    let heads = mirror_log.lock().unwrap().iter().filter(|h| h.first().is_some_and(|l| l.starts_with("HEAD"))).count();
    assert_eq!(heads, 0, "the untrusted mirror was asked to vouch for a digest");
}

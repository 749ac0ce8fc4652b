//! Upstream authentication against real Distribution registries: the Bearer token flow
//! (anonymous, as Docker Hub serves public images, and with credentials, as Harbor or GHCR
//! with a robot account), Basic auth, and clear errors naming the upstream when refused.

use std::fs;
use std::path::Path;

use crate::harness::token::{TokenServer, TokenServerOpts};
use crate::harness::{self, *};

/// Ferry mirroring docker.io from `upstream_url`, with `creds` for it if any.
fn config(storage: &Path, upstream_url: &str, creds: Option<(&str, &str)>) -> String {
    let up = upstream(upstream_url);
    let up = match creds {
        Some((user, password)) => up.creds(user, password),
        None => up,
    };
    FerryConfig::new(storage).registry("docker.io", [up]).yaml()
}

fn assert_image(dir: &Path, image: &Image) {
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), image.manifest_bytes);
    for d in image.blob_digests() {
        assert_eq!(sha256_file(dir.join(digest_hex(&d))), d);
    }
}

#[test]
fn anonymous_bearer_tokens_are_fetched_once_and_reused_across_blobs() {
    let tokens = TokenServer::start(TokenServerOpts::default());
    let upstream = Registry::start_with_token(tokens.auth());
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 2048, 4096, 8192], 71);
    push_layout(&layout, "v1", &format!("{}/library/public:v1", upstream.host()), false).unwrap();
    let pushed_with = tokens.requests();

    let ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url(), None));
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/public:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    let asked: Vec<_> = tokens.token_requests().into_iter().skip(pushed_with).collect();
    assert_eq!(asked.len(), 1, "one token for the manifest and all five blobs: {asked:?}");
    assert_eq!(asked[0].scopes, vec!["repository:library/public:pull".to_owned()]);
    assert_eq!(asked[0].user, None, "anonymous");
}

#[test]
fn bearer_tokens_with_configured_credentials_and_a_clear_error_when_refused() {
    let tokens = TokenServer::start(TokenServerOpts {
        basic: Some(("robot".into(), "t0ken-pass".into())),
        ..Default::default()
    });
    let upstream = Registry::start_with_token(tokens.auth());
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 2048], 72);
    push_layout_creds(&layout, "v1", &format!("{}/team/private:v1", upstream.host()), false, ("robot", "t0ken-pass"))
        .unwrap();
    let before = tokens.requests();

    let ferry = Ferry::start(&config(&work.path().join("ok"), &upstream.url(), Some(("robot", "t0ken-pass"))));
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/team/private:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    let asked: Vec<_> = tokens.token_requests().into_iter().skip(before).collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].user.as_deref(), Some("robot"));

    let wrong = Ferry::start(&config(&work.path().join("bad"), &upstream.url(), Some(("robot", "wrong-pass"))));
    let resp =
        http_request("GET", &format!("{}/v2/team/private/manifests/v1", wrong.url()), &[("Accept", OCI_MANIFEST)])
            .unwrap();
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body = resp.text();
    assert!(body.contains(&upstream.host()) && !body.contains(&upstream.url()), "names the upstream: {body}");
    assert!(body.contains("token endpoint answered HTTP 401"), "says why: {body}");
    assert!(!body.contains("wrong-pass") && !wrong.log_text().contains("wrong-pass"), "no secret leaks");
}

#[test]
fn basic_auth_upstream_with_a_password_file() {
    let upstream = Registry::start_with(RegistryOpts { htpasswd: Some(("mirror".into(), "filed-secret".into())) });
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[3000], 73);
    push_layout_creds(
        &layout,
        "v1",
        &format!("{}/library/basic:v1", upstream.host()),
        false,
        ("mirror", "filed-secret"),
    )
    .unwrap();
    let secret = work.path().join("password");
    fs::write(&secret, "filed-secret\n").unwrap();
    let cfg = FerryConfig::new(work.path().join("data")).registry(
        "docker.io",
        [harness::upstream(upstream.url()).opt("username", "mirror").opt("password_file", &secret)],
    );
    let ferry = Ferry::start(&cfg.yaml());
    let out = work.path().join("out");
    pull_to_dir(&format!("{}/basic:v1", ferry.host()), &out).unwrap();
    assert_image(&out, &image);
    assert!(!ferry.log_text().contains("filed-secret"));
}

#[test]
fn credentials_go_only_to_token_endpoints_of_the_upstream() {
    // The token endpoint a hostile upstream names: another host (127.0.0.2 is loopback too,
    // so Ferry may dial it, as it may the upstream itself).
    let (realm, realm_log) = recording_server("127.0.0.2:0", "200 OK", vec![], r#"{"token":"t"}"#);
    let challenge = format!("WWW-Authenticate: Bearer realm=\"http://{realm}/token\",service=\"x\"");
    let (up, _) = recording_server("127.0.0.1:0", "401 Unauthorized", vec![challenge], "{}");
    let work = tmp_dir();
    let pull = |ferry: &Ferry| {
        let url = format!("{}/v2/library/app/manifests/v1", ferry.url());
        http_request("GET", &url, &[("Accept", OCI_MANIFEST)]).unwrap()
    };
    let withheld = Ferry::start(&config(&work.path().join("a"), &format!("http://{up}"), Some(("robot", "s3cret"))));
    assert_eq!(pull(&withheld).status, 503);
    let sent = authorization_sent(&realm_log);
    assert!(!sent.is_empty(), "the token endpoint was asked");
    assert!(sent.iter().all(Option::is_none), "no credentials for a foreign realm: {sent:?}");

    // Listed in token_realms, the same endpoint is the upstream's own: credentials go.
    realm_log.lock().unwrap().clear();
    let host = realm.split(':').next().unwrap().to_owned();
    let cfg = FerryConfig::new(work.path().join("b"))
        .registry(
            "docker.io",
            [upstream(format!("http://{up}"))
                .creds("robot", "s3cret")
                .opt("token_realms", Yaml::Seq(vec![host.into()]))],
        )
        .yaml();
    let trusted = Ferry::start(&cfg);
    pull(&trusted);
    let sent = authorization_sent(&realm_log);
    assert!(sent.iter().any(|a| a.as_deref().is_some_and(|a| a.contains("Basic "))), "{sent:?}");
}

//! Proves the token-auth part of the harness (`harness/token.rs`) against the real tools,
//! without Ferry: a real `docker-registry` with `auth: token` accepts the test issuer's JWTs,
//! skopeo pushes and pulls through the Bearer flow, and the issuer counts the token requests.

use std::fs;

use crate::harness::encoding::*;
use crate::harness::token::*;
use crate::harness::*;

/// `Authorization` header value for `token`.
fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The value of parameter `name` in a parsed challenge.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn token_auth_registry_round_trip_with_basic_credentials() {
    let creds = ("tokenuser", "t0ken-pass");
    let issuer =
        TokenServer::start(TokenServerOpts { basic: Some((creds.0.into(), creds.1.into())), ..Default::default() });
    assert_eq!(issuer.creds(), Some(creds));
    let registry = Registry::start_with_token(issuer.auth());
    assert_eq!(registry.token_auth().map(|a| a.realm.as_str()), Some(issuer.realm().as_str()));
    assert_eq!(registry.creds(), None);

    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 256 << 10], 11);
    let repo = "e2e/tokened";
    let reference = format!("{}/{repo}:v1", registry.host());

    // Without (or with wrong) credentials the issuer refuses, so the push fails.
    let denied = push_layout(&layout, "v1", &reference, false).unwrap_err();
    assert!(denied.contains("unable to retrieve auth token"), "unexpected error: {denied}");
    assert!(push_layout_creds(&layout, "v1", &reference, false, (creds.0, "wrong")).is_err());
    let refused = issuer.token_requests();
    assert!(refused.len() >= 2 && refused.iter().all(|r| r.status == 401), "{refused:?}");
    assert_eq!(issuer.tokens_issued(), 0);

    // Push with credentials: the issuer grants pull,push on the repository.
    push_layout_creds(&layout, "v1", &reference, false, creds).unwrap_or_else(|e| panic!("{e}"));
    let push_scope = format!("repository:{repo}:pull,push");
    assert!(issuer.scopes().contains(&push_scope), "scopes asked: {:?}", issuer.scopes());
    let issued = issuer.token_requests().into_iter().filter(|r| r.status == 200).collect::<Vec<_>>();
    assert!(!issued.is_empty());
    for request in &issued {
        assert_eq!(request.user.as_deref(), Some(creds.0));
        assert_eq!(request.service.as_deref(), Some(issuer.service()));
        assert_eq!(request.method, "GET");
    }
    // Every blob upload and the manifest PUT went through with a token.
    assert!(registry.count_requests("PUT", "/manifests/v1") >= 1);
    let pushes = registry.requests().into_iter().filter(|e| e.method == "PUT" && e.status == 201).count();
    assert_eq!(pushes, image.blob_digests().len() + 1, "{:?}", registry.requests());

    // Pull back with credentials: digests and bytes match; one token covers every blob.
    let before_pull = issuer.requests();
    let pulled = work.path().join("pulled");
    pull_to_dir_creds(&reference, &pulled, creds).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(pulled.join("manifest.json")).unwrap(), image.manifest_bytes);
    assert_eq!(sha256_file(pulled.join("manifest.json")), image.manifest_digest);
    for digest in image.blob_digests() {
        assert_eq!(sha256_file(pulled.join(digest_hex(&digest))), digest);
    }
    let pull_requests = &issuer.token_requests()[before_pull..];
    assert_eq!(pull_requests.len(), 1, "tokens were not reused across blobs: {pull_requests:?}");
    assert_eq!(pull_requests[0].scopes, [format!("repository:{repo}:pull")]);
    assert_eq!(pull_requests[0].account.as_deref(), Some(creds.0));
    for digest in image.blob_digests() {
        let path = format!("/blobs/{digest}");
        let gets = registry.requests().into_iter().filter(|e| e.method == "GET" && e.path.ends_with(&path));
        assert_eq!(gets.map(|e| e.status).collect::<Vec<_>>(), [200], "GETs of {digest}");
    }
    assert_eq!(inspect_raw_creds(&reference, creds).unwrap(), image.manifest_bytes);

    // Anonymous manifest GET: 401 with a Bearer challenge naming realm, service and scope.
    let manifest_url = format!("{}/v2/{repo}/manifests/v1", registry.url());
    let anonymous = http_request("GET", &manifest_url, &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let challenge = anonymous.header("www-authenticate").expect("WWW-Authenticate on 401");
    let params = parse_bearer_challenge(challenge).unwrap_or_else(|| panic!("not a Bearer challenge: {challenge}"));
    assert_eq!(param(&params, "realm"), Some(issuer.realm().as_str()), "{challenge}");
    assert_eq!(param(&params, "service"), Some("test-registry"), "{challenge}");
    let pull_scope = format!("repository:{repo}:pull");
    assert_eq!(param(&params, "scope"), Some(pull_scope.as_str()), "{challenge}");

    // Fetch a token from the realm exactly as a client would, then use it.
    let token_url = format!(
        "{}?service={}&scope={}",
        param(&params, "realm").unwrap(),
        percent_encode(param(&params, "service").unwrap()),
        percent_encode(&pull_scope)
    );
    let no_creds = http_request("GET", &token_url, &[]).unwrap();
    assert_eq!(no_creds.status, 401);
    assert!(no_creds.header("www-authenticate").is_some_and(|v| v.starts_with("Basic")));
    let wrong = basic_auth(creds.0, "nope");
    assert_eq!(http_request("GET", &token_url, &[("Authorization", &wrong)]).unwrap().status, 401);
    let basic = basic_auth(creds.0, creds.1);
    let response = http_request("GET", &token_url, &[("Authorization", &basic)]).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    let token = body["token"].as_str().expect("token field").to_string();
    assert_eq!(body["access_token"], token.as_str());
    assert_eq!(body["expires_in"], 300);
    let issued_at = body["issued_at"].as_str().unwrap();
    assert!(issued_at.len() == 20 && issued_at.ends_with('Z') && issued_at.as_bytes()[10] == b'T', "{issued_at}");

    let header = jwt_header(&token);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["x5c"].as_array().map(Vec::len), Some(1));
    let claims = jwt_claims(&token);
    assert_eq!(claims["iss"], "test-issuer");
    assert_eq!(claims["aud"], "test-registry");
    assert_eq!(claims["sub"], creds.0);
    assert_eq!(claims["access"], serde_json::json!([{"type": "repository", "name": repo, "actions": ["pull"]}]));
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 300);

    let auth = bearer(&token);
    let ok = http_request("GET", &manifest_url, &[("Accept", OCI_MANIFEST), ("Authorization", &auth)]).unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.body, image.manifest_bytes);
    assert_eq!(ok.header("docker-content-digest"), Some(image.manifest_digest.as_str()));
    let blob_url = format!("{}/v2/{repo}/blobs/{}", registry.url(), image.config_digest);
    let blob = http_request("GET", &blob_url, &[("Authorization", &auth)]).unwrap();
    assert_eq!(blob.status, 200);
    assert_eq!(blob.body, image.config_bytes);

    // The registry really checks the token: wrong repository, tampered signature, wrong
    // audience and pull-only for a push are all refused.
    let other = bearer(&issuer.issue(&["repository:e2e/other:pull"], creds.0));
    let refused = http_request("GET", &manifest_url, &[("Accept", OCI_MANIFEST), ("Authorization", &other)]).unwrap();
    assert_eq!(refused.status, 401);
    let challenge = refused.header("www-authenticate").unwrap();
    assert_eq!(param(&parse_bearer_challenge(challenge).unwrap(), "error"), Some("insufficient_scope"), "{challenge}");

    let (signed, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let tampered = bearer(&format!("{signed}.{flipped}{}", &signature[1..]));
    let refused = http_request("GET", &manifest_url, &[("Authorization", &tampered)]).unwrap();
    assert_eq!(refused.status, 401);
    let challenge = refused.header("www-authenticate").unwrap();
    assert_eq!(param(&parse_bearer_challenge(challenge).unwrap(), "error"), Some("invalid_token"), "{challenge}");

    let stranger = TokenServer::start(TokenServerOpts { service: "elsewhere".into(), ..Default::default() });
    let foreign = bearer(&stranger.issue(&[&pull_scope], ""));
    assert_eq!(http_request("GET", &manifest_url, &[("Authorization", &foreign)]).unwrap().status, 401);
    let untrusted = TokenServer::start(TokenServerOpts::default()); // same names, different key
    let forged = bearer(&untrusted.issue(&[&pull_scope], ""));
    assert_eq!(http_request("GET", &manifest_url, &[("Authorization", &forged)]).unwrap().status, 401);
    let log = registry.log_text();
    for reason in [
        "unable to verify token signature",
        "token intended for another audience",
        "unable to verify certificate chain",
    ] {
        assert!(log.contains(reason), "registry did not log {reason:?}");
    }

    let uploads = format!("{}/v2/{repo}/blobs/uploads/", registry.url());
    assert_eq!(http_request("POST", &uploads, &[("Authorization", &auth)]).unwrap().status, 401);
    let push_token = bearer(&issuer.issue(&[&push_scope], creds.0));
    assert_eq!(http_request("POST", &uploads, &[("Authorization", &push_token)]).unwrap().status, 202);
}

#[test]
fn anonymous_token_issuer_serves_skopeo_without_credentials() {
    let issuer = TokenServer::start(TokenServerOpts { expires_in: 120, ..Default::default() });
    assert_eq!(issuer.creds(), None);
    let registry = Registry::start_with_token(issuer.auth());
    assert_eq!(http_request("GET", &format!("{}/v2/", registry.url()), &[]).unwrap().status, 401);

    let work = tmp_dir();
    let layout = work.path().join("layout");
    let index = build_index(&layout, "multi", &[("linux", "amd64"), ("linux", "arm64")], 5);
    let reference = format!("{}/anon/multi:m", registry.host());
    push_layout(&layout, "multi", &reference, true).unwrap_or_else(|e| panic!("{e}"));
    let pulled = work.path().join("pulled");
    let before_pull = issuer.requests();
    pull_to_dir(&reference, &pulled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(pulled.join("manifest.json")).unwrap(), index.index_bytes);
    for digest in index.blob_digests() {
        assert_eq!(sha256_file(pulled.join(digest_hex(&digest))), digest);
    }
    let pull_requests = &issuer.token_requests()[before_pull..];
    assert_eq!(pull_requests.len(), 1, "{pull_requests:?}");
    assert!(issuer.token_requests().iter().all(|r| r.status == 200 && r.user.is_none()));

    // Scopes may come as a space-separated list or as repeated parameters; both are granted.
    let url = format!(
        "{}?service=test-registry&scope={}&scope={}",
        issuer.realm(),
        percent_encode("repository:a/b:pull repository:c:pull,push"),
        percent_encode("repository:a/b:push")
    );
    let response = http_request("GET", &url, &[]).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    let claims = jwt_claims(body["token"].as_str().unwrap());
    assert_eq!(claims["sub"], "");
    assert_eq!(
        claims["access"],
        serde_json::json!([
            {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
            {"type": "repository", "name": "c", "actions": ["pull", "push"]},
        ])
    );
    assert_eq!(body["expires_in"], 120);
    let last = issuer.token_requests().pop().unwrap();
    assert_eq!(last.scopes, ["repository:a/b:pull", "repository:c:pull,push", "repository:a/b:push"]);
    assert_eq!(http_request("GET", &format!("{}/other", issuer.url()), &[]).unwrap().status, 404);
    let wrong_service = format!("{}?service=nope", issuer.realm());
    assert_eq!(http_request("GET", &wrong_service, &[]).unwrap().status, 400);
}

#[test]
fn encoding_helpers() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(&[0xfb, 0xff, 0xfe]), "-__-");
    for len in 0..20u8 {
        let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(97).wrapping_add(251)).collect();
        assert_eq!(base64url_decode(&base64url(&bytes)).unwrap(), bytes);
    }
    assert_eq!(base64url_decode("Zm9vYg=="), Some(b"foob".to_vec()));
    assert_eq!(base64url_decode("Z"), None);
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
    assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    assert_eq!(
        parse_query("scope=repository%3Aa%2Fb%3Apull+x&service=s&flag"),
        [
            ("scope".into(), "repository:a/b:pull x".into()),
            ("service".into(), "s".into()),
            ("flag".into(), String::new())
        ]
    );
    let challenge =
        r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a:pull,push",error="x\"y""#;
    let params = parse_bearer_challenge(challenge).unwrap();
    assert_eq!(param(&params, "realm"), Some("http://127.0.0.1:1/token"));
    assert_eq!(param(&params, "scope"), Some("repository:a:pull,push"));
    assert_eq!(param(&params, "error"), Some("x\"y"));
    assert_eq!(parse_bearer_challenge(r#"Basic realm="r""#), None);
}

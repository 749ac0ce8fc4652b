//! Tag policies, `ferry cache forget` and `cache.keep_deleted_tags` end to end, against a real
//! Distribution upstream whose tags the test moves and deletes. What is asserted is the digest
//! a client gets by tag and how many requests reached the upstream.

use std::path::Path;
use std::process::Command;

use crate::harness::encoding::basic_auth;
use crate::harness::*;

const ALICE: Creds<'static> = ("alice", "alice-pw");
const BOB: Creds<'static> = ("bob", "bob-pw");

fn config(storage: &Path, upstream_url: &str) -> FerryConfig {
    FerryConfig::new(storage).registry("docker.io", [upstream(upstream_url)]).set("cache.tag_ttl", "1h")
}

/// The digest Ferry serves for `library/app:<tag>`.
fn digest_by_tag(ferry: &Ferry, tag: &str) -> String {
    let url = format!("{}/v2/library/app/manifests/{tag}", ferry.url());
    let r = http_request("GET", &url, &[("Accept", OCI_MANIFEST)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("docker-content-digest").unwrap().to_owned()
}

fn forget(ferry: &Ferry, image: &str, user: Option<Creds<'_>>) -> std::process::Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["cache", "forget", image, "--server", &ferry.url()]).env_remove("FERRY_PASSWORD");
    if let Some((user, password)) = user {
        cmd.args(["--user", user]).env("FERRY_PASSWORD", password);
    }
    cmd.output().unwrap()
}

#[test]
fn policies_set_each_tags_ttl_and_a_forgotten_tag_is_asked_again() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let first = build_image(&layout, "v1", &[2048], 61);
    for tag in ["latest", "1.0"] {
        push_layout(&layout, "v1", &format!("{}/library/app:{tag}", upstream.host()), false).unwrap();
    }
    // `latest` is always past its TTL (0 s: no waiting); `1.0` keeps tag_ttl (1 h).
    let policies = Yaml::from([Yaml::Map(vec![("match".into(), "*:latest".into()), ("ttl".into(), "0s".into())])]);
    let ferry =
        Ferry::start(&config(&work.path().join("data"), &upstream.url()).set("cache.tag_policies", policies).yaml());
    assert_eq!(digest_by_tag(&ferry, "latest"), first.manifest_digest);
    assert_eq!(digest_by_tag(&ferry, "1.0"), first.manifest_digest);

    let second = build_image(&layout, "v2", &[4096], 62);
    for tag in ["latest", "1.0"] {
        push_layout(&layout, "v2", &format!("{}/library/app:{tag}", upstream.host()), false).unwrap();
    }
    assert_eq!(digest_by_tag(&ferry, "latest"), second.manifest_digest, "the policy's 0 s TTL revalidated");
    assert_eq!(digest_by_tag(&ferry, "1.0"), first.manifest_digest, "tag_ttl still trusts 1.0");
    let asked = upstream.count_requests("GET", "/manifests/1.0") + upstream.count_requests("HEAD", "/manifests/1.0");
    assert_eq!(asked, 1, "1.0 was fetched once and never revalidated");

    let out = forget(&ferry, "app:1.0", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("forgot docker.io/library/app:1.0 (1 stored records)"), "{said}");
    assert_eq!(digest_by_tag(&ferry, "1.0"), second.manifest_digest, "the forgotten tag was asked again");
    assert_eq!(upstream.count_requests("GET", "/manifests/1.0"), 2);

    // Bad input gets a clear refusal.
    for (image, why) in [("app@sha256:0000", "a digest never changes"), ("Bad/Name", "invalid")] {
        let out = forget(&ferry, image, None);
        assert_eq!(out.status.code(), Some(2), "{image}");
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("400") && err.contains(why), "{image}: {err}");
    }
}

#[test]
fn with_credentials_only_an_admin_may_forget() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let htpasswd = write_htpasswd(work.path(), &[ALICE, BOB]);
    let hosted = Hosted::new(["internal"]).htpasswd(&htpasswd).opt("admins", ["alice"]);
    let ferry = Ferry::start(&config(&work.path().join("data"), &upstream.url()).hosted(hosted).yaml());
    let url = format!("{}/_ferry/forget?image=app:v1", ferry.url());

    let anonymous = http_request("POST", &url, &[]).unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let bob = http_request("POST", &url, &[("Authorization", &basic_auth(BOB.0, BOB.1))]).unwrap();
    assert_eq!(bob.status, 403);
    assert!(bob.text().contains("DENIED") && bob.text().contains("hosted.admins"), "{}", bob.text());
    let wrong = forget(&ferry, "app:v1", Some((ALICE.0, "not-her-password")));
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("401"));
    let alice = forget(&ferry, "app:v1", Some(ALICE));
    assert!(alice.status.success(), "{}", String::from_utf8_lossy(&alice.stderr));
    let hosted = forget(&ferry, "internal/app", Some(ALICE));
    assert!(String::from_utf8_lossy(&hosted.stderr).contains("is hosted here"), "hosted tags are not cached");
}

#[test]
fn a_tag_deleted_upstream_is_passed_on_or_kept_as_configured() {
    let upstream = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[2048], 63);
    push_layout(&layout, "v1", &format!("{}/library/app:v1", upstream.host()), false).unwrap();
    let start = |name: &str, keep: bool| {
        let c = config(&work.path().join(name), &upstream.url()).set("cache.tag_ttl", "0s");
        Ferry::start(&c.set("cache.keep_deleted_tags", keep).yaml())
    };
    let (passes, keeps) = (start("passes", false), start("keeps", true));
    for ferry in [&passes, &keeps] {
        assert_eq!(digest_by_tag(ferry, "v1"), image.manifest_digest);
    }
    let url = format!("{}/v2/library/app/manifests/{}", upstream.url(), image.manifest_digest);
    assert_eq!(http_request("DELETE", &url, &[]).unwrap().status, 202, "deleted upstream");

    let gone =
        http_request("GET", &format!("{}/v2/library/app/manifests/v1", passes.url()), &[("Accept", OCI_MANIFEST)]);
    let gone = gone.unwrap();
    assert_eq!(gone.status, 404);
    assert!(gone.text().contains("MANIFEST_UNKNOWN"), "{}", gone.text());
    assert_eq!(digest_by_tag(&keeps, "v1"), image.manifest_digest, "the last good digest");
    let kept = metric(&scrape(&keeps), "ferry_cache_requests_total{kind=\"manifest\",result=\"kept_deleted\"}");
    assert_eq!(kept, 1.0);
}

#[test]
fn a_malformed_policy_glob_is_refused_by_check_config_with_its_key() {
    let work = tmp_dir();
    let bad = work.path().join("bad.yml");
    std::fs::write(&bad, "cache:\n  tag_policies:\n    - {match: \"docker.io/[0-9\", ttl: 1h}\n").unwrap();
    let out = Command::new(ferry_bin()).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.tag_policies[0].match") && err.contains("not a glob"), "{err}");
}

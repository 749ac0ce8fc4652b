//! A Kubernetes-style client: a real containerd (private root, state and socket in a temp dir)
//! pulling through Ferry with the `hosts.toml` files shipped in `deploy/clients/`, for two
//! registries. containerd sends `?ns=<registry>`; Ferry routes by it.

use std::process::Output;

use crate::harness::*;

#[test]
fn containerd_pulls_two_registries_through_one_ferry_with_the_shipped_hosts_toml() {
    let hub = Registry::start();
    let ghcr = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let a = build_index(&layout, "a", &[("linux", "amd64"), ("linux", "arm64")], 501);
    let b = build_image(&layout, "b", &[64 * 1024], 502);
    push_layout(&layout, "a", &format!("{}/library/tool:1", hub.host()), true).unwrap();
    push_layout(&layout, "b", &format!("{}/org/tool:1", ghcr.host()), false).unwrap();
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(hub.url())])
        .registry("ghcr.io", [upstream(ghcr.url())]);
    let ferry = Ferry::start(&cfg.yaml());
    let hosts = hosts_dir(&work.path().join("certs.d"), ferry.host(), &["docker.io", "ghcr.io"]);
    let containerd = Containerd::start();
    let hosts = hosts.to_string_lossy().into_owned();

    for reference in ["docker.io/library/tool:1", "ghcr.io/org/tool:1"] {
        let out = containerd.ctr(&["content", "fetch", "--all-platforms", "--hosts-dir", &hosts, reference]);
        assert!(
            out.status.success(),
            "ctr content fetch {reference}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            ferry.log_text()
        );
    }
    let listed = containerd.ctr(&["content", "ls", "-q"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let mut wanted = vec![a.index_digest.clone(), b.manifest_digest.clone()];
    wanted.extend(a.images.iter().map(|i| i.manifest_digest.clone()));
    wanted.extend(a.blob_digests());
    wanted.extend(b.blob_digests());
    for d in &wanted {
        assert!(listed.contains(d.as_str()), "containerd lacks {d}:\n{listed}");
    }
    // Each registry's content came from its own upstream (routed by ?ns=), once.
    for d in a.blob_digests() {
        assert_eq!(hub.count_requests("GET", &format!("/library/tool/blobs/{d}")), 1);
    }
    for d in b.blob_digests() {
        assert_eq!(ghcr.count_requests("GET", &format!("/org/tool/blobs/{d}")), 1);
        assert_eq!(hub.count_requests("GET", &format!("/blobs/{d}")), 0);
    }
}

#[test]
fn ctr_pushes_to_a_hosted_namespace_and_another_containerd_pulls_it_back() {
    let hub = Registry::start();
    let work = tmp_dir();
    let layout = work.path().join("layout");
    let image = build_image(&layout, "v1", &[1024, 256 * 1024], 503);
    push_layout(&layout, "v1", &format!("{}/library/src:v1", hub.host()), false).unwrap();
    let htpasswd = write_htpasswd(work.path(), &[("alice", "alice-pw")]);
    let cfg = FerryConfig::new(work.path().join("data"))
        .registry("docker.io", [upstream(hub.url())])
        .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd));
    let ferry = Ferry::start(&cfg.yaml());

    let pusher = Containerd::start();
    let src = format!("{}/library/src:v1", hub.host());
    let ok = |out: Output, what: &str| {
        assert!(out.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&out.stderr), ferry.log_text())
    };
    ok(pusher.ctr(&["content", "fetch", "--plain-http", &src]), "fetch from the upstream");
    let dest = format!("{}/internal/pushed:v1", ferry.host());
    ok(pusher.ctr(&["images", "push", "--plain-http", "--user", "alice:alice-pw", &dest, &src]), "ctr push");

    // A second containerd with an empty content store pulls it back from Ferry.
    let puller = Containerd::start();
    ok(puller.ctr(&["content", "fetch", "--plain-http", "--user", "alice:alice-pw", &dest]), "ctr pull");
    let listed = puller.ctr(&["content", "ls", "-q"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for d in std::iter::once(image.manifest_digest.clone()).chain(image.blob_digests()) {
        assert!(listed.contains(&d), "the pulled-back image lacks {d}:\n{listed}");
    }
    let raw = inspect_raw_creds(&dest, ("alice", "alice-pw")).unwrap();
    assert_eq!(raw, image.manifest_bytes, "containerd's push changed the manifest");
}

//! The clients the tests drive: hermetic [`skopeo`] runs against `127.0.0.1:PORT` references
//! (push, pull, inspect, list tags) and a private [`Containerd`] driven with `ctr`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{require_tool, run_bounded, tmp_dir, Creds, Proc, INSTALL_HINT};

/// Upper bound for one skopeo run unless the caller gives one (its `--command-timeout`).
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(600);
/// How much longer than its `--command-timeout` a skopeo process may run before it is killed.
const SKOPEO_KILL_SLACK: Duration = Duration::from_secs(30);
/// Upper bound for one `ctr` run.
const CTR_TIMEOUT: Duration = Duration::from_secs(300);
const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `skopeo ARGS...` hermetically and returns its output, whatever the exit status.
///
/// Global flags come first: `--policy` (accept anything), `--registries-conf` (no search
/// registries, no mirrors), `--registries.d` (empty), `--tmpdir`, `--command-timeout`. `HOME`
/// and the `XDG_*` directories point at a per-call temp dir so no user auth file or config is
/// read. `args` may start with further global flags (e.g. `--override-arch`).
pub fn skopeo(args: &[&str]) -> Output {
    skopeo_within(args, SKOPEO_TIMEOUT)
}

/// [`skopeo`] with `--command-timeout` set to `timeout`: the run fails once it has taken that
/// long (and the process is killed if it outlives it by much).
pub fn skopeo_within(args: &[&str], timeout: Duration) -> Output {
    require_tool("skopeo");
    let scratch = tmp_dir();
    let root = scratch.path();
    let policy = root.join("policy.json");
    let registries_conf = root.join("registries.conf");
    let registries_d = root.join("registries.d");
    let tmp = root.join("tmp");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("write skopeo policy");
    fs::write(&registries_conf, "unqualified-search-registries = []\n").expect("write registries.conf");
    fs::create_dir_all(&registries_d).expect("create registries.d");
    fs::create_dir_all(&tmp).expect("create skopeo tmpdir");
    let command_timeout = format!("{}ms", timeout.as_millis());
    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy")
        .arg(&policy)
        .arg("--registries-conf")
        .arg(&registries_conf)
        .arg("--registries.d")
        .arg(&registries_d)
        .arg("--tmpdir")
        .arg(&tmp)
        .args(["--command-timeout", &command_timeout])
        .args(args)
        .env("HOME", root)
        .env("XDG_CONFIG_HOME", root.join("config"))
        .env("XDG_DATA_HOME", root.join("data"))
        .env("XDG_RUNTIME_DIR", root.join("run"))
        .env("TMPDIR", &tmp)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("CONTAINERS_REGISTRIES_CONF")
        .env_remove("CONTAINERS_CONF");
    run_bounded(&mut cmd, timeout + SKOPEO_KILL_SLACK).unwrap_or_else(|e| panic!("{e} (install: {INSTALL_HINT})"))
}

/// Runs [`skopeo`] and returns stdout on success, or an error with the full stderr.
pub fn skopeo_ok(args: &[&str]) -> Result<String, String> {
    skopeo_ok_within(args, SKOPEO_TIMEOUT)
}

/// [`skopeo_ok`] bounded by `timeout` (see [`skopeo_within`]).
pub fn skopeo_ok_within(args: &[&str], timeout: Duration) -> Result<String, String> {
    let out = skopeo_within(args, timeout);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(skopeo_failure(args, &out))
    }
}

fn skopeo_failure(args: &[&str], out: &Output) -> String {
    format!(
        "skopeo {} failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// `docker://` reference for `127.0.0.1:PORT/repo:tag` (kept as is if it has a transport).
pub fn docker_ref(reference: &str) -> String {
    if reference.contains("://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

fn creds_arg(creds: Option<Creds<'_>>) -> Option<String> {
    creds.map(|(user, pass)| format!("{user}:{pass}"))
}

/// Pushes `tag` of OCI layout `layout` to `dest` (`127.0.0.1:PORT/repo:tag`), keeping digests.
/// With `all`, a multi-arch index is pushed whole (`--all`).
pub fn push_layout(layout: impl AsRef<Path>, tag: &str, dest: &str, all: bool) -> Result<String, String> {
    push_layout_impl(layout.as_ref(), tag, dest, all, None)
}

/// [`push_layout`] with `--dest-creds`.
pub fn push_layout_creds(
    layout: impl AsRef<Path>,
    tag: &str,
    dest: &str,
    all: bool,
    creds: Creds<'_>,
) -> Result<String, String> {
    push_layout_impl(layout.as_ref(), tag, dest, all, Some(creds))
}

fn push_layout_impl(
    layout: &Path,
    tag: &str,
    dest: &str,
    all: bool,
    creds: Option<Creds<'_>>,
) -> Result<String, String> {
    let src = format!("oci:{}:{tag}", layout.display());
    let dest = docker_ref(dest);
    let creds = creds_arg(creds);
    let mut args = vec!["copy", "--preserve-digests", "--dest-tls-verify=false"];
    if all {
        args.push("--all");
    }
    if let Some(c) = &creds {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(&args)
}

/// Copies `src` (`127.0.0.1:PORT/repo:tag` or `@sha256:...`) with `--all` into `dir:dest_dir`:
/// `dest_dir/manifest.json` holds the top manifest (or index) bytes and every blob is stored as
/// `dest_dir/<hex>`; for an index each instance manifest is `dest_dir/<hex>.manifest.json`.
pub fn pull_to_dir(src: &str, dest_dir: impl AsRef<Path>) -> Result<String, String> {
    pull_impl(src, &dir_ref(dest_dir.as_ref()), &[], None, SKOPEO_TIMEOUT)
}

/// [`pull_to_dir`] that fails unless the whole pull completes within `timeout` (skopeo's
/// `--command-timeout`).
pub fn pull_to_dir_within(src: &str, dest_dir: impl AsRef<Path>, timeout: Duration) -> Result<String, String> {
    pull_impl(src, &dir_ref(dest_dir.as_ref()), &[], None, timeout)
}

/// [`pull_to_dir`] with `--src-creds`.
pub fn pull_to_dir_creds(src: &str, dest_dir: impl AsRef<Path>, creds: Creds<'_>) -> Result<String, String> {
    pull_impl(src, &dir_ref(dest_dir.as_ref()), &[], Some(creds), SKOPEO_TIMEOUT)
}

/// Pulls only the `(os, arch)` image of `src` (as `docker pull` would) into `dir:dest_dir`.
pub fn pull_platform_to_dir(src: &str, dest_dir: impl AsRef<Path>, platform: (&str, &str)) -> Result<String, String> {
    pull_platform_impl(src, dest_dir.as_ref(), platform, None)
}

/// [`pull_platform_to_dir`] with `--src-creds`.
pub fn pull_platform_to_dir_creds(
    src: &str,
    dest_dir: impl AsRef<Path>,
    platform: (&str, &str),
    creds: Creds<'_>,
) -> Result<String, String> {
    pull_platform_impl(src, dest_dir.as_ref(), platform, Some(creds))
}

fn pull_platform_impl(
    src: &str,
    dest_dir: &Path,
    (os, arch): (&str, &str),
    creds: Option<Creds<'_>>,
) -> Result<String, String> {
    let dest = dir_ref(dest_dir);
    let src = docker_ref(src);
    let creds = creds_arg(creds);
    // --override-* are global flags, so they go before the subcommand.
    let mut args =
        vec!["--override-os", os, "--override-arch", arch, "copy", "--preserve-digests", "--src-tls-verify=false"];
    if let Some(c) = &creds {
        args.extend(["--src-creds", c]);
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo_ok(&args)
}

/// Copies `src` with `--all` into OCI layout `layout` as `tag`, keeping layers uncompressed.
pub fn pull_to_oci(src: &str, layout: impl AsRef<Path>, tag: &str) -> Result<String, String> {
    let dest = format!("oci:{}:{tag}", layout.as_ref().display());
    pull_impl(src, &dest, &["--dest-oci-accept-uncompressed-layers"], None, SKOPEO_TIMEOUT)
}

/// [`pull_to_oci`] with `--src-creds`.
pub fn pull_to_oci_creds(src: &str, layout: impl AsRef<Path>, tag: &str, creds: Creds<'_>) -> Result<String, String> {
    let dest = format!("oci:{}:{tag}", layout.as_ref().display());
    pull_impl(src, &dest, &["--dest-oci-accept-uncompressed-layers"], Some(creds), SKOPEO_TIMEOUT)
}

fn dir_ref(dir: &Path) -> String {
    format!("dir:{}", dir.display())
}

fn pull_impl(
    src: &str,
    dest: &str,
    extra: &[&str],
    creds: Option<Creds<'_>>,
    timeout: Duration,
) -> Result<String, String> {
    let src = docker_ref(src);
    let creds = creds_arg(creds);
    let mut args = vec!["copy", "--all", "--preserve-digests", "--src-tls-verify=false"];
    args.extend_from_slice(extra);
    if let Some(c) = &creds {
        args.extend(["--src-creds", c]);
    }
    args.extend([src.as_str(), dest]);
    skopeo_ok_within(&args, timeout)
}

/// The exact manifest (or index) bytes the registry serves for `reference`.
pub fn inspect_raw(reference: &str) -> Result<Vec<u8>, String> {
    inspect_raw_impl(reference, None)
}

/// [`inspect_raw`] with `--creds`.
pub fn inspect_raw_creds(reference: &str, creds: Creds<'_>) -> Result<Vec<u8>, String> {
    inspect_raw_impl(reference, Some(creds))
}

fn inspect_raw_impl(reference: &str, creds: Option<Creds<'_>>) -> Result<Vec<u8>, String> {
    let reference = docker_ref(reference);
    let creds = creds_arg(creds);
    let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
    if let Some(c) = &creds {
        args.extend(["--creds", c]);
    }
    args.push(&reference);
    let out = skopeo(&args);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(skopeo_failure(&args, &out))
    }
}

/// Tags of repository `repo` (`127.0.0.1:PORT/repo`), as listed by the registry.
pub fn list_tags(repo: &str) -> Result<Vec<String>, String> {
    let repo = docker_ref(repo);
    let out = skopeo_ok(&["list-tags", "--tls-verify=false", &repo])?;
    let parsed: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    Ok(parsed["Tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_string)).collect())
}

/// A private containerd (root, state, sockets and log in a temp dir; no CRI plugin), driven
/// with `ctr` in namespace `ferry-e2e`. Killed (SIGKILL through its handle) when dropped.
pub struct Containerd {
    proc: Proc,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd and waits (bounded) until `ctr version` answers.
    pub fn start() -> Containerd {
        require_tool("containerd");
        require_tool("ctr");
        let dir = tmp_dir();
        let p = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n",
            root = p.join("root").display(),
            state = p.join("state").display(),
            sock = p.join("c.sock").display(),
            ttrpc = p.join("c.ttrpc").display(),
        );
        fs::write(p.join("config.toml"), config).expect("write containerd config");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(p.join("config.toml"));
        let proc = Proc::spawn("containerd", &mut cmd, p.join("containerd.log"));
        let mut c = Containerd { proc, dir };
        let deadline = Instant::now() + CONTAINERD_READY_TIMEOUT;
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not start: {}", c.log());
            assert!(c.proc.exited().is_none(), "containerd exited: {}", c.log());
            thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Runs `ctr --address SOCKET --namespace ferry-e2e ARGS...` (bounded) and returns its output.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.dir.path().join("c.sock")).args(["--namespace", "ferry-e2e"]).args(args);
        run_bounded(&mut cmd, CTR_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Everything containerd has logged so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// Copies the `hosts.toml` shipped in `deploy/clients/containerd/certs.d/<registry>/` for each of
/// `registries` into `into`, pointed at `ferry_host`, and returns `into` (a `--hosts-dir`).
pub fn hosts_dir(into: &Path, ferry_host: &str, registries: &[&str]) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients/containerd/certs.d");
    for r in registries {
        let text = fs::read_to_string(shipped.join(r).join("hosts.toml")).expect("read shipped hosts.toml");
        assert!(text.contains("ferry.example.internal:5000"), "{r}/hosts.toml no longer names the placeholder host");
        fs::create_dir_all(into.join(r)).expect("create hosts dir");
        fs::write(into.join(r).join("hosts.toml"), text.replace("ferry.example.internal:5000", ferry_host))
            .expect("write hosts.toml");
    }
    into.to_owned()
}

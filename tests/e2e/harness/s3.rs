//! [`S3Server`]: a real S3-compatible server (`s3s-fs` from crates.io: real SigV4, multipart
//! uploads, ranged GETs, presigned URLs) on a loopback port, storing each bucket as a directory
//! so a test can look at exactly what a bucket holds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, http_request_timeout, require_tool, tmp_dir, Proc, Yaml, POLL_INTERVAL};

/// How long s3s-fs gets to answer its first request (it starts in well under a second).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Ports tried before giving up (a port from `free_port` may be taken before s3s-fs binds it).
const START_ATTEMPTS: usize = 5;

/// The access key every test server accepts.
pub const S3_ACCESS_KEY: &str = "ferry-test-key";
const S3_SECRET_KEY: &str = "ferry-test-secret-0123456789";

/// A running s3s-fs with one bucket, `ferry`.
pub struct S3Server {
    /// Holds `data/` (the buckets), the secret key file and the log.
    dir: PathBuf,
    /// Removes `dir` on drop (`None`: the shared server's shell removes it).
    _guard: Option<TempDir>,
    port: u16,
    proc: Option<Proc>,
}

impl S3Server {
    /// Starts s3s-fs with an empty bucket `ferry` and waits until it answers.
    pub fn start() -> S3Server {
        require_tool("s3s-fs");
        let guard = tmp_dir();
        let dir = guard.path().to_owned();
        fs::create_dir_all(dir.join("data").join(Self::BUCKET)).expect("create the bucket");
        fs::write(dir.join("secret"), S3_SECRET_KEY).expect("write the secret key file");
        let mut server = S3Server { dir, _guard: Some(guard), port: 0, proc: None };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("s3s-fs did not start: {last}")
    }

    /// The one bucket.
    pub const BUCKET: &'static str = "ferry";

    /// PID of the s3s-fs process (panics for the shared server, whose PID is its shell's
    /// child's).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("a started s3s-fs").pid()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `storage.s3` section for this server under `prefix` (empty or ending in `/`).
    pub fn section(&self, prefix: &str) -> Yaml {
        let mut s = Yaml::Map(Vec::new());
        s.insert("bucket", Self::BUCKET.into());
        s.insert("endpoint", self.url().into());
        s.insert("prefix", prefix.into());
        s.insert("path_style", Yaml::Bare("true".into()));
        s.insert("access_key_id", S3_ACCESS_KEY.into());
        s.insert("secret_access_key_file", self.dir.join("secret").as_path().into());
        // The smallest part S3 allows, so a few MiB already make a multipart upload.
        s.insert("upload_part_size", "5MiB".into());
        s
    }

    /// Where object `key` of the bucket is stored.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.join("data").join(Self::BUCKET).join(key)
    }

    /// Every object key of the bucket under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let base = self.dir.join("data").join(Self::BUCKET);
        let mut out = Vec::new();
        let mut dirs = vec![base.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let path = e.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(rel) = path.strip_prefix(&base) {
                    let key = rel.to_string_lossy().into_owned();
                    if key.starts_with(prefix) {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Multipart uploads begun and neither completed nor aborted (s3s-fs keeps their parts
    /// beside the buckets).
    pub fn pending_upload_parts(&self) -> usize {
        fs::read_dir(self.dir.join("data"))
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id")).count())
            .unwrap_or(0)
    }

    /// Stops the server (SIGKILL to its own PID); the bucket stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("s3s-fs restart failed: {e}");
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("s3s-fs.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("s3s-fs");
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.dir.join("data"))
            .env("RUST_LOG", "warn");
        self.proc = Some(Proc::spawn("s3s-fs", &mut cmd, self.log_path()));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.as_mut().and_then(Proc::exited) {
                self.proc = None;
                return Err(format!("s3s-fs exited ({status}): {}", read(&self.log_path())));
            }
            // Any HTTP answer (an unsigned request is refused) means it is serving.
            if http_request_timeout("GET", &format!("{}/", self.url()), &[], Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err("s3s-fs did not answer in time".into());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Set to `s3` (`FERRY_E2E_STORAGE=s3`), the suites run with every Ferry storing in a bucket
/// of one shared s3s-fs (each Ferry under a prefix of its own) instead of under its root.
pub const STORAGE_ENV: &str = "FERRY_E2E_STORAGE";

/// Whether this run stores in a bucket (see [`STORAGE_ENV`]).
pub fn on_s3() -> bool {
    std::env::var(STORAGE_ENV).is_ok_and(|v| v == "s3")
}

/// The s3s-fs of an `s3` run, started on first use and ended with the test process.
pub fn shared_s3() -> &'static S3Server {
    static SHARED: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    SHARED.get_or_init(S3Server::start_shared)
}

/// The key prefix of the Ferry whose local root is `root` in an `s3` run (roots are unique
/// temporary directories, so prefixes are too).
pub fn s3_prefix_for(root: &Path) -> String {
    let hex = super::sha256_bytes(root.to_string_lossy().as_bytes());
    format!("e2e-{}/", &hex["sha256:".len()..][..16])
}

/// Where store key `relative` (a path of the layout: `blobs/sha256/..`, `objects/..`,
/// `quarantine/..`) of the Ferry rooted at `root` is, as a file: under the root, or in an `s3`
/// run the bucket's file for it (s3s-fs keeps one file per object, laid out like the keys).
pub fn store_path(root: &Path, relative: &str) -> PathBuf {
    match on_s3() {
        true => shared_s3().object_path(&format!("{}{relative}", s3_prefix_for(root))),
        false => root.join(relative),
    }
}

impl S3Server {
    /// The shared server: it lives as long as the test process, which no destructor can
    /// promise for a static. So s3s-fs runs under a shell that reads its stdin, a pipe from
    /// this process: when the process ends, for whatever reason, the pipe closes, the shell
    /// ends s3s-fs (its own child, by PID) and removes the data.
    fn start_shared() -> S3Server {
        require_tool("s3s-fs");
        let dir = tmp_dir().keep();
        fs::create_dir_all(dir.join("data").join(Self::BUCKET)).expect("create the bucket");
        fs::write(dir.join("secret"), S3_SECRET_KEY).expect("write the secret key file");
        let port = free_port();
        let script = "s3s-fs --host 127.0.0.1 --port \"$1\" --access-key \"$2\" --secret-key \"$3\" \"$4/data\" \
                      >\"$4/s3s-fs.log\" 2>&1 & pid=$!; cat >/dev/null; kill \"$pid\"; wait \"$pid\"; rm -rf \"$4\"";
        let mut child = Command::new("sh")
            .args(["-c", script, "sh", &port.to_string(), S3_ACCESS_KEY, S3_SECRET_KEY])
            .arg(&dir)
            .stdin(std::process::Stdio::piped())
            // The shell's own "Terminated" when it ends s3s-fs is no test output.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn s3s-fs under sh");
        // Kept open until the process exits; the shell's `cat` waits on it.
        std::mem::forget(child.stdin.take());
        let server = S3Server { dir, _guard: None, port, proc: None };
        let deadline = Instant::now() + READY_TIMEOUT;
        while http_request_timeout("GET", &format!("{}/", server.url()), &[], Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "shared s3s-fs did not start: {}", read(&server.log_path()));
            thread::sleep(POLL_INTERVAL);
        }
        // Never waited for: it ends after this process (see above).
        std::mem::forget(child);
        server
    }
}

/// A real moto server (`moto_server`, from PyPI: an in-memory S3 with the broader API, among
/// it ListMultipartUploads, which s3s-fs lacks) with one bucket, `ferry`. It accepts any
/// credentials and unsigned requests, so a test can look at it with plain HTTP.
pub struct MotoServer {
    dir: TempDir,
    port: u16,
    _proc: Proc,
}

impl MotoServer {
    /// Starts moto on a free port and creates the bucket.
    pub fn start() -> MotoServer {
        require_tool("moto_server");
        let dir = tmp_dir();
        fs::write(dir.path().join("secret"), S3_SECRET_KEY).expect("write the secret key file");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            let mut proc = Proc::spawn("moto_server", &mut cmd, dir.path().join("moto.log"));
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = proc.exited() {
                    last = format!("moto_server exited ({status}): {}", read(&dir.path().join("moto.log")));
                    break;
                }
                if let Ok(r) =
                    http_request_timeout("PUT", &format!("{url}/{}", S3Server::BUCKET), &[], Duration::from_secs(2))
                {
                    assert_eq!(r.status, 200, "create the bucket: {}", r.text());
                    return MotoServer { dir, port, _proc: proc };
                }
                if Instant::now() >= deadline {
                    last = "moto_server did not answer in time".into();
                    break;
                }
                thread::sleep(POLL_INTERVAL);
            }
        }
        panic!("moto_server did not start: {last}")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `storage.s3` section for this server under `prefix`.
    pub fn section(&self, prefix: &str) -> Yaml {
        let mut s = Yaml::Map(Vec::new());
        s.insert("bucket", S3Server::BUCKET.into());
        s.insert("endpoint", self.url().into());
        s.insert("prefix", prefix.into());
        s.insert("path_style", Yaml::Bare("true".into()));
        s.insert("access_key_id", S3_ACCESS_KEY.into());
        s.insert("secret_access_key_file", self.dir.path().join("secret").as_path().into());
        s.insert("upload_part_size", "5MiB".into());
        s
    }

    /// The keys of the bucket's incomplete multipart uploads (an unsigned ListMultipartUploads).
    pub fn pending_uploads(&self) -> Vec<String> {
        let r = super::http_request("GET", &format!("{}/{}?uploads", self.url(), S3Server::BUCKET), &[])
            .expect("list multipart uploads");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .split("<Upload>")
            .skip(1)
            .filter_map(|u| Some(u.split("<Key>").nth(1)?.split("</Key>").next()?.to_owned()))
            .collect()
    }
}

//! A real CNCF Distribution 2.8 (`docker-registry serve`) on a loopback port, with its own
//! storage, optional htpasswd or token auth, and its access log parsed.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::token::TokenAuth;
use super::{
    free_port, http_request_timeout, require_tool, tail, tmp_dir, write_htpasswd, Proc, LOG_TAIL_LINES, POLL_INTERVAL,
};

const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(10);
const REGISTRY_READY_ATTEMPTS: u32 = 200;
const REGISTRY_START_ATTEMPTS: u32 = 3;

/// Options for [`Registry::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Require HTTP basic auth for this single `(user, password)` (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
}

/// One line of the registry's access log (Apache combined format), e.g.
/// `127.0.0.1 - - [23/Nov/2026:17:41:14 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
/// (The user field is always `-`, even with htpasswd auth, so it is not kept.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Request target as sent, including any query string.
    pub path: String,
    pub status: u16,
    /// Response body bytes written (`-` in the log is reported as 0).
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses a combined-format line; returns `None` for anything else (e.g. logrus lines).
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let (method, path, proto) = (req.next()?, req.next()?, req.next()?);
        if !proto.starts_with("HTTP/") || req.next().is_some() {
            return None;
        }
        let mut fields = rest.split_whitespace();
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().unwrap_or(0);
        let user_agent = rest
            .trim_end()
            .strip_suffix('"')
            .and_then(|r| r.rsplit_once('"'))
            .map(|(_, ua)| ua.to_string())
            .unwrap_or_default();
        Some(Self { method: method.to_string(), path: path.to_string(), status, bytes, user_agent })
    }
}

/// A real `docker-registry` on `127.0.0.1:PORT` with its own storage in a temp dir.
///
/// Its stdout (access log) and stderr (logrus) go to one log file; the harness's own
/// readiness probes show up there as `GET /v2/` lines.
pub struct Registry {
    opts: RegistryOpts,
    /// `auth: token` settings (see [`Registry::start_with_token`]).
    token: Option<TokenAuth>,
    dir: TempDir,
    port: u16,
    proc: Option<Proc>,
}

impl Registry {
    /// Starts an anonymous registry and waits until `GET /v2/` answers.
    pub fn start() -> Self {
        Self::start_with(RegistryOpts::default())
    }

    /// Starts a registry with `opts` and waits until `GET /v2/` answers (200 or 401).
    pub fn start_with(opts: RegistryOpts) -> Self {
        Self::start_impl(opts, None)
    }

    /// Starts a registry with `auth: token` trusting `auth` (from [`super::token::TokenServer::auth`]):
    /// clients get `401` with `WWW-Authenticate: Bearer realm=...,service=...,scope=...` and
    /// must present a token from that server. Start the token server first and keep it alive.
    pub fn start_with_token(auth: TokenAuth) -> Self {
        Self::start_impl(RegistryOpts::default(), Some(auth))
    }

    fn start_impl(opts: RegistryOpts, token: Option<TokenAuth>) -> Self {
        require_tool("docker-registry");
        assert!(opts.htpasswd.is_none() || token.is_none(), "a registry has one auth method: htpasswd or token");
        let dir = tmp_dir();
        if let Some((user, pass)) = &opts.htpasswd {
            write_htpasswd(dir.path(), &[(user, pass)]);
        }
        let mut registry = Self { opts, token, dir, port: 0, proc: None };
        // The port is only reserved until `free_port` returns: retry if someone grabs it.
        let mut last_error = String::new();
        for _ in 0..REGISTRY_START_ATTEMPTS {
            registry.port = free_port();
            registry.write_config();
            match registry.spawn_and_wait() {
                Ok(()) => return registry,
                Err(e) if e.contains("address already in use") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("docker-registry could not get a free port: {last_error}")
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the running registry process (panics if stopped).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("registry is stopped").pid()
    }

    /// The `auth: token` settings the registry was started with, if any.
    pub fn token_auth(&self) -> Option<&TokenAuth> {
        self.token.as_ref()
    }

    /// The `(user, password)` the registry requires, if any.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.opts.htpasswd.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Root of the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// File receiving the registry's stdout and stderr (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Everything the registry has logged so far.
    pub fn log_text(&self) -> String {
        fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// All access-log entries so far, in order (across restarts).
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        self.log_text().lines().filter_map(AccessLogEntry::parse).collect()
    }

    /// Number of access-log entries with exactly `method` whose path contains `path_contains`.
    ///
    /// The log line is written before the response is flushed, so a request whose response
    /// the client has fully received is always counted.
    pub fn count_requests(&self, method: &str, path_contains: &str) -> usize {
        self.requests().iter().filter(|e| e.method == method && e.path.contains(path_contains)).count()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Kills the registry (SIGKILL to its own PID) and reaps it. Storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Stops the registry and starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("registry restart failed: {e}");
        }
    }

    fn write_config(&self) {
        let quote = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).expect("quote path");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: ferry-e2e-not-secret\n",
            storage = quote(self.storage_dir()),
            port = self.port,
        );
        if self.opts.htpasswd.is_some() {
            let _ = write!(
                config,
                "auth:\n  htpasswd:\n    realm: ferry-e2e\n    path: {}\n",
                quote(self.dir.path().join("htpasswd"))
            );
        }
        if let Some(token) = &self.token {
            let text = |s: &str| serde_json::to_string(s).expect("quote string");
            let _ = write!(
                config,
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                text(&token.realm),
                text(&token.service),
                text(&token.issuer),
                quote(token.rootcertbundle.clone())
            );
        }
        fs::write(self.dir.path().join("config.yml"), config).expect("write registry config");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(self.dir.path().join("config.yml"));
        // Quiet: the registry's own Drop replays its whole log, across restarts.
        self.proc = Some(Proc::spawn("docker-registry", &mut cmd, self.log_path()).quiet());
        let result = self.wait_ready();
        if result.is_err() {
            self.stop();
        }
        result
    }

    /// Polls `GET /v2/` (bounded in attempts and time) until it answers 200 or 401.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + REGISTRY_READY_TIMEOUT;
        let probe_url = format!("{}/v2/", self.url());
        let mut last = String::from("no probe made");
        for _ in 0..REGISTRY_READY_ATTEMPTS {
            if let Some(status) = self.proc.as_mut().and_then(Proc::exited) {
                return Err(format!("docker-registry exited early ({status}); log:\n{}", self.log_text()));
            }
            match http_request_timeout("GET", &probe_url, &[], Duration::from_secs(1)) {
                Ok(r) if r.status == 200 || r.status == 401 => return Ok(()),
                Ok(r) => last = format!("HTTP {}", r.status),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(POLL_INTERVAL);
        }
        Err(format!(
            "docker-registry on {} not ready within {REGISTRY_READY_TIMEOUT:?} (last probe: {last}); log:\n{}",
            self.host(),
            self.log_text()
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- docker-registry {} log (last {LOG_TAIL_LINES} lines) ----\n{}\n---- end ----",
                self.host(),
                tail(&self.log_text(), LOG_TAIL_LINES)
            );
        }
        self.stop();
    }
}

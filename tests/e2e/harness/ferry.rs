//! The binary under test: [`Ferry`], a running `ferry serve --config PATH`, started by a
//! [`Launcher`] (which binary, extra environment, where its output goes) and ready once it has
//! printed `listening on http://HOST:PORT` ([`listening_host`]).

use std::env;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{strip_ansi, tail, tmp_dir, wait_bounded, LOG_TAIL_LINES, POLL_INTERVAL};

const FERRY_READY_TIMEOUT: Duration = Duration::from_secs(20);
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a Ferry whose output pipes closed gets to exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
const RESTART_MARKER: &str = "---- ferry restarted ----";

/// Path of the `ferry` binary Cargo built for this test run (or bench).
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Extracts `HOST:PORT` from a line containing `listening on http://HOST:PORT` (or `https://`,
/// when the test configured TLS and builds its own `https://` URLs from [`Ferry::host`]).
pub fn listening_host(line: &str) -> Option<String> {
    let (i, marker) =
        ["listening on http://", "listening on https://"].into_iter().find_map(|m| line.find(m).map(|i| (i, m)))?;
    let start = i + marker.len();
    let host: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    let (_, port) = host.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|&p| p != 0)?;
    Some(host)
}

/// How to start Ferry: [`Ferry::launcher`]`().env(..).start(yaml)`.
#[derive(Clone, Debug)]
pub struct Launcher {
    bin: PathBuf,
    envs: Vec<(String, String)>,
    log_file: bool,
}

impl Default for Launcher {
    fn default() -> Self {
        Launcher { bin: PathBuf::from(ferry_bin()), envs: Vec::new(), log_file: false }
    }
}

impl Launcher {
    /// Runs this binary instead of the one Cargo built (the bench's `FERRY_BIN`).
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = bin.into();
        self
    }

    /// An extra environment variable (e.g. `("FERRY_LOG", "debug")`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Sends Ferry's output to `ferry.log` next to its config instead of capturing it line by
    /// line in memory: for long, busy runs (benches) whose access log would otherwise cost the
    /// harness CPU and memory. Log waits then poll the file.
    pub fn log_to_file(mut self) -> Self {
        self.log_file = true;
        self
    }

    /// Writes `config_yaml` to a temp file, starts Ferry with it and waits (at most 20 s)
    /// for `listening on http://127.0.0.1:PORT`. Panics with the captured output on failure.
    /// The config should say `listen: "127.0.0.1:0"` (as [`super::FerryConfig`] does).
    pub fn start(self, config_yaml: &str) -> Ferry {
        self.try_start(config_yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Launcher::start`], but returns the exit status and output as an error if Ferry
    /// exits (or stays silent) instead of listening: for testing rejected configs.
    pub fn try_start(self, config_yaml: &str) -> Result<Ferry, String> {
        let dir = tmp_dir();
        fs::write(dir.path().join("ferry.yaml"), config_yaml).expect("write ferry config");
        let log = if self.log_file { Log::File(dir.path().join("ferry.log")) } else { Log::Memory(Arc::default()) };
        let mut ferry = Ferry { child: None, host: String::new(), launcher: self, log, dir };
        ferry.spawn()?;
        Ok(ferry)
    }
}

/// Process output shared between reader threads and the test, with change notification.
#[derive(Default)]
struct LogBuffer {
    text: Mutex<String>,
    changed: Condvar,
}

impl LogBuffer {
    fn push_line(&self, line: &str) {
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        text.push_str(line);
        text.push('\n');
        self.changed.notify_all();
    }

    fn snapshot(&self) -> String {
        self.text.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits (bounded) until the text contains `needle`, waking on every new line.
    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if text.contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            text = self.changed.wait_timeout(text, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Where Ferry's output goes.
enum Log {
    /// Captured line by line through pipes (ANSI stripped); set `FERRY_E2E_ECHO=1` to also
    /// echo it live to the test's stderr.
    Memory(Arc<LogBuffer>),
    /// Appended to this file (stdout and stderr), read back on demand.
    File(PathBuf),
}

impl Log {
    fn push_line(&self, line: &str) {
        match self {
            Log::Memory(buffer) => buffer.push_line(line),
            Log::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path);
                let _ = file.and_then(|mut f| writeln!(f, "{line}"));
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Log::Memory(buffer) => buffer.snapshot(),
            Log::File(path) => {
                let raw = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                raw.lines().map(|l| strip_ansi(l) + "\n").collect()
            }
        }
    }
}

enum ReaderEvent {
    Listening(String),
    Eof,
}

/// A running `ferry serve --config PATH`, with its output captured (see [`Launcher`]).
pub struct Ferry {
    child: Option<Child>,
    host: String,
    launcher: Launcher,
    log: Log,
    dir: TempDir,
}

impl Ferry {
    /// [`Launcher::start`] with the defaults: the binary Cargo built, output captured.
    pub fn start(config_yaml: &str) -> Self {
        Launcher::default().start(config_yaml)
    }

    /// A [`Launcher`] with the defaults, to change before starting.
    pub fn launcher() -> Launcher {
        Launcher::default()
    }

    /// Stops Ferry if it is running (SIGTERM, bounded) and starts it again with the same
    /// config file and environment; the port may change. The output log is kept and
    /// continues after a `---- ferry restarted ----` line.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.log.push_line(RESTART_MARKER);
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// Spawns the process, wires up its output and waits for the listening line.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.launcher.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("NO_COLOR", "1")
            .envs(self.launcher.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let waited = match &self.log {
            Log::Memory(buffer) => spawn_captured(&mut cmd, buffer, &self.launcher.bin),
            Log::File(path) => spawn_logged(&mut cmd, path, &self.launcher.bin),
        };
        match waited {
            Ok((child, host)) => {
                self.child = Some(child);
                self.host = host;
                Ok(())
            }
            Err(failure) => Err(format!("{failure}\n---- ferry output ----\n{}---- end ----", self.log.text())),
        }
    }

    /// `127.0.0.1:PORT` Ferry listens on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// PID of the Ferry process (panics once it has been stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ferry is stopped").id()
    }

    /// The config file Ferry was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ferry.yaml")
    }

    /// Everything Ferry printed so far (stdout and stderr interleaved, ANSI stripped).
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits (bounded by `timeout`) until Ferry's output contains `needle`; returns whether
    /// it did. Wakes on every new line (polls when the output goes to a file).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        match &self.log {
            Log::Memory(buffer) => buffer.wait_for(needle, timeout),
            Log::File(_) => {
                let deadline = Instant::now() + timeout;
                loop {
                    if self.log.text().contains(needle) {
                        return true;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                    thread::sleep(POLL_INTERVAL);
                }
            }
        }
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (via its own child handle) and reap; returns the exit status.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("ferry already stopped");
        let _ = child.kill();
        child.wait().expect("wait for ferry")
    }

    /// Sends SIGTERM (`kill -TERM PID`) and waits up to 15 s for Ferry to exit; returns its
    /// exit status. If it does not exit in time it gets SIGKILL and the test panics.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(TERMINATE_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "ferry did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM (killed it); \
                     output:\n{}",
                self.log_text()
            )
        })
    }

    /// Sends SIGTERM and waits up to `timeout`; `None` (after a SIGKILL) if it did not exit.
    pub fn terminate_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("ferry already stopped");
        let pid = child.id();
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).stdin(Stdio::null()).status();
        if !sent.as_ref().is_ok_and(ExitStatus::success) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kill -TERM {pid} failed: {sent:?}");
        }
        wait_bounded(child, timeout).ok()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- ferry {} output (last {LOG_TAIL_LINES} lines) ----\n{}\n---- end ----",
                self.host,
                tail(&self.log_text(), LOG_TAIL_LINES)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_failed(bin: &Path, e: std::io::Error) -> ! {
    panic!("spawn {}: {e}", bin.display())
}

/// Kills and reaps a child that did not get ready; returns `why`.
fn give_up(mut child: Child, why: String) -> String {
    let _ = child.kill();
    let _ = child.wait();
    why
}

/// Spawns `cmd` with its output piped into `buffer`; waits for the listening line.
fn spawn_captured(cmd: &mut Command, buffer: &Arc<LogBuffer>, bin: &Path) -> Result<(Child, String), String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| spawn_failed(bin, e));
    let (tx, rx) = mpsc::channel();
    let echo = env::var_os("FERRY_E2E_ECHO").is_some_and(|v| v == "1");
    spawn_reader(child.stdout.take().map(ReaderStream::Out), buffer, &tx, echo);
    spawn_reader(child.stderr.take().map(ReaderStream::Err), buffer, &tx, echo);
    drop(tx);

    let deadline = Instant::now() + FERRY_READY_TIMEOUT;
    let mut eofs = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ReaderEvent::Listening(host)) => return Ok((child, host)),
            Ok(ReaderEvent::Eof) => {
                eofs += 1;
                if eofs == 2 {
                    // Both pipes closed: the process is exiting; reap it.
                    let status = wait_bounded(child, EXIT_TIMEOUT).map_or_else(|e| e, |s| s.to_string());
                    return Err(format!("ferry exited before listening ({status})"));
                }
            }
            Err(_) => {
                let why = format!("ferry did not print `listening on http://...` within {FERRY_READY_TIMEOUT:?}");
                return Err(give_up(child, why + "; killed it"));
            }
        }
    }
}

/// Spawns `cmd` with its output appended to `log`; polls the file (bounded) for the listening
/// line.
fn spawn_logged(cmd: &mut Command, log: &Path, bin: &Path) -> Result<(Child, String), String> {
    let out = OpenOptions::new().create(true).append(true).open(log).expect("open ferry log");
    let err = out.try_clone().expect("clone ferry log handle");
    // Only lines written by this process count (the log is kept across restarts).
    let skip = fs::read_to_string(log).map_or(0, |t| t.lines().count());
    let mut child = cmd.stdout(out).stderr(err).spawn().unwrap_or_else(|e| spawn_failed(bin, e));
    let deadline = Instant::now() + FERRY_READY_TIMEOUT;
    loop {
        let text = fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if let Some(host) = text.lines().skip(skip).find_map(listening_host) {
            return Ok((child, host));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("ferry exited before listening ({status})"));
        }
        if Instant::now() >= deadline {
            let why = format!("ferry did not print `listening on http://...` within {FERRY_READY_TIMEOUT:?}");
            return Err(give_up(child, why + "; killed it"));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

enum ReaderStream {
    Out(ChildStdout),
    Err(ChildStderr),
}

/// Forwards every line of `stream` into `log` and reports the listening address and EOF.
fn spawn_reader(stream: Option<ReaderStream>, log: &Arc<LogBuffer>, tx: &mpsc::Sender<ReaderEvent>, echo: bool) {
    let (log, tx) = (Arc::clone(log), tx.clone());
    let Some(stream) = stream else {
        let _ = tx.send(ReaderEvent::Eof);
        return;
    };
    thread::spawn(move || {
        let reader: Box<dyn Read + Send> = match stream {
            ReaderStream::Out(s) => Box::new(s),
            ReaderStream::Err(s) => Box::new(s),
        };
        let mut reader = BufReader::new(reader);
        let mut raw = Vec::new();
        let mut announced = false;
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']));
            if echo {
                eprintln!("[ferry] {line}");
            }
            log.push_line(&line);
            if !announced {
                if let Some(host) = listening_host(&line) {
                    announced = true;
                    let _ = tx.send(ReaderEvent::Listening(host));
                }
            }
        }
        let _ = tx.send(ReaderEvent::Eof);
    });
}

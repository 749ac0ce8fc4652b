//! Processes the harness spawns: long-running servers with their output in a log file
//! ([`Proc`]), and bounded waits for any child ([`wait_bounded`], [`run_bounded`]).
//!
//! A process is only ever signalled through its own `Child` handle, or by the PID of a child
//! that has not been reaped yet (so the PID cannot have been reused).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::{tail, LOG_TAIL_LINES};

/// How long a child gets to be reaped after the SIGKILL that a timed-out wait sends.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A server process the harness spawned, stdin from `/dev/null`, stdout and stderr appended to
/// one log file. Killed (SIGKILL through its own handle) and reaped when dropped; when that
/// happens during a panic, the log's tail is replayed on stderr first.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    tail_on_panic: bool,
}

impl Proc {
    /// Spawns `cmd` (named `name` in messages) with its output appended to `log`; panics if it
    /// cannot be spawned.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| {
            panic!("spawn {name}: {e} (scripts/test.sh and scripts/bench.sh install the tools they need)")
        });
        Proc { name: name.to_string(), child: Some(child), log, tail_on_panic: true }
    }

    /// Does not replay the log on a panic (for owners that print a log of their own).
    pub fn quiet(mut self) -> Proc {
        self.tail_on_panic = false;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// PID of the process (panics once it has been killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap_or_else(|| panic!("{} is stopped", self.name)).id()
    }

    /// The file receiving the process's output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The exit status, if the process has exited (it is then reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL through the child handle, then reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if self.tail_on_panic && thread::panicking() {
            eprintln!(
                "---- {} log (last {LOG_TAIL_LINES} lines) ----\n{}\n---- end ----",
                self.name,
                tail(&self.log_text(), LOG_TAIL_LINES)
            );
        }
    }
}

/// Waits for `child` for at most `timeout` on a helper thread (no polling). On timeout the
/// child is sent SIGKILL by PID, which cannot have been reused because the waiter has not
/// reaped it yet, and an error is returned.
pub fn wait_bounded(mut child: Child, timeout: Duration) -> Result<ExitStatus, String> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(format!("waiting for PID {pid} failed: {e}")),
        Err(_) => {
            kill_unreaped(pid);
            let _ = rx.recv_timeout(REAP_TIMEOUT);
            Err(format!("PID {pid} did not exit within {timeout:?}; sent SIGKILL"))
        }
    }
}

/// Runs `cmd` to completion (stdin from `/dev/null`, stdout and stderr captured) within
/// `timeout`; after that it is killed the way [`wait_bounded`] does and an error is returned.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(|e| format!("{cmd:?}: {e}")),
        Err(_) => {
            kill_unreaped(pid);
            let _ = rx.recv_timeout(REAP_TIMEOUT);
            Err(format!("{cmd:?} did not finish within {timeout:?}; killed PID {pid}"))
        }
    }
}

/// `kill -KILL PID` for a child whose waiter thread has not reaped it.
fn kill_unreaped(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stdin(Stdio::null()).status();
}

/// Resident memory of process `pid`, in bytes (`VmRSS` in `/proc/PID/status`).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

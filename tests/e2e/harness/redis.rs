//! [`RedisServer`]: Debian's real `redis-server` on a loopback port, without persistence, that
//! a test can stop and start again (same port) to see replicas lose and regain it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, require_tool, tmp_dir, Proc, POLL_INTERVAL};

/// How long redis-server gets to answer PING (it starts in well under a second).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Ports tried before giving up (a port from `free_port` may be taken before it binds).
const START_ATTEMPTS: usize = 5;

/// A running redis-server.
pub struct RedisServer {
    dir: TempDir,
    port: u16,
    proc: Option<Proc>,
}

impl RedisServer {
    /// Starts redis-server on a free loopback port and waits until it answers PING.
    pub fn start() -> RedisServer {
        require_tool("redis-server");
        let mut server = RedisServer { dir: tmp_dir(), port: 0, proc: None };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}")
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it (SIGKILL to its own PID); nothing it held survives (no persistence).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("redis-server restart failed: {e}");
        }
    }

    /// Sends one inline command and returns the raw reply (e.g. `KEYS ferry:*`).
    pub fn command(&self, line: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis-server");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
        s.write_all(format!("{line}\r\n").as_bytes()).expect("send a command");
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).expect("read the reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        self.proc = Some(Proc::spawn("redis-server", &mut cmd, self.log_path()));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.as_mut().and_then(Proc::exited) {
                self.proc = None;
                return Err(format!("redis-server exited ({status})"));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err("redis-server did not answer in time".into());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

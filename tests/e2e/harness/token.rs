//! A test token issuer for Distribution's `auth: token` (the Docker Hub / Harbor flow).
//!
//! [`TokenServer`] is a std-only HTTP server on `127.0.0.1:PORT` answering
//! `GET /token?service=..&scope=..[&account=..]` with
//! `{"token", "access_token", "expires_in", "issued_at"}`. The JWT is RS256, signed by the
//! `openssl` CLI with a throwaway self-signed key made at start; the certificate rides in the
//! JWT header as `x5c` and is also written as the registry's `rootcertbundle`, so a real
//! `docker-registry` started with [`super::Registry::start_with_token`] accepts the tokens.
//! Every request is recorded ([`TokenServer::requests`], [`TokenServer::scopes`]) so tests can
//! check how often a client asked for a token and with which scopes.
//!
//! Whatever a scope asks for is granted: `repository:NAME:pull,push` yields
//! `{"type":"repository","name":NAME,"actions":["pull","push"]}` in the `access` claim.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tempfile::TempDir;

use super::encoding::{base64url, basic_auth, parse_query, rfc3339, unix_secs};
use super::{require_tool, tmp_dir, wait_bounded, Creds};

/// Upper bound for one `openssl` run (key generation or signing).
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(60);
/// Read/write timeout of one token-server connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head the token server accepts.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// How long dropping a [`TokenServer`] waits for its accept thread to exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Options for [`TokenServer::start`].
#[derive(Debug, Clone)]
pub struct TokenServerOpts {
    /// `aud` claim; the registry's `auth.token.service` (default `test-registry`).
    pub service: String,
    /// `iss` claim; the registry's `auth.token.issuer` (default `test-issuer`).
    pub issuer: String,
    /// Require HTTP basic auth with this `(user, password)`: a missing or wrong
    /// `Authorization` gets 401. `None` issues tokens to anyone (`sub` is then empty).
    pub basic: Option<(String, String)>,
    /// Token lifetime in seconds (`exp - iat`, and `expires_in`; default 300).
    /// Distribution allows 60 s of clock-skew leeway on `exp` and `nbf`.
    pub expires_in: u64,
}

impl Default for TokenServerOpts {
    fn default() -> Self {
        Self { service: "test-registry".into(), issuer: "test-issuer".into(), basic: None, expires_in: 300 }
    }
}

/// What a registry needs to trust a [`TokenServer`] (its `auth: token` section).
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM certificate the tokens are signed under. It lives in the token server's temp dir:
    /// keep the [`TokenServer`] alive as long as the registry (it needs it to issue tokens anyway).
    pub rootcertbundle: PathBuf,
}

/// One request the token server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub method: String,
    /// Request target as sent, including the query string.
    pub target: String,
    /// `service` query parameter, if any.
    pub service: Option<String>,
    /// Every requested scope: repeated `scope` parameters, each split on whitespace.
    pub scopes: Vec<String>,
    /// `account` query parameter, if any.
    pub account: Option<String>,
    /// User whose basic credentials were accepted (`None`: anonymous or rejected).
    pub user: Option<String>,
    /// HTTP status of the answer (200 when a token was issued).
    pub status: u16,
}

/// Everything the serving threads share.
struct Shared {
    opts: TokenServerOpts,
    key_path: PathBuf,
    /// Base64 (standard) DER of the signing certificate, for the `x5c` header.
    cert_b64: String,
    scratch: PathBuf,
    requests: Mutex<Vec<TokenRequest>>,
    counter: AtomicU64,
}

/// A running token issuer; stopped when dropped.
pub struct TokenServer {
    shared: Arc<Shared>,
    port: u16,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    cert_path: PathBuf,
    /// Holds key, certificate and signing scratch files; removed on drop.
    _dir: TempDir,
}

impl TokenServer {
    /// Generates a self-signed RSA key and certificate (`openssl req -x509`), binds
    /// `127.0.0.1:0` and serves token requests on a background thread.
    pub fn start(opts: TokenServerOpts) -> Self {
        require_tool("openssl");
        let dir = tmp_dir();
        let key_path = dir.path().join("token-key.pem");
        let cert_path = dir.path().join("token-cert.pem");
        let subject = format!("/CN={}", opts.issuer);
        let mut args = vec!["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-days", "1"];
        let (key_arg, cert_arg) = (key_path.to_string_lossy(), cert_path.to_string_lossy());
        args.extend(["-keyout", &key_arg, "-out", &cert_arg]);
        run_openssl(&args, dir.path()).unwrap_or_else(|e| panic!("generating the token signing key: {e}"));
        let pem = fs::read_to_string(&cert_path).expect("read token certificate");
        let cert_b64 = pem_body(&pem).unwrap_or_else(|| panic!("no certificate in {}:\n{pem}", cert_path.display()));

        let scratch = dir.path().join("sign");
        fs::create_dir_all(&scratch).expect("create signing scratch dir");
        let shared = Arc::new(Shared {
            opts,
            key_path,
            cert_b64,
            scratch,
            requests: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
        });
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind token server on 127.0.0.1:0");
        let port = listener.local_addr().expect("token server local_addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            thread::spawn(move || {
                accept_loop(&listener, &shared, &stop);
                let _ = done_tx.send(());
            });
        }
        Self { shared, port, stop, done, cert_path, _dir: dir }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/token`: the `realm` of the registry's Bearer challenge.
    pub fn realm(&self) -> String {
        format!("{}/token", self.url())
    }

    pub fn service(&self) -> &str {
        &self.shared.opts.service
    }

    pub fn issuer(&self) -> &str {
        &self.shared.opts.issuer
    }

    /// The basic credentials the server demands, if any (what skopeo's `--*-creds` need).
    pub fn creds(&self) -> Option<Creds<'_>> {
        self.shared.opts.basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The PEM certificate the tokens are signed under (the registry's `rootcertbundle`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The registry side of the trust relationship, for [`super::Registry::start_with_token`].
    pub fn auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.service().to_string(),
            issuer: self.issuer().to_string(),
            rootcertbundle: self.cert_path.clone(),
        }
    }

    /// Number of requests answered so far (any path, any status). A request is recorded before
    /// its answer is written, so one whose response a client has received is always counted.
    pub fn requests(&self) -> usize {
        self.lock_requests().len()
    }

    /// Number of tokens issued so far (requests answered 200).
    pub fn tokens_issued(&self) -> usize {
        self.lock_requests().iter().filter(|r| r.status == 200).count()
    }

    /// Every request answered so far, in order.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.lock_requests().clone()
    }

    /// Every scope asked for so far, in request order (one entry per scope, repeats kept).
    pub fn scopes(&self) -> Vec<String> {
        self.lock_requests().iter().flat_map(|r| r.scopes.iter().cloned()).collect()
    }

    /// Mints a token for `scopes` (same format as `GET /token`) without an HTTP request and
    /// without recording anything; `subject` becomes `sub`.
    pub fn issue(&self, scopes: &[&str], subject: &str) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        mint(&self.shared, &scopes, subject, SystemTime::now()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn lock_requests(&self) -> std::sync::MutexGuard<'_, Vec<TokenRequest>> {
        self.shared.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with one connection of our own; it sees `stop` and exits.
        let _ = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1));
        let _ = self.done.recv_timeout(SHUTDOWN_TIMEOUT);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = Arc::clone(shared);
        thread::spawn(move || {
            let _ = serve_connection(stream, &shared);
        });
    }
}

/// Reads one request, answers it and closes the connection.
fn serve_connection(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECTION_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    // Each read either makes progress or fails (timeout/EOF), and the head size is capped.
    while find(&head, b"\r\n\r\n").is_none() {
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, 431, "application/json", br#"{"error":"request head too large"}"#, &[]);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, content_type, body, extra) = handle(&String::from_utf8_lossy(&head), shared);
    respond(&mut stream, status, content_type, body.as_bytes(), &extra)?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

type Answer = (u16, &'static str, String, Vec<(&'static str, String)>);

/// Routes one request head and records it.
fn handle(head: &str, shared: &Shared) -> Answer {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let params = parse_query(query);
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let mut record = TokenRequest {
        method: method.clone(),
        target: target.clone(),
        service: param("service"),
        scopes,
        account: param("account"),
        user: None,
        status: 0,
    };

    let error = |status: u16, message: &str| -> Answer {
        (status, "application/json", json!({"errors": [{"code": "DENIED", "message": message}]}).to_string(), vec![])
    };
    let answer = if path != "/token" {
        error(404, "not found")
    } else if method != "GET" {
        let mut a = error(405, "only GET /token is supported");
        a.3.push(("Allow", "GET".to_string()));
        a
    } else if record.service.as_deref().is_some_and(|s| s != shared.opts.service) {
        error(400, "unknown service")
    } else {
        // `None`: credentials required but missing or wrong; `Some("")`: anonymous issuer.
        let subject = match &shared.opts.basic {
            None => Some(String::new()),
            Some((user, pass)) => authorization
                .as_deref()
                .is_some_and(|a| credentials_match(a, &basic_auth(user, pass)))
                .then(|| user.clone()),
        };
        match subject {
            None => {
                let mut a = error(401, "authentication required");
                let challenge = format!("Basic realm=\"{}\"", shared.opts.issuer);
                a.3.push(("WWW-Authenticate", challenge));
                a
            }
            Some(subject) => {
                record.user = (!subject.is_empty()).then(|| subject.clone());
                let now = SystemTime::now();
                match mint(shared, &record.scopes, &subject, now) {
                    Ok(token) => {
                        let body = json!({
                            "token": token,
                            "access_token": token,
                            "expires_in": shared.opts.expires_in,
                            "issued_at": rfc3339(unix_secs(now)),
                        });
                        (200, "application/json", body.to_string(), vec![])
                    }
                    Err(e) => error(500, &e),
                }
            }
        }
    };
    record.status = answer.0;
    shared.requests.lock().unwrap_or_else(PoisonError::into_inner).push(record);
    answer
}

/// `Basic <b64>` comparison with a case-insensitive scheme.
fn credentials_match(got: &str, expected: &str) -> bool {
    match (got.split_once(' '), expected.split_once(' ')) {
        (Some((scheme, value)), Some((_, want))) => scheme.eq_ignore_ascii_case("basic") && value.trim() == want,
        _ => false,
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, String)],
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Builds and signs (RS256) a token granting exactly what `scopes` ask for.
fn mint(shared: &Shared, scopes: &[String], subject: &str, now: SystemTime) -> Result<String, String> {
    let iat = unix_secs(now);
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [shared.cert_b64]});
    let claims = json!({
        "iss": shared.opts.issuer,
        "sub": subject,
        // A plain string: Distribution 2.8 decodes `aud` into a Go string.
        "aud": shared.opts.service,
        "exp": iat + shared.opts.expires_in,
        "nbf": iat,
        "iat": iat,
        "jti": format!("ferry-e2e-{}-{n}-{}", std::process::id(), now.duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos()),
        "access": access_claim(scopes),
    });
    let signing_input =
        format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()));
    let input_path = shared.scratch.join(format!("{n}.in"));
    let sig_path = shared.scratch.join(format!("{n}.sig"));
    fs::write(&input_path, &signing_input).map_err(|e| format!("write {}: {e}", input_path.display()))?;
    let (key, out, input) =
        (shared.key_path.to_string_lossy(), sig_path.to_string_lossy(), input_path.to_string_lossy());
    let signed = run_openssl(&["dgst", "-sha256", "-sign", &key, "-out", &out, &input], &shared.scratch)
        .and_then(|()| fs::read(&sig_path).map_err(|e| format!("read {}: {e}", sig_path.display())));
    let _ = fs::remove_file(&input_path);
    let _ = fs::remove_file(&sig_path);
    Ok(format!("{signing_input}.{}", base64url(&signed?)))
}

/// The `access` claim for `scopes` (`type:name:action,action`), one entry per resource with
/// actions merged in order. Malformed scopes are ignored, like a real issuer would.
fn access_claim(scopes: &[String]) -> Value {
    let mut grants: Vec<(String, String, Vec<String>)> = Vec::new();
    for scope in scopes {
        let Some((rest, actions)) = scope.rsplit_once(':') else { continue };
        let Some((kind, name)) = rest.split_once(':') else { continue };
        if kind.is_empty() || name.is_empty() {
            continue;
        }
        let index = match grants.iter().position(|(k, n, _)| k == kind && n == name) {
            Some(i) => i,
            None => {
                grants.push((kind.to_string(), name.to_string(), Vec::new()));
                grants.len() - 1
            }
        };
        for action in actions.split(',').filter(|a| !a.is_empty()) {
            if !grants[index].2.iter().any(|a| a == action) {
                grants[index].2.push(action.to_string());
            }
        }
    }
    Value::Array(
        grants
            .into_iter()
            .map(|(kind, name, actions)| json!({"type": kind, "name": name, "actions": actions}))
            .collect(),
    )
}

/// Runs `openssl ARGS` in `cwd` with output to a log file, bounded by [`OPENSSL_TIMEOUT`].
fn run_openssl(args: &[&str], cwd: &Path) -> Result<(), String> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let log_path = cwd.join(format!("openssl-{}.log", RUNS.fetch_add(1, Ordering::Relaxed)));
    let log = File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| format!("clone log handle: {e}"))?;
    let child = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawn openssl: {e}"))?;
    let status = wait_bounded(child, OPENSSL_TIMEOUT);
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let _ = fs::remove_file(&log_path);
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("openssl {} failed ({s}):\n{output}", args.join(" "))),
        Err(e) => Err(format!("openssl {}: {e}\n{output}", args.join(" "))),
    }
}

/// The base64 body of the first PEM `CERTIFICATE` block: standard base64 of the DER.
fn pem_body(pem: &str) -> Option<String> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let body: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    (!body.is_empty()).then_some(body)
}

/// Position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

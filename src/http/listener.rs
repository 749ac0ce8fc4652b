//! The listeners: bind, accept, the TLS handshake, graceful shutdown on SIGTERM/SIGINT, and
//! the SIGHUP reload of the certificate and the config file.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;

use super::guard::{self, Activity, Admission, Budget, Guarded};
use super::{dispatch, response, Tls};
use crate::app::{App, StartError};
use crate::config::{Config, LimitsConfig};
use crate::throttle::Throttle;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections the operations-only listener serves at once.
const OPS_MAX_CONNECTIONS: usize = 64;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the listener and serves until SIGTERM/SIGINT, then lets in-flight responses finish
/// (bounded by `shutdown_grace`). SIGHUP re-reads the TLS certificate and `config_path`
/// (see `watch_reload`).
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), StartError> {
    let app = App::new(&config)?;
    let tls = match &config.tls {
        Some(t) => Some(Tls::new(t).map_err(StartError::Tls)?),
        None => None,
    };
    let addr = config.listen_addr()?;
    let bind_err = |err| StartError::Bind { addr: config.listen.clone(), err };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{local}");
    // One signal stops every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // One budget for both listeners; separate admission, so probes and scrapes still get in
    // while the API port is full.
    let budget = Budget::new(config.limits.max_buffered.as_u64());
    let ops = match config.metrics_addr()? {
        Some(addr) => {
            let listen = config.metrics.listen.clone().unwrap_or_default();
            let ops_err = |err| StartError::Bind { addr: listen.clone(), err };
            let ops_listener = TcpListener::bind(addr).await.map_err(ops_err)?;
            tracing::info!("operations endpoints on http://{}", ops_listener.local_addr().map_err(ops_err)?);
            let bounds = Bounds::new(&config.limits, OPS_MAX_CONNECTIONS, budget.clone());
            let serving =
                serve(app.clone(), ops_listener, None, config.shutdown_grace, true, bounds, stopped(stop_rx.clone()));
            Some(tokio::spawn(serving))
        }
        None => None,
    };
    tokio::spawn(watch_reload(config.clone(), config_path, tls.clone()));
    let bounds = Bounds::new(&config.limits, config.limits.max_connections, budget);
    serve(app, listener, tls, config.shutdown_grace, false, bounds, stopped(stop_rx)).await;
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    Ok(())
}

/// On SIGHUP (`systemctl reload`): reloads the TLS certificate (new handshakes use it, open
/// connections keep theirs), and re-reads and validates the config file. A bad file or
/// certificate is reported and the running one stays. Other config changes are reported with
/// the keys that changed, because upstream pools and storage are built only at start:
/// swapping them under in-flight fetches is not safe.
async fn watch_reload(running: Config, path: Option<PathBuf>, tls: Option<Arc<Tls>>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    let running = serde_json::to_value(&running).unwrap_or_default();
    while hup.recv().await.is_some() {
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; keeping the current one"),
            }
        }
        let Some(path) = &path else {
            tracing::info!("SIGHUP: running on embedded defaults, no config file to reload");
            continue;
        };
        match Config::load(path) {
            Err(e) => tracing::error!(error = %e, "SIGHUP: new configuration rejected; keeping the running one"),
            Ok(new) => {
                let new = serde_json::to_value(&new).unwrap_or_default();
                let changed: Vec<&String> = match (running.as_object(), new.as_object()) {
                    (Some(a), Some(b)) => b.keys().filter(|k| a.get(*k) != b.get(*k)).collect(),
                    _ => vec![],
                };
                if changed.is_empty() {
                    tracing::info!("SIGHUP: configuration unchanged");
                } else {
                    tracing::warn!(?changed, "SIGHUP: configuration is valid; restart Ferry to apply the changes");
                }
            }
        }
    }
}

/// What every connection of one listener is held to (see [`guard`]).
#[derive(Clone)]
pub struct Bounds {
    /// At most this many connections of this listener at once.
    admission: Arc<Admission>,
    /// Unread response bytes, shared by every listener.
    budget: Arc<Budget>,
    /// Close a connection with nothing in flight after this.
    idle: Duration,
    /// Close a connection whose client has not read a frame for this long.
    stall: Duration,
}

impl Bounds {
    /// The bounds of `limits`, with `max_connections` for this listener.
    pub fn new(limits: &LimitsConfig, max_connections: usize, budget: Arc<Budget>) -> Bounds {
        Bounds {
            admission: Arc::new(Admission::new(max_connections)),
            budget,
            idle: limits.client_idle_timeout,
            stall: limits.send_stall_timeout,
        }
    }
}

/// Serves connections from `listener` (TLS when `tls` is set) until `shutdown` resolves, then
/// waits up to `grace` for in-flight responses. With `ops_only`, only `/metrics`, `/healthz`
/// and `/readyz` are answered. At most `bounds`' connections are served at once: beyond it the
/// accept loop waits for one to end, so the kernel's backlog, not Ferry, holds the rest.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    grace: Duration,
    ops_only: bool,
    bounds: Bounds,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = connection_builder();
    let accept_errors = Throttle::new(Duration::from_secs(10));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    tokio::pin!(shutdown);
    loop {
        let admitted = tokio::select! {
            permit = bounds.admission.admit() => permit,
            () = &mut shutdown => break,
        };
        let Some(permit) = admitted else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning (the
                // error repeats at once), and say so once per interval, with a count.
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::warn!(error = %e, suppressed, "accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            peer,
            ops_only,
            bounds: bounds.clone(),
        };
        tokio::spawn(connection.serve(stream, tls.as_ref().map(|t| t.acceptor()), permit));
    }
    drop(listener);
    tracing::info!("shutting down: waiting up to {}s for in-flight responses", grace.as_secs());
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// First pause after a failed accept; doubled on each further failure up to the maximum.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// HTTP/1.1 and HTTP/2 (by ALPN or preface) with the timeouts every connection gets.
fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper applies these only with a timer: without, a client that sends headers slowly (or
    // never) holds its connection forever.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        // What h2 itself buffers per stream beyond the frame it was handed.
        .max_send_buf_size(H2_SEND_BUFFER);
    builder
}

/// h2's per-stream send buffer (its default is 400 KiB; blob frames are handed over whole).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// One accepted connection, served until it ends, graceful shutdown closes it, or its
/// [`guard::watch`] finds it idle or stalled.
struct Connection {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
    /// Answer only the operations endpoints (the `metrics.listen` listener).
    ops_only: bool,
    bounds: Bounds,
}

impl Connection {
    /// Completes the TLS handshake (when `acceptor` is set, bounded by [`HANDSHAKE_TIMEOUT`])
    /// and serves the connection's requests. `_slot` is the admission permit, held until the
    /// connection ends.
    async fn serve(self, stream: TcpStream, acceptor: Option<TlsAcceptor>, _slot: OwnedSemaphorePermit) {
        let Connection { app, builder, watcher, peer, ops_only, bounds } = self;
        let local = stream.local_addr().ok();
        let activity = Activity::new();
        let service = {
            let (activity, budget) = (activity.clone(), bounds.budget.clone());
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (app, activity, budget) = (app.clone(), activity.clone(), budget.clone());
                async move {
                    // Counted from the request's arrival: a long upload or a slow upstream is
                    // a request in flight, not idleness.
                    let guard = Guarded::new(super::response::empty(), &activity, budget.clone());
                    if let Some(local) = local {
                        req.extensions_mut().insert(ListenerAddr(local));
                    }
                    let resp = if ops_only && !matches!(req.uri().path(), "/metrics" | "/healthz" | "/readyz") {
                        response::text(StatusCode::NOT_FOUND, "operations endpoints only\n")
                    } else {
                        dispatch::handle(app, req, peer).await
                    };
                    drop(guard);
                    let (parts, body) = resp.into_parts();
                    let body = Guarded::new(body, &activity, budget).boxed_unsync();
                    Ok::<_, Infallible>(Response::from_parts(parts, body))
                }
            })
        };
        let watch = guard::watch(activity, bounds.idle, bounds.stall);
        let served = async {
            match acceptor {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return Ok(());
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return Ok(());
                        }
                    };
                    watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                }
            }
        };
        // Dropping the connection's future closes its socket and frees whatever its streams
        // held: that is how an idle or stalled connection ends.
        tokio::select! {
            served = served => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
            }
            why = watch => tracing::debug!(%peer, ?why, "connection closed by the guard"),
        }
    }
}

/// The address of the listener a request arrived on (a request extension), for answers that
/// must name Ferry when the client's `Host` header is unusable.
#[derive(Clone, Copy, Debug)]
pub struct ListenerAddr(pub SocketAddr);

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM (`docker stop`, Kubernetes).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

//! The listeners: bind, accept, the TLS handshake, graceful shutdown on SIGTERM/SIGINT, and
//! the SIGHUP reload of the certificate and the config file.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{dispatch, response, Tls};
use crate::app::{App, StartError};
use crate::config::Config;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    let ops = match config.metrics_addr()? {
        Some(addr) => {
            let listen = config.metrics.listen.clone().unwrap_or_default();
            let ops_err = |err| StartError::Bind { addr: listen.clone(), err };
            let ops_listener = TcpListener::bind(addr).await.map_err(ops_err)?;
            tracing::info!("operations endpoints on http://{}", ops_listener.local_addr().map_err(ops_err)?);
            let serving = serve(app.clone(), ops_listener, None, config.shutdown_grace, true, stopped(stop_rx.clone()));
            Some(tokio::spawn(serving))
        }
        None => None,
    };
    tokio::spawn(watch_reload(config.clone(), config_path, tls.clone()));
    serve(app, listener, tls, config.shutdown_grace, false, stopped(stop_rx)).await;
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

/// Serves connections from `listener` (TLS when `tls` is set) until `shutdown` resolves, then
/// waits up to `grace` for in-flight responses. With `ops_only`, only `/metrics`, `/healthz`
/// and `/readyz` are answered.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    grace: Duration,
    ops_only: bool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = connection_builder();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the others.
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection = Connection {
                    app: app.clone(),
                    builder: builder.clone(),
                    watcher: graceful.watcher(),
                    peer,
                    ops_only,
                };
                tokio::spawn(connection.serve(stream, tls.as_ref().map(|t| t.acceptor())));
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: waiting up to {}s for in-flight responses", grace.as_secs());
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

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
        .max_concurrent_streams(256);
    builder
}

/// One accepted connection, served until it ends or graceful shutdown closes it.
struct Connection {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
    /// Answer only the operations endpoints (the `metrics.listen` listener).
    ops_only: bool,
}

impl Connection {
    /// Completes the TLS handshake (when `acceptor` is set, bounded by [`HANDSHAKE_TIMEOUT`])
    /// and serves the connection's requests.
    async fn serve(self, stream: TcpStream, acceptor: Option<TlsAcceptor>) {
        let Connection { app, builder, watcher, peer, ops_only } = self;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move {
                if ops_only && !matches!(req.uri().path(), "/metrics" | "/healthz" | "/readyz") {
                    return Ok::<_, Infallible>(response::text(StatusCode::NOT_FOUND, "operations endpoints only\n"));
                }
                Ok::<_, Infallible>(dispatch::handle(app, req, peer).await)
            }
        });
        let served = match acceptor {
            None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
            Some(acceptor) => {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
            }
        };
        if let Err(e) = served {
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
    }
}

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

//! The HTTP side: the listener, routing of `/v2/...` to handlers, the spec's error responses,
//! the access log, and graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::auth::{Auth, Identity, CHALLENGE};
use crate::cache::Cache;
use crate::config::Config;
use crate::distribution::{accept_list, range_header, Answer, Digest, ErrorCode, ProtocolError, Reference, Source};
use crate::distribution::{split_api, Endpoint};
use crate::hosted::{Hosted, HostedRequest};
use crate::metrics::Metrics;
use crate::registry::Router;
use crate::storage::{FsStorage, Storage};
use crate::upstream::Pool;

pub mod response;
mod tls;
use response::text as text_response;
pub use tls::Tls;

/// Response body type: streamed, boxed, errors abort the connection.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Everything a request handler needs.
pub struct App {
    router: Router,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    storage: Arc<dyn Storage>,
    /// Client credentials (when `hosted.htpasswd` is set).
    auth: Option<Arc<Auth>>,
    /// Private namespaces (when `hosted.namespaces` is not empty).
    hosted: Option<Arc<Hosted>>,
    /// How 401s challenge clients.
    challenge: crate::config::ChallengeKind,
    /// Configured token endpoint URL, if any (else derived from the request).
    token_realm: Option<String>,
    /// `https` with TLS, else `http` (for the derived token realm).
    scheme: &'static str,
}

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened.
    #[error("storage.root {path}: {err}")]
    Storage {
        /// The configured root.
        path: String,
        /// Cause.
        err: io::Error,
    },
    /// An upstream could not be set up.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::BuildError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The listener could not bind.
    #[error("listen {addr}: {err}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        err: io::Error,
    },
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS certificate or key could not be loaded.
    #[error("{0}")]
    Tls(String),
    /// The htpasswd file could not be loaded.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

impl App {
    /// Builds the application from a validated config: opens storage, builds upstream clients.
    /// No upstream is contacted: Ferry starts and serves its cache with every upstream down.
    pub fn new(config: &Config) -> Result<Arc<App>, StartError> {
        let metrics = Arc::new(Metrics::new()?);
        let storage_err = |err| StartError::Storage { path: config.storage.root.display().to_string(), err };
        let fs = FsStorage::open(&config.storage.root).map_err(storage_err)?;
        let leftovers = fs.remove_staging_leftovers().map_err(storage_err)?;
        if leftovers > 0 {
            tracing::info!(leftovers, "removed unfinished staging files of a previous run");
        }
        let storage: Arc<dyn Storage> = Arc::new(fs);
        let mut pools = HashMap::new();
        for (name, reg) in &config.registries {
            pools.insert(name.clone(), Arc::new(Pool::new(name, reg, metrics.clone())?));
        }
        let auth = Auth::from_config(&config.hosted)?.map(Arc::new);
        let hosted = match &auth {
            Some(auth) if !config.hosted.namespaces.is_empty() => {
                let hosted = Hosted::new(storage.clone(), auth.clone(), config.hosted.clone());
                // Abandoned uploads are purged in the background (when there is a runtime).
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(hosted.clone().purge_uploads_forever());
                }
                Some(hosted)
            }
            _ => None,
        };
        let max_size = config.storage.max_size.map(|s| s.as_u64());
        let (clock, guard_private) = (Arc::new(crate::cache::SystemClock), hosted.is_some());
        let cache =
            Cache::new(storage.clone(), pools, config.cache.clone(), max_size, guard_private, metrics.clone(), clock);
        Ok(Arc::new(App {
            router: Router::new(config.registries.keys().cloned(), &config.default_registry),
            cache,
            metrics,
            storage: storage.clone(),
            auth,
            hosted,
            challenge: config.hosted.challenge,
            token_realm: config.hosted.token_realm.clone(),
            scheme: if config.tls.is_some() { "https" } else { "http" },
        }))
    }

    /// Answers one request. Never fails: errors become the spec's JSON.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let req_is_head = method == Method::HEAD;
        let path = req.uri().path().to_owned();
        let challenge = self.challenge_for(&req);
        let (route, result) = self.dispatch(req, client).await;
        let (mut resp, source) = match result {
            Ok(ok) => ok,
            Err(e) => (response::error(&e, method == Method::HEAD, &challenge), None),
        };
        resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        // hyper stops polling once Content-Length bytes are out, so "all announced bytes sent"
        // is what complete means; HEAD answers announce a length but send nothing.
        let expected = match req_is_head {
            true => Some(0),
            false => parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
        };
        let tracked = Tracked {
            inner: body,
            bytes: 0,
            expected,
            finished: false,
            log: AccessLog { metrics: self.metrics.clone(), method, path, status, route, source, client, started },
        };
        Response::from_parts(parts, tracked.boxed_unsync())
    }

    /// The `WWW-Authenticate` value a 401 to `req` carries. Bearer (the default) points at
    /// Ferry's token endpoint, which gives anonymous clients anonymous tokens: Docker cannot pull
    /// anonymously from a registry that challenges with Basic.
    fn challenge_for(&self, req: &Request<Incoming>) -> HeaderValue {
        use crate::config::ChallengeKind;
        if self.challenge == ChallengeKind::Basic || req.uri().path() == crate::auth::TOKEN_PATH {
            return HeaderValue::from_static(CHALLENGE);
        }
        let realm = match &self.token_realm {
            Some(r) => r.clone(),
            None => {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| req.uri().authority().map(|a| a.as_str()))
                    .unwrap_or("localhost");
                format!("{}://{host}{}", self.scheme, crate::auth::TOKEN_PATH)
            }
        };
        HeaderValue::from_str(&format!("Bearer realm=\"{realm}\",service=\"{}\"", crate::auth::TOKEN_SERVICE))
            .unwrap_or_else(|_| HeaderValue::from_static(CHALLENGE))
    }

    /// Whether a token request's scopes (at least one) all ask only to pull proxied repositories.
    fn only_proxied_pulls(&self, query: Option<&str>) -> bool {
        let scopes: Vec<String> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        !scopes.is_empty()
            && scopes.iter().all(|scope| {
                let mut parts = scope.splitn(3, ':');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("repository"), Some(name), Some(actions)) => {
                        actions.split(',').all(|a| a == "pull")
                            && !self.hosted.as_ref().is_some_and(|h| h.is_hosted(name))
                    }
                    _ => false,
                }
            })
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> (&'static str, Result<(Response<Body>, Option<Source>), ProtocolError>) {
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, ());
        let path = req.uri().path();
        let method = req.method();
        let read_only = method == Method::GET || method == Method::HEAD;
        // Not yet an error: what bad credentials mean depends on where the request goes.
        let authn = match (&self.auth, path.starts_with("/v2") || path == crate::auth::TOKEN_PATH) {
            (Some(auth), true) => auth.authenticate(req.headers(), client).await,
            _ => Ok(Identity::Anonymous),
        };
        match path {
            // With credentials configured, an anonymous ping gets the challenge: Docker and
            // containers/image send Basic credentials only to registries that asked at /v2/.
            // Anonymous pulls of proxied images still work (clients treat this 401 as a hint).
            // Wrong credentials fail here too, so `docker login` reports them.
            // A client that presents a token we issued (an anonymous one included) or
            // skopeo's empty Basic credentials has done its part: it may ping.
            "/v2" | "/v2/"
                if read_only
                    && self.auth.is_some()
                    && (authn.is_err() || !req.headers().contains_key(header::AUTHORIZATION)) =>
            {
                let e = authn.err().unwrap_or_else(|| crate::auth::unauthorized("authentication required"));
                return ("other", Err(e));
            }
            "/v2" | "/v2/" if read_only => {
                let ping = Answer::json("application/json", "{}", method == Method::HEAD);
                return ("other", Ok((response::render(ping), None)));
            }
            "/v2/_catalog" if read_only && self.hosted.is_some() => {
                let Some(hosted) = &self.hosted else { return ("other", Err(no_endpoint(path))) };
                let who = match authn {
                    Ok(who) => who,
                    Err(e) => return ("other", Err(e)),
                };
                let reply = hosted.catalog(&who, req.uri().query(), method == Method::HEAD).await;
                return ("other", reply.map(|r| (response::render(r), None)));
            }
            crate::auth::TOKEN_PATH if read_only && self.auth.is_some() => {
                let Some(auth) = &self.auth else { return ("other", Err(no_endpoint(path))) };
                // Anonymous clients get anonymous tokens; wrong credentials get 401 (docker
                // login reports them). What a token may do is decided per request by the rules.
                // Docker asks with whatever credentials it has for the registry it mirrors (its
                // Docker Hub login): for pulls of proxied repositories, which are anonymous,
                // credentials that are not ours just mean an anonymous token. A login (no scope)
                // or any hosted or push scope still gets the 401.
                let authn = match authn {
                    Err(_)
                        if self.only_proxied_pulls(req.uri().query())
                            && auth.check_proxied(&Identity::Anonymous).is_ok() =>
                    {
                        Ok(Identity::Anonymous)
                    }
                    other => other,
                };
                return match authn {
                    Ok(who) => {
                        let token = auth.issue_token(&who);
                        let body = serde_json::json!({
                            "token": token,
                            "access_token": token,
                            "expires_in": crate::auth::TOKEN_TTL.as_secs(),
                        })
                        .to_string();
                        let mut answer = Answer::json("application/json", body, false);
                        if let Answer::Json { no_store, .. } = &mut answer {
                            *no_store = true;
                        }
                        ("other", Ok((response::render(answer), None)))
                    }
                    Err(e) => ("other", Err(e)),
                };
            }
            "/healthz" => return ("other", Ok((text_response(StatusCode::OK, "ok\n"), None))),
            "/readyz" => return ("other", Ok((self.readiness().await, None))),
            "/metrics" => {
                let mut r = text_response(StatusCode::OK, self.metrics.render());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                return ("other", Ok((r, None)));
            }
            _ => {}
        }
        let Some(api) = path.strip_prefix("/v2/").and_then(split_api) else {
            return ("other", Err(no_endpoint(path)));
        };
        let route_label = api.endpoint.label();
        if let Some(hosted) = self.hosted.as_ref().filter(|h| h.is_hosted(api.name)) {
            let who = match authn {
                Ok(who) => who,
                Err(e) => return (route_label, Err(e)),
            };
            let body: crate::storage::ByteStream = Box::pin(body.into_data_stream().map_err(io::Error::other));
            let hosted_req = HostedRequest {
                method,
                name: api.name,
                endpoint: api.endpoint,
                query: req.uri().query(),
                headers: req.headers(),
                who: &who,
                body,
            };
            return (route_label, hosted.handle(hosted_req).await.map(|r| (response::render(r), None)));
        }
        let ns = query_param(req.uri().query(), "ns");
        let result = async {
            if let Some(auth) = &self.auth {
                // Docker sends its Docker Hub credentials to a mirror that challenged it: on an
                // anonymous proxied namespace, credentials that are not ours mean "anonymous".
                let who = match authn {
                    Ok(who) => who,
                    Err(e) if auth.check_proxied(&Identity::Anonymous).is_err() => return Err(e),
                    Err(_) => Identity::Anonymous,
                };
                auth.check_proxied(&who)?;
            }
            let route = self.router.route(api.name, ns.as_deref())?;
            if !read_only {
                return Err(ProtocolError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "{} is a read-only mirror of {}: pushes and deletes are not accepted here{}",
                        api.name,
                        route.registry,
                        self.push_hint()
                    ),
                ));
            }
            let head = method == Method::HEAD;
            match api.endpoint {
                Endpoint::Manifest(r) => {
                    let reference = Reference::parse(r)?;
                    let accept = accept_list(req.headers());
                    let (manifest, source) = self.cache.manifest(&route, &reference, &accept).await?;
                    Ok((response::render(Answer::Manifest { manifest, source: source.clone(), head }), Some(source)))
                }
                Endpoint::Blob(d) => {
                    let digest = Digest::parse(d)?;
                    let blob = self.cache.blob(&route, &digest, range_header(req.headers()), head).await?;
                    let source = blob.source.clone();
                    Ok((response::render(Answer::Blob { digest, blob }), Some(source)))
                }
                Endpoint::Uploads(_) => Err(ProtocolError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "{} is a read-only mirror of {}: pushes are not accepted here{}",
                        api.name,
                        route.registry,
                        self.push_hint()
                    ),
                )),
                Endpoint::Tags => {
                    Err(ProtocolError::new(ErrorCode::Unsupported, "tag listing is not proxied by this mirror"))
                }
                // 404, not 405: oras, cosign and notation fall back to the referrers tag
                // schema on a 404 only.
                Endpoint::Referrers(_) => Err(ProtocolError::new(
                    ErrorCode::ManifestUnknown,
                    "the referrers API is not proxied by this mirror; use the referrers tag schema",
                )),
            }
        }
        .await;
        (route_label, result)
    }

    /// Where pushes do go, for the refusal message of a proxied namespace.
    fn push_hint(&self) -> String {
        match &self.hosted {
            Some(h) => format!("; pushes are accepted under {}", h.namespaces().join("/, ") + "/"),
            None => String::new(),
        }
    }

    async fn readiness(&self) -> Response<Body> {
        if self.storage.probe().await.is_ok() {
            text_response(StatusCode::OK, "ready\n")
        } else {
            text_response(StatusCode::SERVICE_UNAVAILABLE, "storage is not writable\n")
        }
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

fn no_endpoint(path: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::NameUnknown, format!("no such endpoint: {path}"))
}

/// What the access log and the request metrics need, recorded when the body is done.
struct AccessLog {
    metrics: Arc<Metrics>,
    method: Method,
    path: String,
    status: StatusCode,
    route: &'static str,
    source: Option<Source>,
    client: SocketAddr,
    started: Instant,
}

/// Wraps a response body to count bytes and log once the body is finished or dropped, so the
/// log line and the histogram cover the whole transfer, not just the headers.
struct Tracked {
    inner: Body,
    bytes: u64,
    expected: Option<u64>,
    finished: bool,
    log: AccessLog,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.finished = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let l = &self.log;
        let finished = self.finished || self.inner.is_end_stream() || self.expected == Some(self.bytes);
        let source_label = match &l.source {
            Some(s) => s.label(),
            None => "none",
        };
        let upstream = match &l.source {
            Some(Source::Upstream(u)) => u.as_str(),
            _ => "",
        };
        let secs = l.started.elapsed().as_secs_f64();
        l.metrics.http_requests.with_label_values(&[l.method.as_str(), l.route, l.status.as_str()]).inc();
        if l.source.is_some() {
            l.metrics.http_duration.with_label_values(&[l.route, source_label]).observe(secs);
            l.metrics.bytes_served.with_label_values(&[source_label]).inc_by(self.bytes);
        }
        let source = match &l.source {
            Some(Source::Cache) => "cache",
            Some(Source::Revalidated) => "cache-revalidated",
            Some(Source::Stale) => "cache-stale",
            Some(Source::Upstream(_)) => "upstream",
            Some(Source::Hosted) | None => "-",
        };
        tracing::info!(
            target: "ferry::access",
            method = %l.method,
            path = %l.path,
            status = l.status.as_u16(),
            bytes = self.bytes,
            duration_ms = (secs * 1000.0).round() as u64,
            source,
            upstream,
            client = %l.client,
            complete = finished,
            "request"
        );
    }
}

/// Binds the listener and serves until SIGTERM/SIGINT, then lets in-flight responses finish
/// (bounded by `shutdown_grace`). SIGHUP re-reads the TLS certificate and `config_path`
/// (see [`watch_reload`]).
pub async fn run(config: Config, config_path: Option<std::path::PathBuf>) -> Result<(), StartError> {
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
async fn watch_reload(running: Config, path: Option<std::path::PathBuf>, tls: Option<Arc<Tls>>) {
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

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
                let app = app.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let app = app.clone();
                    async move {
                        if ops_only && !matches!(req.uri().path(), "/metrics" | "/healthz" | "/readyz") {
                            return Ok::<_, Infallible>(text_response(StatusCode::NOT_FOUND, "operations endpoints only\n"));
                        }
                        Ok::<_, Infallible>(app.handle(req, peer).await)
                    }
                });
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let acceptor = tls.as_ref().map(|t| t.acceptor());
                tokio::spawn(async move {
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
                });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        assert_eq!(query_param(Some("ns=ghcr.io&x=1"), "ns").as_deref(), Some("ghcr.io"));
        assert_eq!(query_param(Some("ns=localhost%3A5000"), "ns").as_deref(), Some("localhost:5000"));
        assert_eq!(query_param(None, "ns"), None);
    }
}

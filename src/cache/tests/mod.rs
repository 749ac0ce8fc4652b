//! The cache in process, against a fake upstream the test steers: tag freshness and
//! stale-if-error by a [`ManualClock`], and the blob coalescer by holding the upstream's body
//! until the readers are where the test wants them. Nothing here sleeps: every wait is on an
//! event (a request logged, bytes written, a fetch task ended). The timeout around each test
//! only turns a hang into a failure.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::{mpsc, watch};

use super::fetch::Progress;
use super::{Cache, ManualClock, Services};
use crate::config::{CacheConfig, RegistryConfig, UpstreamConfig};
use crate::distribution::{Digest, ErrorCode, Reference, RepoName, Source, OCI_MANIFEST};
use crate::metrics::Metrics;
use crate::registry::Route;
use crate::storage::{layout, ByteStream, FsStorage, Storage};
use crate::upstream::Pool;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the fake upstream knows and what it was asked.
#[derive(Default)]
struct UpstreamState {
    /// Manifests by reference (tag or digest): media type and bytes.
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    /// Blobs by digest, with the length announced (`None`: chunked, so the body ends only when
    /// the test ends it). Their bytes come from the test, through the feed each GET hands over.
    blobs: Mutex<HashMap<String, Option<u64>>>,
    feeds: Mutex<Option<mpsc::UnboundedSender<mpsc::UnboundedSender<Bytes>>>>,
    /// Answers 503 to everything.
    down: AtomicBool,
    /// `(method, path)` of every request, in order.
    requests: Mutex<Vec<(Method, String)>>,
}

/// A registry upstream on 127.0.0.1, served by hyper in this process.
struct FakeUpstream {
    url: String,
    /// How Ferry names it (host:port).
    name: String,
    state: Arc<UpstreamState>,
    feeds: mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let name = listener.local_addr().unwrap().to_string();
        let url = format!("http://{name}");
        let (feed_tx, feeds) = mpsc::unbounded_channel();
        let state = Arc::new(UpstreamState { feeds: Mutex::new(Some(feed_tx)), ..Default::default() });
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.answer(req)) }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        FakeUpstream { url, name, state, feeds }
    }

    fn put_manifest(&self, reference: &str, bytes: &'static [u8]) {
        let entry = (OCI_MANIFEST.to_owned(), Bytes::from_static(bytes));
        self.state.manifests.lock().unwrap().insert(reference.to_owned(), entry);
    }

    fn delete_manifest(&self, reference: &str) {
        self.state.manifests.lock().unwrap().remove(reference);
    }

    fn put_blob(&self, digest: &Digest, len: Option<u64>) {
        self.state.blobs.lock().unwrap().insert(digest.to_string(), len);
    }

    fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// The requests since the last call.
    fn take_requests(&self) -> Vec<(Method, String)> {
        std::mem::take(&mut *self.state.requests.lock().unwrap())
    }

    /// The body of the next blob GET: what the test sends on it is what the fetch receives;
    /// dropping it ends the body.
    async fn next_feed(&mut self) -> mpsc::UnboundedSender<Bytes> {
        self.feeds.recv().await.expect("the upstream stopped")
    }
}

impl UpstreamState {
    fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        self.requests.lock().unwrap().push((method.clone(), path.clone()));
        if self.down.load(Ordering::SeqCst) {
            return respond(StatusCode::SERVICE_UNAVAILABLE, &[], empty());
        }
        if let Some((_, reference)) = path.split_once("/manifests/") {
            let Some((media_type, bytes)) = self.manifests.lock().unwrap().get(reference).cloned() else {
                return respond(StatusCode::NOT_FOUND, &[], empty());
            };
            let headers = [
                ("content-type", media_type),
                ("docker-content-digest", Digest::of(&bytes).to_string()),
                ("content-length", bytes.len().to_string()),
            ];
            let body = if method == Method::HEAD { empty() } else { Full::new(bytes).boxed_unsync() };
            return respond(StatusCode::OK, &headers, body);
        }
        if let Some((_, digest)) = path.split_once("/blobs/") {
            let Some(len) = self.blobs.lock().unwrap().get(digest).copied() else {
                return respond(StatusCode::NOT_FOUND, &[], empty());
            };
            let headers: Vec<_> = len.map(|l| ("content-length", l.to_string())).into_iter().collect();
            if method == Method::HEAD {
                return respond(StatusCode::OK, &headers, empty());
            }
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            if let Some(feeds) = &*self.feeds.lock().unwrap() {
                let _ = feeds.send(tx);
            }
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            return respond(StatusCode::OK, &headers, StreamBody::new(frames).boxed_unsync());
        }
        respond(StatusCode::NOT_FOUND, &[], empty())
    }
}

fn empty() -> Body {
    Empty::new().boxed_unsync()
}

fn respond(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response<Body> {
    let mut resp = Response::builder().status(status);
    for (name, value) in headers {
        resp = resp.header(*name, value);
    }
    resp.body(body).unwrap()
}

/// A cache over a temporary store, with one upstream (the fake) and a manual clock.
struct Harness {
    cache: Arc<Cache>,
    clock: Arc<ManualClock>,
    upstream: FakeUpstream,
    storage: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    route: Route,
    /// What the rings of every fetch hold together.
    ring_budget: Arc<super::RingBudget>,
    dir: tempfile::TempDir,
}

/// Where the manual clock starts: any fixed time works, as long as it is not the real one.
const T0: u64 = 1_000_000;

/// Each fetch's ring in these tests: small, so that a late or slow reader has to read the
/// staging file for most of a blob.
const RING: u64 = 512 * 1024;

const TAG_TTL: u64 = 300;
const SERVE_STALE: u64 = 3600;

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(u64::MAX).await
    }

    /// A harness whose cache fetches blobs of at most `max_blob_size` bytes.
    async fn start_with(max_blob_size: u64) -> Harness {
        Harness::start_tuned(max_blob_size, |_| {}).await
    }

    /// A harness whose `cache:` section `tune` changed from the tests' defaults.
    async fn start_tuned(max_blob_size: u64, tune: impl FnOnce(&mut CacheConfig)) -> Harness {
        let upstream = FakeUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(FsStorage::open(dir.path()).unwrap());
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry = RegistryConfig {
            upstreams: vec![UpstreamConfig { url: upstream.url.clone(), ..Default::default() }],
            ..RegistryConfig::default()
        };
        let pool = Arc::new(Pool::new("docker.io", &registry, metrics.clone()).unwrap());
        let mut config = CacheConfig {
            tag_ttl: Duration::from_secs(TAG_TTL),
            serve_stale: Duration::from_secs(SERVE_STALE),
            ..Default::default()
        };
        tune(&mut config);
        let clock = Arc::new(ManualClock::new(T0));
        let pools = HashMap::from([("docker.io".to_owned(), pool)]);
        let ring_budget = super::RingBudget::new(64 * RING);
        let ring = super::RingBounds { per_fetch: RING, budget: ring_budget.clone() };
        let bounds = super::Bounds { max_size: None, max_blob_size, ring };
        let cache = Cache::new(
            storage.clone(),
            pools,
            config,
            bounds,
            false,
            Services { metrics: metrics.clone(), clock: clock.clone(), cluster: None },
        );
        let route = Route { registry: "docker.io".into(), repo: RepoName::parse("library/app").unwrap() };
        Harness { cache, clock, upstream, storage, metrics, route, ring_budget, dir }
    }

    async fn tag(&self, tag: &str) -> Result<Source, ErrorCode> {
        let reference = Reference::Tag(tag.to_owned());
        self.cache.manifest(&self.route, &reference, &[]).await.map(|(_, source)| source).map_err(|e| e.code)
    }

    /// A blob only the upstream has, its length announced or (`chunked`) not.
    fn cold_blob(&self, len: usize, chunked: bool) -> (Bytes, Digest) {
        let blob = blob_bytes(len);
        let digest = Digest::of(&blob);
        self.upstream.put_blob(&digest, (!chunked).then_some(len as u64));
        (blob, digest)
    }

    async fn get_blob(&self, digest: &Digest) -> ByteStream {
        let answer = self.cache.blob(&self.route, digest, None, false).await.unwrap();
        answer.body.expect("a GET answer has a body")
    }

    /// The progress of the fetch of `digest` in flight (to wait on what it has written, or
    /// for its task to end: the sender goes with the task).
    fn fetch_progress(&self, digest: &Digest) -> watch::Receiver<Progress> {
        let fetches = self.cache.blob_fetches.lock().unwrap();
        fetches.get(digest).expect("a fetch in flight").progress.clone()
    }

    /// The fetch of `digest` now in flight: its progress, and the body of its upstream GET.
    async fn in_flight(&mut self, digest: &Digest) -> (watch::Receiver<Progress>, mpsc::UnboundedSender<Bytes>) {
        let progress = self.fetch_progress(digest);
        (progress, self.upstream.next_feed().await)
    }

    fn blob_requests(&self, result: &str) -> u64 {
        self.metrics.cache_requests.with_label_values(&["blob", result]).get()
    }

    fn staging_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join(layout::STAGING_DIR)).unwrap().count()
    }
}

/// Turns a hang into a failure (never a synchronisation: nothing waits for it to pass).
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f).await.expect("the test hung")
}

/// Deterministic bytes that no small period repeats.
fn blob_bytes(len: usize) -> Bytes {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Sends `bytes` in 64 KiB pieces.
fn feed(tx: &mpsc::UnboundedSender<Bytes>, bytes: Bytes) {
    for chunk in bytes.chunks(64 * 1024) {
        tx.send(bytes.slice_ref(chunk)).unwrap();
    }
}

/// Sends `bytes` on a fetch's body, then waits until the fetch has written `total` bytes.
async fn feed_until_written(
    tx: &mpsc::UnboundedSender<Bytes>,
    progress: &mut watch::Receiver<Progress>,
    bytes: Bytes,
    total: usize,
) {
    feed(tx, bytes);
    progress.wait_for(|p| p.received >= total as u64).await.unwrap();
}

/// Everything a body stream gave, and the error that ended it, if one did.
async fn read_all(mut body: ByteStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

/// Reads each body to its end in a task of its own.
fn spawn_readers(bodies: Vec<ByteStream>) -> Vec<Reader> {
    bodies.into_iter().map(|b| tokio::spawn(read_all(b))).collect()
}

type Reader = tokio::task::JoinHandle<(Vec<u8>, Option<std::io::Error>)>;

/// Asserts that every reader got exactly `blob`, and no error.
async fn assert_got(readers: Vec<Reader>, blob: &Bytes) {
    for r in readers {
        let (got, err) = r.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert!(got == *blob, "a reader got {} bytes that are not the blob", got.len());
    }
}

/// Waits for the fetch task to end (its commit included).
async fn ended(mut progress: watch::Receiver<Progress>) {
    while progress.changed().await.is_ok() {}
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;

fn manifest_path(reference: &str) -> String {
    format!("/v2/library/app/manifests/{reference}")
}

mod blobs;
mod frames;
mod tags;

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
use super::{Cache, ManualClock};
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
        let upstream = FakeUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(FsStorage::open(dir.path()).unwrap());
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry = RegistryConfig {
            upstreams: vec![UpstreamConfig { url: upstream.url.clone(), ..Default::default() }],
            hedge_delay: None,
        };
        let pool = Arc::new(Pool::new("docker.io", &registry, metrics.clone()).unwrap());
        let config = CacheConfig {
            tag_ttl: Duration::from_secs(TAG_TTL),
            serve_stale: Duration::from_secs(SERVE_STALE),
            ..Default::default()
        };
        let clock = Arc::new(ManualClock::new(T0));
        let pools = HashMap::from([("docker.io".to_owned(), pool)]);
        let ring_budget = super::RingBudget::new(64 * RING);
        let ring = super::RingBounds { per_fetch: RING, budget: ring_budget.clone() };
        let bounds = super::Bounds { max_size: None, max_blob_size, ring };
        let cache = Cache::new(storage.clone(), pools, config, bounds, false, metrics.clone(), clock.clone());
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

#[tokio::test]
async fn a_fresh_tag_asks_no_upstream_and_an_expired_one_costs_one_head() {
    within(async {
        let h = Harness::start().await;
        h.upstream.put_manifest("v1", MANIFEST);
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
        assert_eq!(h.upstream.take_requests(), vec![(Method::GET, manifest_path("v1"))]);

        h.clock.advance(Duration::from_secs(TAG_TTL - 1));
        assert_eq!(h.tag("v1").await, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![], "a fresh tag asked the upstream");

        h.clock.advance(Duration::from_secs(2));
        assert_eq!(h.tag("v1").await, Ok(Source::Revalidated));
        assert_eq!(h.upstream.take_requests(), vec![(Method::HEAD, manifest_path("v1"))]);

        // The revalidation starts a new TTL.
        h.clock.advance(Duration::from_secs(TAG_TTL - 1));
        assert_eq!(h.tag("v1").await, Ok(Source::Cache));
        assert_eq!(h.upstream.take_requests(), vec![]);
    })
    .await
}

#[tokio::test]
async fn with_the_upstream_down_a_tag_is_served_stale_until_serve_stale_has_passed() {
    within(async {
        let h = Harness::start().await;
        h.upstream.put_manifest("v1", MANIFEST);
        assert_eq!(h.tag("v1").await, Ok(Source::Upstream(h.upstream.name.clone())));
        h.upstream.set_down(true);

        h.clock.set(T0 + TAG_TTL + 1);
        assert_eq!(h.tag("v1").await, Ok(Source::Stale));
        h.clock.set(T0 + SERVE_STALE);
        assert_eq!(h.tag("v1").await, Ok(Source::Stale), "at serve_stale exactly it is still served");
        h.clock.set(T0 + SERVE_STALE + 1);
        assert_eq!(h.tag("v1").await, Err(ErrorCode::Unavailable));
        assert_eq!(h.metrics.cache_requests.with_label_values(&["manifest", "stale"]).get(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_readers_of_a_cold_blob_share_one_upstream_get() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob((3 << 20) + 12_345, false);

        let bodies = futures_util::future::join_all((0..16).map(|_| h.get_blob(&digest))).await;
        // Every reader is in before a byte moves: each fetch would have sent its GET by now.
        let gets = h.upstream.take_requests();
        assert_eq!(gets, vec![(Method::GET, format!("/v2/library/app/blobs/{digest}"))]);
        assert_eq!((h.blob_requests("miss"), h.blob_requests("coalesced")), (1, 15));

        let readers = spawn_readers(bodies);
        feed(&h.upstream.next_feed().await, blob.clone());
        assert_got(readers, &blob).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_leaves_mid_way_does_not_cancel_the_fetch_for_the_others() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(2 << 20, false);

        // The first reader started the fetch; it reads a little and goes.
        let mut first = h.get_blob(&digest).await;
        let second = h.get_blob(&digest).await;
        let (progress, tx) = h.in_flight(&digest).await;
        feed(&tx, blob.slice(..blob.len() / 2));
        let chunk = first.next().await.unwrap().unwrap();
        assert!(!chunk.is_empty() && chunk == blob.slice(..chunk.len()));
        drop(first);

        feed(&tx, blob.slice(blob.len() / 2..));
        drop(tx);
        assert_got(spawn_readers(vec![second]), &blob).await;
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), Some(blob.len() as u64), "the blob was cached");
        assert_eq!(h.upstream.take_requests().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fetch_fails_every_reader_and_commits_nothing() {
    within(async {
        let mut h = Harness::start().await;
        // Chunked: the fetch cannot reach its verdict before the test ends the body.
        let (blob, digest) = h.cold_blob(1 << 20, true);
        let len = blob.len();
        let mut corrupt = blob.to_vec();
        corrupt[700_000] ^= 0xff;

        let mut watched = h.get_blob(&digest).await;
        let others = spawn_readers(futures_util::future::join_all((0..3).map(|_| h.get_blob(&digest))).await);
        let (mut progress, tx) = h.in_flight(&digest).await;
        feed_until_written(&tx, &mut progress, corrupt.into(), len).await;

        // Every byte is on disk and the verdict is not in: a reader gets all but the last, so
        // no response can complete with a corrupt blob. (Reads go up to what they may send,
        // so one that crossed the held-back byte would have it.)
        let mut got = 0;
        while got < len - 1 {
            got += watched.next().await.unwrap().unwrap().len();
        }
        assert_eq!(got, len - 1, "a reader got the last byte before the verdict");
        drop(tx);
        assert!(watched.next().await.unwrap().is_err(), "the watched reader's stream did not fail");
        for r in others {
            let (got, err) = r.await.unwrap();
            assert!(err.is_some(), "a reader's stream ended cleanly");
            assert!(got.len() < len, "a reader got the whole corrupt blob");
        }
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), None, "the corrupt blob was committed");
        assert_eq!(h.staging_files(), 0, "the staging file was left behind");
        assert_eq!(h.metrics.digest_mismatches.get(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_joins_at_ninety_percent_still_gets_every_byte() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(4 << 20, false);

        let first = spawn_readers(vec![h.get_blob(&digest).await]);
        let (mut progress, tx) = h.in_flight(&digest).await;
        let ninety = blob.len() * 9 / 10;
        feed_until_written(&tx, &mut progress, blob.slice(..ninety), ninety).await;

        let late = h.get_blob(&digest).await;
        assert_eq!(h.blob_requests("coalesced"), 1, "the late reader started a fetch of its own");
        assert_eq!(h.upstream.take_requests().len(), 1);
        let late = spawn_readers(vec![late]);
        feed(&tx, blob.slice(ninety..));
        drop(tx);
        assert_got(first.into_iter().chain(late).collect(), &blob).await;
    })
    .await
}

#[tokio::test]
async fn failovers_count_failed_requests_but_not_rejected_answers() {
    within(async {
        let h = Harness::start().await;
        let failovers = |reason: &str| {
            let labels = ["docker.io", h.upstream.name.as_str(), reason];
            h.metrics.upstream_failovers.with_label_values(&labels).get()
        };
        // A request that fails (503) is a failover.
        h.upstream.set_down(true);
        assert_eq!(h.tag("v1").await, Err(ErrorCode::Unavailable));
        assert_eq!(failovers("5xx"), 1);

        // An answer whose bytes do not match the digest asked for is rejected: the upstream's
        // health hears of it (its circuit opens at once), the failover count does not.
        h.upstream.set_down(false);
        let digest = Digest::of(b"what was asked for");
        h.upstream.put_manifest(&digest.to_string(), MANIFEST);
        let reference = Reference::Digest(digest);
        let err = h.cache.manifest(&h.route, &reference, &[]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(err.message.contains("circuit open"), "{}", err.message);
        assert_eq!((failovers("digest_mismatch"), h.metrics.digest_mismatches.get()), (0, 1));
        assert_eq!(h.upstream.take_requests().len(), 2, "the open circuit was dialled");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_it_may_be_is_cut_off_and_never_cached() {
    within(async {
        const LIMIT: u64 = 256 * 1024;
        let mut h = Harness::start_with(LIMIT).await;
        // Announced too long: refused before a byte is read.
        let (_, announced) = h.cold_blob(1 << 20, false);
        let refused = h.cache.blob(&h.route, &announced, None, false).await.err().expect("a refusal");
        assert!(refused.message.contains("may have"), "{}", refused.message);

        // An endless chunked body: cut off at the limit, however much the upstream sends.
        let (_, endless) = h.cold_blob(1 << 20, true);
        let reader = spawn_readers(vec![h.get_blob(&endless).await]);
        let (mut progress, tx) = h.in_flight(&endless).await;
        let endless_body = blob_bytes(2 << 20);
        for chunk in endless_body.chunks(64 * 1024) {
            // The fetch hangs up on it at the limit.
            if tx.send(endless_body.slice_ref(chunk)).is_err() {
                break;
            }
        }
        // Later attempts (resumes) end at once: the upstream closes them empty.
        let mut feeds = std::mem::replace(&mut h.upstream.feeds, mpsc::unbounded_channel().1);
        let drain = tokio::spawn(async move {
            while let Some(f) = feeds.recv().await {
                drop(f)
            }
        });
        let mut most = 0;
        while progress.changed().await.is_ok() {
            most = most.max(progress.borrow().received);
        }
        assert!(most <= LIMIT, "{most} bytes kept of a blob that may have {LIMIT}");
        let (got, err) = reader.into_iter().next().unwrap().await.unwrap();
        assert!(err.is_some() && got.len() as u64 <= LIMIT, "the reader got {} bytes and no error", got.len());
        assert_eq!(h.storage.blob_size(&endless).await.unwrap(), None, "the cut-off blob was committed");
        assert_eq!(h.staging_files(), 0, "the staging file was left behind");
        drop(tx);
        drain.abort();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_keep_up_are_sent_the_frames_the_fetch_received() {
    within(async {
        let mut h = Harness::start().await;
        let (blob, digest) = h.cold_blob(4 << 20, false);
        let mut bodies = vec![h.get_blob(&digest).await, h.get_blob(&digest).await];
        let (mut progress, tx) = h.in_flight(&digest).await;
        feed_until_written(&tx, &mut progress, blob.slice(..128 * 1024), 128 * 1024).await;

        // Both readers' first chunk is the same memory: the frame the upstream filled, not a
        // copy of it and not a read of the staging file.
        let a = bodies[0].next().await.unwrap().unwrap();
        let b = bodies[1].next().await.unwrap().unwrap();
        assert!(!a.is_empty() && a == blob.slice(..a.len()));
        assert_eq!(a.as_ptr(), b.as_ptr(), "the readers were sent copies");
        assert!(h.ring_budget.held() > 0);

        feed(&tx, blob.slice(128 * 1024..));
        drop(tx);
        let rest = spawn_readers(bodies);
        for r in rest {
            let (got, err) = r.await.unwrap();
            assert!(err.is_none(), "{err:?}");
            assert!([&a[..], &got[..]].concat() == blob, "a reader did not get the blob");
        }
        ended(progress).await;
        assert_eq!(h.ring_budget.held(), 0, "an ended fetch still holds ring memory");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_holds_up_neither_the_fetch_nor_the_others() {
    within(async {
        let mut h = Harness::start().await;
        // Eight rings' worth: the ring cannot keep it all for the reader that does not read.
        let (blob, digest) = h.cold_blob(8 * RING as usize, false);
        let stalled = h.get_blob(&digest).await;
        let reading = spawn_readers(vec![h.get_blob(&digest).await]);
        let (progress, tx) = h.in_flight(&digest).await;
        feed(&tx, blob.clone());
        drop(tx);
        assert_got(reading, &blob).await;
        ended(progress).await;
        assert_eq!(h.storage.blob_size(&digest).await.unwrap(), Some(blob.len() as u64), "the blob was not cached");
        assert_eq!(h.ring_budget.held(), 0);

        // The stalled reader still gets every byte, from the file the fetch left behind.
        assert_got(spawn_readers(vec![stalled]), &blob).await;
    })
    .await
}

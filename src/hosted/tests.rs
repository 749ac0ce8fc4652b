//! In-process tests of hosted namespaces through [`Hosted::handle`], over a temp-dir store
//! wrapped in [`Racing`], which runs one piece of work at an exact point of another (a `gc`
//! between an upload's look at the store and its link, a push between `gc`'s read of a mark
//! and its sweep) so that races are reproduced deterministically, without sleeps.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{HeaderMap, CONTENT_TYPE};
use http::Method;

use super::{gc, Hosted, HostedRequest};
use crate::auth::{Auth, Identity};
use crate::distribution::{Answer, Digest, Endpoint, ErrorCode, ProtocolError, OCI_MANIFEST};
use crate::storage::{layout, marks, BlobInfo, ByteStream, FsStorage, Staged, Storage};

/// `internal` is open to every user; `private` to alice alone.
const CONFIG: &str = "hosted:
  namespaces: [internal, private]
  htpasswd: /x
  delete: true
  rules:
    - {namespace: internal, users: ['*'], access: delete}
    - {namespace: private, users: [alice], access: delete}
";

/// `gc`'s default grace period (`ferry gc --grace`).
const GRACE: Duration = Duration::from_secs(3600);

/// Where a [`Racing`] store runs its hook: right after this read returns.
#[derive(PartialEq)]
enum Point {
    GetObject(String),
    BlobSize(Digest),
}

/// A store that runs a hook once, right after the read named by its [`Point`] returns (and
/// before the caller sees the answer): the caller then acts on what it read while the hook
/// has changed the store under it.
struct Racing {
    inner: Arc<dyn Storage>,
    hook: Mutex<Option<(Point, BoxFuture<'static, ()>)>>,
}

impl Racing {
    fn arm(&self, point: Point, hook: impl Future<Output = ()> + Send + 'static) {
        *self.hook.lock().unwrap() = Some((point, Box::pin(hook)));
    }

    /// The hook, taken (it runs once) if `at` is its point.
    fn take(&self, at: Point) -> Option<BoxFuture<'static, ()>> {
        let mut hook = self.hook.lock().unwrap();
        if hook.as_ref().is_some_and(|(p, _)| *p == at) {
            return hook.take().map(|(_, f)| f);
        }
        None
    }

    fn fired(&self) -> bool {
        self.hook.lock().unwrap().is_none()
    }
}

/// Awaits `read`, then the hook (if any), then answers what `read` returned.
fn after<'a, T: Send + 'a>(read: BoxFuture<'a, T>, hook: Option<BoxFuture<'static, ()>>) -> BoxFuture<'a, T> {
    Box::pin(async move {
        let answer = read.await;
        if let Some(hook) = hook {
            hook.await;
        }
        answer
    })
}

impl Storage for Racing {
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, std::io::Result<Option<u64>>> {
        after(self.inner.blob_size(digest), self.take(Point::BlobSize(digest.clone())))
    }
    fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> BoxFuture<'_, std::io::Result<Option<ByteStream>>> {
        self.inner.read_blob(digest, start, end)
    }
    fn stage(&self) -> BoxFuture<'_, std::io::Result<Staged>> {
        self.inner.stage()
    }
    fn commit(&self, staged: Arc<Staged>, digest: &Digest) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.commit(staged, digest)
    }
    fn get_object(&self, key: &str) -> BoxFuture<'_, std::io::Result<Option<Vec<u8>>>> {
        after(self.inner.get_object(key), self.take(Point::GetObject(key.to_owned())))
    }
    fn put_object(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.put_object(key, bytes)
    }
    fn put_staged(&self, key: &str, staged: Arc<Staged>) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.put_staged(key, staged)
    }
    fn read_object(&self, key: &str) -> BoxFuture<'_, std::io::Result<Option<ByteStream>>> {
        self.inner.read_object(key)
    }
    fn list_blobs(&self) -> BoxFuture<'_, std::io::Result<Vec<BlobInfo>>> {
        self.inner.list_blobs()
    }
    fn quarantine_blob(&self, digest: &Digest) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.quarantine_blob(digest)
    }
    fn list_objects(&self, prefix: &str) -> BoxFuture<'_, std::io::Result<Vec<String>>> {
        self.inner.list_objects(prefix)
    }
    fn delete_object(&self, key: &str) -> BoxFuture<'_, std::io::Result<bool>> {
        self.inner.delete_object(key)
    }
    fn delete_blob(&self, digest: &Digest) -> BoxFuture<'_, std::io::Result<bool>> {
        self.inner.delete_blob(digest)
    }
    fn probe(&self) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.probe()
    }
}

/// A hosted registry over a fresh temp-dir store.
struct Fixture {
    hosted: Arc<Hosted>,
    /// The store as `hosted` sees it.
    racing: Arc<Racing>,
    /// The store underneath (for `gc` run from a hook, and for inspection).
    inner: Arc<dyn Storage>,
    dir: tempfile::TempDir,
}

type Reply = Result<Answer, ProtocolError>;

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Storage> = Arc::new(FsStorage::open(dir.path()).unwrap());
        let racing = Arc::new(Racing { inner: inner.clone(), hook: Mutex::new(None) });
        let config = crate::config::Config::from_yaml(CONFIG).unwrap().hosted;
        let auth = Arc::new(Auth::new("", &config).unwrap());
        let hosted = Hosted::new(racing.clone(), auth, config, super::DEFAULT_MAX_UPLOAD_SESSIONS_PER_USER);
        Fixture { hosted, racing, inner, dir }
    }

    /// A monolithic upload of `bytes` into `repo`; its digest.
    async fn upload(&self, who: &str, repo: &str, bytes: &[u8]) -> Digest {
        upload(&self.hosted, who, repo, bytes).await
    }

    /// Opens an upload session in `repo`.
    async fn open_session(&self, who: &str, repo: &str) -> Reply {
        req(who, Method::POST, repo, Endpoint::Uploads("")).send(&self.hosted).await
    }

    /// Pushes an image manifest of `config` and `layers` (digest, size) as `repo:tag`.
    async fn put_manifest(
        &self,
        who: &str,
        repo: &str,
        tag: &str,
        config: (&Digest, usize),
        layers: &[(&Digest, usize)],
    ) -> Reply {
        let desc = |(d, size): (&Digest, usize), t: &str| serde_json::json!({"mediaType": t, "digest": d.to_string(), "size": size});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(config, "application/vnd.oci.image.config.v1+json"),
            "layers": layers.iter().map(|l| desc(*l, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
        });
        let body = manifest.to_string().into_bytes();
        let mut r = req(who, Method::PUT, repo, Endpoint::Manifest(tag)).body(&body);
        r.headers.insert(CONTENT_TYPE, OCI_MANIFEST.parse().unwrap());
        r.send(&self.hosted).await
    }

    /// Makes the mark of `digest` look pushed long ago (as if days had passed).
    async fn age_mark(&self, digest: &Digest) {
        let raw = self.inner.get_object(&layout::mark(digest)).await.unwrap().expect("marked");
        let mark = marks::Mark { since: 1, ..marks::decode(&raw).unwrap() };
        self.inner.put_object(&layout::mark(digest), serde_json::to_vec(&mark).unwrap()).await.unwrap();
    }

    async fn stored(&self, digest: &Digest) -> bool {
        self.inner.blob_size(digest).await.unwrap().is_some()
    }

    /// How many upload sessions are open.
    fn sessions(&self) -> usize {
        self.hosted.sessions.lock().unwrap().len()
    }
}

/// One request by user `who`, built up and then sent.
struct Req<'a> {
    who: &'a str,
    method: Method,
    name: &'a str,
    endpoint: Endpoint<'a>,
    query: Option<&'a str>,
    headers: HeaderMap,
    body: &'a [u8],
}

fn req<'a>(who: &'a str, method: Method, name: &'a str, endpoint: Endpoint<'a>) -> Req<'a> {
    Req { who, method, name, endpoint, query: None, headers: HeaderMap::new(), body: b"" }
}

impl<'a> Req<'a> {
    fn query(self, query: &'a str) -> Req<'a> {
        Req { query: Some(query), ..self }
    }

    fn body(self, body: &'a [u8]) -> Req<'a> {
        Req { body, ..self }
    }

    async fn send(self, hosted: &Hosted) -> Reply {
        let who = Identity::User(self.who.to_owned());
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::copy_from_slice(self.body))]));
        let (method, headers) = (self.method, self.headers);
        let (name, endpoint, query) = (self.name, self.endpoint, self.query);
        hosted
            .handle(HostedRequest { method: &method, name, endpoint, query, headers: &headers, who: &who, body })
            .await
    }
}

async fn upload(hosted: &Hosted, who: &str, repo: &str, bytes: &[u8]) -> Digest {
    let digest = Digest::of(bytes);
    let query = format!("digest={digest}");
    let r = req(who, Method::POST, repo, Endpoint::Uploads("")).query(&query).body(bytes).send(hosted).await;
    assert_eq!(outcome(&r), "201", "upload of {digest} to {repo}");
    digest
}

/// A reply in a line: the status, or the error's code and message.
fn outcome(r: &Reply) -> String {
    match r {
        Ok(Answer::Created { .. }) => "201".into(),
        Ok(Answer::Upload { status, .. }) => status.as_u16().to_string(),
        Ok(Answer::Status(s)) => s.as_u16().to_string(),
        Ok(Answer::Manifest { .. } | Answer::Blob { .. } | Answer::Json { .. }) => "200".into(),
        Err(e) => format!("{:?}: {}", e.code, e.message),
    }
}

fn upload_id(r: &Reply) -> String {
    match r {
        Ok(Answer::Upload { id, .. }) => id.clone(),
        other => panic!("no upload session: {}", outcome(other)),
    }
}

// ----- defect 7: upload sessions per user, and no descriptor held while idle -----

#[tokio::test]
async fn one_user_cannot_take_every_upload_session() {
    let f = Fixture::new();
    for i in 0..64 {
        assert_eq!(outcome(&f.open_session("u", "internal/app").await), "202", "session {i}");
    }
    let refused = f.open_session("u", "internal/app").await.err().expect("the 65th session is refused");
    assert_eq!(refused.code, ErrorCode::TooManyRequests);
    assert!(refused.message.contains("64"), "the message names the limit: {}", refused.message);
    assert_eq!(outcome(&f.open_session("v", "internal/app").await), "202", "another user still can");
    assert_eq!(f.sessions(), 65, "the refused session left nothing behind");
    assert_eq!(std::fs::read_dir(f.dir.path().join("tmp")).unwrap().count(), 65);
}

/// Open descriptors of this process (other tests run beside this one: compare loosely).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn an_idle_upload_session_holds_no_file_descriptor() {
    let f = Fixture::new();
    let before = open_fds();
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(upload_id(&f.open_session("u", "internal/app").await));
    }
    let grown = open_fds().saturating_sub(before);
    assert!(grown < 25, "50 idle sessions hold {grown} more descriptors");
    // And a parked session still works: chunks, then the closing PUT.
    let (a, b) = (b"first half,".as_slice(), b" second half".as_slice());
    let path = ids[7].as_str();
    let r = req("u", Method::PATCH, "internal/app", Endpoint::Uploads(path)).body(a).send(&f.hosted).await;
    assert_eq!(outcome(&r), "202");
    let digest = Digest::of(&[a, b].concat());
    let query = format!("digest={digest}");
    let r = req("u", Method::PUT, "internal/app", Endpoint::Uploads(path)).query(&query).body(b).send(&f.hosted).await;
    assert_eq!(outcome(&r), "201");
    assert!(f.stored(&digest).await);
}

// ----- defect 4: a session whose staging write failed is forgotten at once -----

#[tokio::test]
async fn a_session_whose_staging_file_fails_is_forgotten_at_once() {
    let f = Fixture::new();
    let id = upload_id(&f.open_session("u", "internal/app").await);
    let patch = || req("u", Method::PATCH, "internal/app", Endpoint::Uploads(&id)).body(b"chunk").send(&f.hosted);
    assert_eq!(outcome(&patch().await), "202");
    // The staging file is lost (a disk replaced, an operator cleaning tmp/).
    for entry in std::fs::read_dir(f.dir.path().join("tmp")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let r = patch().await;
    assert!(r.is_err(), "a write into a lost staging file cannot succeed: {}", outcome(&r));
    assert_eq!(f.sessions(), 0, "the broken session is forgotten at once, not at the idle purge");
    let r = req("u", Method::GET, "internal/app", Endpoint::Uploads(&id)).send(&f.hosted).await;
    assert_eq!(r.err().map(|e| e.code), Some(ErrorCode::BlobUploadUnknown));
}

// ----- defect 12: gc against pushes that reuse old content -----

#[tokio::test]
async fn gc_keeps_a_blob_re_uploaded_while_it_sweeps() {
    let f = Fixture::new();
    let layer = b"layer pushed long ago, unlinked, pushed again".as_slice();
    let x = f.upload("u", "internal/a", layer).await;
    let r = req("u", Method::DELETE, "internal/a", Endpoint::Blob(&x.to_string())).send(&f.hosted).await;
    assert_eq!(outcome(&r), "202");
    f.age_mark(&x).await;
    // Right after gc reads the old mark, the same bytes are uploaded to another repository.
    let hosted = f.hosted.clone();
    let bytes = layer.to_vec();
    f.racing.arm(Point::GetObject(layout::mark(&x)), async move {
        upload(&hosted, "u", "internal/b", &bytes).await;
    });
    let report = gc(&*f.racing, GRACE, false).await.unwrap();
    assert!(f.racing.fired());
    assert!(report.removed_blobs.is_empty(), "{:?}", report.removed_blobs);
    assert!(f.stored(&x).await, "gc removed a blob uploaded while it ran");
    let config = f.upload("u", "internal/b", b"{}").await;
    let r = f.put_manifest("u", "internal/b", "v1", (&config, 2), &[(&x, layer.len())]).await;
    assert_eq!(outcome(&r), "201");
}

#[tokio::test]
async fn an_upload_claims_its_digest_before_it_looks_for_the_blob() {
    let f = Fixture::new();
    let layer = b"layer whose upload races gc".as_slice();
    let x = f.upload("u", "internal/a", layer).await;
    let r = req("u", Method::DELETE, "internal/a", Endpoint::Blob(&x.to_string())).send(&f.hosted).await;
    assert_eq!(outcome(&r), "202");
    f.age_mark(&x).await;
    // gc runs right after the upload finds the blob already stored.
    let inner = f.inner.clone();
    f.racing.arm(Point::BlobSize(x.clone()), async move {
        gc(&*inner, GRACE, false).await.unwrap();
    });
    f.upload("u", "internal/b", layer).await;
    assert!(f.racing.fired());
    assert!(f.stored(&x).await, "gc removed the blob an upload had just found");
    let config = f.upload("u", "internal/b", b"{}").await;
    let r = f.put_manifest("u", "internal/b", "v1", (&config, 2), &[(&x, layer.len())]).await;
    assert_eq!(outcome(&r), "201");
}

#[tokio::test]
async fn gc_keeps_a_blob_a_manifest_push_is_about_to_reference() {
    let f = Fixture::new();
    let layer = b"layer uploaded long ago, never referenced until now".as_slice();
    let x = f.upload("u", "internal/b", layer).await;
    f.age_mark(&x).await;
    let config = f.upload("u", "internal/b", b"{}").await;
    // gc runs right after the manifest push finds the layer linked and stored.
    let inner = f.inner.clone();
    f.racing.arm(Point::BlobSize(x.clone()), async move {
        gc(&*inner, GRACE, false).await.unwrap();
    });
    let r = f.put_manifest("u", "internal/b", "v1", (&config, 2), &[(&x, layer.len())]).await;
    assert!(f.racing.fired());
    assert_eq!(outcome(&r), "201");
    assert!(f.stored(&x).await, "gc removed a layer of a manifest being pushed");
}

#[tokio::test]
async fn gc_stops_when_a_linked_manifest_record_is_missing() {
    let f = Fixture::new();
    let layer = b"a layer of a manifest whose record is lost".as_slice();
    let x = f.upload("u", "internal/a", layer).await;
    let config = f.upload("u", "internal/a", b"{}").await;
    let r = f.put_manifest("u", "internal/a", "v1", (&config, 2), &[(&x, layer.len())]).await;
    let Ok(Answer::Created { digest: manifest, .. }) = r else { panic!("{}", outcome(&r)) };
    f.inner.delete_object(&layout::manifest_record(&manifest)).await.unwrap();
    let err = gc(&*f.inner, Duration::ZERO, false).await.expect_err("gc must not sweep blind");
    assert!(err.to_string().contains(&manifest.to_string()), "the error names the manifest: {err}");
    assert!(f.stored(&x).await && f.stored(&config).await, "nothing was deleted");
    // A record that no longer matches its digest is as bad as a missing one.
    let record = format!("{OCI_MANIFEST}\n{{}}").into_bytes();
    f.inner.put_object(&layout::manifest_record(&manifest), record).await.unwrap();
    assert!(gc(&*f.inner, Duration::ZERO, false).await.is_err());
    assert!(f.stored(&x).await && f.stored(&config).await, "nothing was deleted");
}

// ----- defect 14: spec corners -----

#[tokio::test]
async fn reading_a_reference_that_cannot_be_a_tag_is_manifest_unknown() {
    let f = Fixture::new();
    for method in [Method::GET, Method::HEAD] {
        for reference in ["-leading-dash", "a+b", &"t".repeat(129)] {
            let r = req("u", method.clone(), "internal/a", Endpoint::Manifest(reference)).send(&f.hosted).await;
            assert_eq!(r.err().map(|e| e.code), Some(ErrorCode::ManifestUnknown), "{method} {reference}");
        }
    }
    let r = req("u", Method::PUT, "internal/a", Endpoint::Manifest("a+b")).body(b"{}").send(&f.hosted).await;
    assert_eq!(r.err().map(|e| e.code), Some(ErrorCode::ManifestInvalid), "a PUT still gets 400");
}

#[tokio::test]
async fn a_mount_without_from_finds_the_blob_only_where_the_user_may_pull() {
    let f = Fixture::new();
    let public = f.upload("alice", "internal/base", b"a layer everyone may pull").await;
    let secret = f.upload("alice", "private/app", b"a layer only alice may pull").await;
    let f = &f;
    let mount = |who: &'static str, d: &Digest| {
        let query = format!("mount={d}");
        async move {
            outcome(&req(who, Method::POST, "internal/new", Endpoint::Uploads("")).query(&query).send(&f.hosted).await)
        }
    };
    assert_eq!(mount("bob", &secret).await, "202", "bob may not pull private/app: an upload session, nothing revealed");
    assert_eq!(mount("bob", &public).await, "201");
    assert_eq!(mount("alice", &secret).await, "201");
    let r = req("bob", Method::HEAD, "internal/new", Endpoint::Blob(&public.to_string())).send(&f.hosted).await;
    assert_eq!(outcome(&r), "200", "the mounted blob is linked");
    let unknown = Digest::of(b"stored nowhere");
    assert_eq!(mount("alice", &unknown).await, "202");
}

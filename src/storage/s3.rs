//! The S3-compatible backend: blobs and metadata objects in a bucket, under the same keys as
//! [`super::layout`] gives the filesystem (below `storage.s3.prefix`), so several replicas can
//! share one store and a lost machine loses nothing.
//!
//! Built on `object_store` (the Apache Arrow project's client, used by Delta Lake, DataFusion
//! and InfluxDB): SigV4 signing, multipart uploads, ranged GETs, paginated listings and
//! presigned URLs over the reqwest 0.13 + rustls stack Ferry already has, at a fraction of
//! `aws-sdk-s3`'s build cost on two cores.
//!
//! Staging stays local (`storage.root/tmp`): fetches and uploads write there and readers tail
//! the file while it grows, as on disk. A fetch's staging file is followed by a multipart upload
//! under the blob's final key ([`super::multipart`]): full parts go up as they become durable,
//! and [`Storage::commit`], called after the digest verdict, uploads the tail and completes it.
//! S3 makes a multipart upload visible only when it completes, so a crash leaves no object
//! under a blob key, only an incomplete upload that the bucket's `AbortIncompleteMultipartUpload`
//! lifecycle rule removes (README). Hosted uploads (whose digest is known only at the end) and
//! blobs of one part are uploaded after the verdict, from the verified file.
//!
//! With `storage.hot_tier`, committed blobs are also kept on local disk ([`super::hot`]) and
//! hits are served from there when present.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    ClientConfigKey, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use super::abandoned;
use super::hot::HotTier;
use super::multipart::{Alongside, Uploaded, Uploads};
use super::{layout, BlobInfo, ByteStream, FsStorage, Staged, Storage};
use crate::config::S3Config;
use crate::distribution::Digest;

/// A bucket (under a prefix) as Ferry's store, with local staging and an optional hot tier.
pub struct S3Storage {
    store: Arc<AmazonS3>,
    prefix: String,
    /// Staging files (and, with a hot tier, its blobs) on local disk.
    local: Arc<FsStorage>,
    hot: Option<Arc<HotTier>>,
    redirect: Option<Duration>,
    uploads: Uploads,
    /// For the few requests `object_store` has no call for (see [`super::abandoned`]).
    admin_http: reqwest::Client,
}

impl S3Storage {
    /// Connects to the bucket `config` names (no request is made: the readiness probe and the
    /// start-up inventory are the first). `local` holds staging files and the hot tier.
    pub fn open(config: &S3Config, local: FsStorage, hot_tier: Option<u64>) -> io::Result<S3Storage> {
        let local = Arc::new(local);
        // The standard AWS_* environment first (credentials, session token); the config wins.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        if let (Some(id), Some(path)) = (&config.access_key_id, &config.secret_access_key_file) {
            let secret = std::fs::read_to_string(path)
                .map_err(|e| io::Error::new(e.kind(), format!("storage.s3.secret_access_key_file: {e}")))?;
            builder = builder.with_access_key_id(id).with_secret_access_key(secret.trim());
        }
        let http = config.endpoint.as_deref().is_some_and(|e| e.starts_with("http:"));
        // No overall deadline: a hit streams a large blob to a slow client for as long as it
        // keeps reading. A bucket that stops sending for `read_timeout` is cut off instead.
        let client = ClientOptions::new()
            .with_allow_http(http)
            .with_timeout_disabled()
            .with_connect_timeout(config.connect_timeout)
            .with_config(ClientConfigKey::ReadTimeout, humantime::format_duration(config.read_timeout).to_string());
        let retry = RetryConfig {
            max_retries: config.max_retries,
            retry_timeout: config.retry_timeout,
            ..RetryConfig::default()
        };
        let store = builder.with_client_options(client).with_retry(retry).build().map_err(io::Error::other)?;
        let hot = hot_tier.map(|max| Arc::new(HotTier::new(local.clone(), max)));
        let store = Arc::new(store);
        let uploads = Uploads {
            store: store.clone(),
            part_size: config.upload_part_size.as_u64() as usize,
            parts: Arc::new(tokio::sync::Semaphore::new(config.upload_concurrency)),
        };
        let admin_http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .build()
            .map_err(io::Error::other)?;
        Ok(S3Storage {
            admin_http,
            store,
            prefix: config.prefix.clone(),
            local,
            hot,
            redirect: config.redirect.then_some(config.redirect_expiry),
            uploads,
        })
    }

    /// Loads the hot tier's inventory from local disk (start-up, serving process only).
    pub fn load_hot_tier(&self) -> io::Result<()> {
        match &self.hot {
            Some(hot) => hot.load(),
            None => Ok(()),
        }
    }

    /// Removes staging leftovers of a previous run (see [`FsStorage::remove_staging_leftovers`]).
    pub fn remove_staging_leftovers(&self) -> io::Result<usize> {
        self.local.remove_staging_leftovers()
    }

    fn key(&self, relative: &str) -> io::Result<Path> {
        Path::parse(format!("{}{relative}", self.prefix)).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn blob_key(&self, digest: &Digest) -> io::Result<Path> {
        self.key(&layout::blob_path(digest))
    }

    fn object_key(&self, key: &str) -> io::Result<Path> {
        layout::check_object_key(key)?;
        self.key(&format!("{}/{key}", layout::OBJECTS_DIR))
    }

    /// Puts a verified staging file of `len` bytes under `to`, with the upload that followed it
    /// during its fetch if there was one (see [`super::multipart`]), else afresh: one PUT if
    /// it fits in a part, else a multipart upload of the file.
    async fn upload(&self, staged: &Arc<Staged>, to: &Path) -> io::Result<()> {
        let file = staged.clone();
        let len = blocking(move || Ok(file.file.metadata()?.len())).await?;
        let followed = match staged.follower.clone().and_then(|f| f.into_any().downcast::<Alongside>().ok()) {
            Some(alongside) => match alongside.finish(len).await {
                Ok(uploaded) => Some(uploaded),
                Err(e) => {
                    // It gave up (and aborted its upload): once more, from the file.
                    tracing::warn!(error = %e, key = %to, "upload alongside the fetch failed; uploading the blob again");
                    None
                }
            },
            None => None,
        };
        let uploaded = match followed {
            Some(uploaded) => uploaded,
            None => Alongside::start(self.uploads.clone(), to.clone(), staged.file.try_clone()?).finish(len).await?,
        };
        match uploaded {
            Uploaded::Parts(mut upload) => upload.complete().await.map(drop).map_err(to_io),
            Uploaded::Nothing => {
                let _permit = self.uploads.parts.acquire().await.map_err(io::Error::other)?;
                let bytes = read_part(staged, 0, len as usize).await?;
                self.store.put(to, PutPayload::from_bytes(bytes)).await.map(drop).map_err(to_io)
            }
        }
    }

    async fn exists(&self, key: &Path) -> io::Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Every key under `relative` (a directory of the layout), as a stream over S3's pages.
    fn list(
        &self,
        relative: &str,
    ) -> io::Result<impl futures_util::Stream<Item = io::Result<object_store::ObjectMeta>>> {
        let prefix = self.key(relative.trim_end_matches('/'))?;
        Ok(self.store.list(Some(&prefix)).map_err(to_io))
    }
}

/// An `object_store` error as an `io::Error` (NotFound kept as such).
pub(super) fn to_io(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

fn not_found_is_none<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

async fn read_part(staged: &Arc<Staged>, offset: u64, len: usize) -> io::Result<Bytes> {
    let staged = staged.clone();
    let bytes = blocking(move || staged.read_at(offset, len)).await?;
    if bytes.len() != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "staging file shorter than it was"));
    }
    Ok(bytes)
}

impl Storage for S3Storage {
    fn blob_size(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<u64>>> {
        let digest = digest.clone();
        Box::pin(async move {
            if let Some(size) = self.hot.as_ref().and_then(|h| h.size(&digest)) {
                return Ok(Some(size));
            }
            Ok(not_found_is_none(self.store.head(&self.blob_key(&digest)?).await)?.map(|m| m.size))
        })
    }

    fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        let digest = digest.clone();
        Box::pin(async move {
            if let Some(hot) = &self.hot {
                if let Some(stream) = hot.read(&digest, start, end).await? {
                    return Ok(Some(stream));
                }
            }
            let key = self.blob_key(&digest)?;
            if start >= end {
                // S3 has no empty range; say whether the blob exists, with no bytes.
                return Ok(self.exists(&key).await?.then(|| stream::empty().boxed()));
            }
            let options = GetOptions { range: Some(GetRange::Bounded(start..end)), ..GetOptions::default() };
            let Some(got) = not_found_is_none(self.store.get_opts(&key, options).await)? else { return Ok(None) };
            if got.range != (start..end) {
                return Err(io::Error::other(format!("bucket answered bytes {:?} for {start}..{end}", got.range)));
            }
            let whole = start == 0 && end == got.meta.size;
            let stream: ByteStream = got.into_stream().map_err(to_io).boxed();
            Ok(Some(match (&self.hot, whole) {
                // A whole blob read from the bucket fills the hot tier on the way through.
                (Some(hot), true) => hot.fill(digest, end, stream).await,
                _ => stream,
            }))
        })
    }

    fn blob_url(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Option<String>>> {
        let digest = digest.clone();
        Box::pin(async move {
            let Some(expiry) = self.redirect else { return Ok(None) };
            let key = self.blob_key(&digest)?;
            let url = self.store.signed_url(http::Method::GET, &key, expiry).await.map_err(to_io)?;
            Ok(Some(url.to_string()))
        })
    }

    fn stage(&self) -> BoxFuture<'_, io::Result<Staged>> {
        self.local.stage()
    }

    fn stage_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<Staged>> {
        let key = self.blob_key(digest);
        Box::pin(async move {
            let key = key?;
            let mut staged = self.local.stage().await?;
            let file = staged.file.try_clone()?;
            staged.follower = Some(Arc::new(Alongside::start(self.uploads.clone(), key, file)));
            Ok(staged)
        })
    }

    fn commit(&self, staged: Arc<Staged>, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        let digest = digest.clone();
        Box::pin(async move {
            self.upload(&staged, &self.blob_key(&digest)?).await?;
            if let Some(hot) = &self.hot {
                // The bucket has it: a failure to keep a local copy costs only speed.
                if let Err(e) = hot.keep(staged, &digest).await {
                    tracing::warn!(error = %e, %digest, "could not keep a blob in the hot tier");
                }
            }
            Ok(())
        })
    }

    fn get_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<Vec<u8>>>> {
        let key = self.object_key(key);
        Box::pin(async move {
            let Some(got) = not_found_is_none(self.store.get(&key?).await)? else { return Ok(None) };
            Ok(Some(got.bytes().await.map_err(to_io)?.to_vec()))
        })
    }

    fn put_object(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        let key = self.object_key(key);
        // One PUT: S3 makes an object visible whole or not at all.
        Box::pin(async move { self.store.put(&key?, PutPayload::from(bytes)).await.map(drop).map_err(to_io) })
    }

    fn put_staged(&self, key: &str, staged: Arc<Staged>) -> BoxFuture<'_, io::Result<()>> {
        let key = self.object_key(key);
        Box::pin(async move { self.upload(&staged, &key?).await })
    }

    fn read_object(&self, key: &str) -> BoxFuture<'_, io::Result<Option<ByteStream>>> {
        let key = self.object_key(key);
        Box::pin(async move {
            let Some(got) = not_found_is_none(self.store.get(&key?).await)? else { return Ok(None) };
            Ok(Some(got.into_stream().map_err(to_io).boxed()))
        })
    }

    fn list_blobs(&self) -> BoxFuture<'_, io::Result<Vec<BlobInfo>>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut pages = self.list(layout::BLOBS_DIR)?;
            while let Some(meta) = pages.next().await {
                let meta = meta?;
                // Anything not named like a blob is not ours to count or evict.
                let Some(digest) = meta.location.filename().and_then(layout::digest_from_hex) else { continue };
                out.push(BlobInfo { digest, size: meta.size, modified: meta.last_modified.into() });
            }
            Ok(out)
        })
    }

    fn quarantine_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<()>> {
        let digest = digest.clone();
        Box::pin(async move {
            let from = self.blob_key(&digest)?;
            let to = self.key(&format!("{}/{}", layout::QUARANTINE_DIR, digest.hex()))?;
            self.store.copy(&from, &to).await.map_err(to_io)?;
            self.store.delete(&from).await.map_err(to_io)?;
            if let Some(hot) = &self.hot {
                hot.remove(&digest).await?;
            }
            Ok(())
        })
    }

    fn list_objects(&self, prefix: &str) -> BoxFuture<'_, io::Result<Vec<String>>> {
        let prefix = prefix.to_owned();
        Box::pin(async move {
            let Some(dir) = prefix.strip_suffix('/') else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "prefix must end with /"));
            };
            layout::check_object_key(dir)?;
            let base = format!("{}{}/", self.prefix, layout::OBJECTS_DIR);
            let mut keys = Vec::new();
            let mut pages = self.list(&format!("{}/{dir}", layout::OBJECTS_DIR))?;
            while let Some(meta) = pages.next().await {
                if let Some(key) = meta?.location.as_ref().strip_prefix(&base) {
                    keys.push(key.to_owned());
                }
            }
            keys.sort();
            Ok(keys)
        })
    }

    fn delete_object(&self, key: &str) -> BoxFuture<'_, io::Result<bool>> {
        let key = self.object_key(key);
        Box::pin(async move {
            let key = key?;
            // S3's DELETE says nothing about whether there was an object: ask first.
            if !self.exists(&key).await? {
                return Ok(false);
            }
            self.store.delete(&key).await.map_err(to_io)?;
            Ok(true)
        })
    }

    fn delete_blob(&self, digest: &Digest) -> BoxFuture<'_, io::Result<bool>> {
        let digest = digest.clone();
        Box::pin(async move {
            if let Some(hot) = &self.hot {
                hot.remove(&digest).await?;
            }
            let key = self.blob_key(&digest)?;
            if !self.exists(&key).await? {
                return Ok(false);
            }
            self.store.delete(&key).await.map_err(to_io)?;
            Ok(true)
        })
    }

    fn abandoned_uploads(&self, older_than: Duration, abort: bool) -> BoxFuture<'_, io::Result<Option<Vec<String>>>> {
        Box::pin(async move {
            let Some(found) = abandoned::list(&self.store, &self.admin_http, &self.prefix, older_than).await? else {
                return Ok(None);
            };
            for upload in found.iter().filter(|_| abort) {
                abandoned::abort(&self.store, &self.admin_http, upload).await?;
            }
            Ok(Some(found.into_iter().map(|u| u.key).collect()))
        })
    }

    fn degraded(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let key = self.key(&layout::readiness_probe()).ok()?;
            let written = self.store.put(&key, PutPayload::from_static(b"ok")).await;
            let removed = match written {
                Ok(_) => self.store.delete(&key).await,
                Err(e) => Err(e),
            };
            removed.err().map(|e| {
                tracing::debug!(error = %e, "readiness: the bucket does not answer");
                "the bucket is not writable: blobs stream from the upstreams uncached".to_owned()
            })
        })
    }

    fn probe(&self) -> BoxFuture<'_, io::Result<()>> {
        // Staging on local disk is what serving needs; the bucket is checked by `degraded`: a
        // replica that cannot reach it still serves every proxied pull (uncached), and marking
        // every replica of one bucket unready at once would leave clients nothing at all.
        self.local.probe()
    }
}

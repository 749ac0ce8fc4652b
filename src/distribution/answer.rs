//! What a handler answers, before it is HTTP: the one response contract shared by the proxied
//! side (the cache) and hosted namespaces. `http::response` renders each variant, so every
//! status, header and range answer is built in one place.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;

use super::Digest;

/// A stream of blob bytes (request and response bodies, stored blobs).
pub type ByteStream = futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>;

/// A manifest exactly as an upstream or a client sent it.
#[derive(Debug)]
pub struct Manifest {
    /// sha256 of `bytes`.
    pub digest: Digest,
    /// Its media type (the upstream's `Content-Type`, or the pushed one).
    pub media_type: String,
    /// The exact bytes.
    pub bytes: Bytes,
}

/// Where an answer came from (a metrics label and an access-log field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Local disk or memory, no upstream contacted.
    Cache,
    /// Local copy confirmed by a cheap upstream revalidation.
    Revalidated,
    /// Local copy served past its freshness because no upstream answered.
    Stale,
    /// Fetched from the named upstream (possibly joined in progress).
    Upstream(String),
    /// A hosted namespace's own content.
    Hosted,
}

impl Source {
    /// Bounded label for metrics: `cache` or `upstream`.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Upstream(_) => "upstream",
            _ => "cache",
        }
    }
}

/// A blob to send: its total size, the byte range chosen, and the body (absent for HEAD).
pub struct BlobAnswer {
    /// Full size of the blob, if known.
    pub size: Option<u64>,
    /// `(start, end_inclusive)` when answering a satisfiable `Range`.
    pub range: Option<(u64, u64)>,
    /// The bytes; `None` for HEAD.
    pub body: Option<ByteStream>,
    /// Where it came from.
    pub source: Source,
    /// A URL the client fetches the bytes from instead (a 307 to a presigned bucket URL, for
    /// `storage.s3.redirect`); `body` is then `None`.
    pub redirect: Option<String>,
}

/// Every successful answer of the registry API.
pub enum Answer {
    /// A manifest; without its body for HEAD.
    Manifest {
        /// The manifest.
        manifest: Arc<Manifest>,
        /// Where it came from.
        source: Source,
        /// HEAD: headers only.
        head: bool,
    },
    /// A blob (or its headers).
    Blob {
        /// Its digest.
        digest: Digest,
        /// What to send.
        blob: BlobAnswer,
    },
    /// 201: a blob or manifest stored at `location`.
    Created {
        /// Where it can be fetched.
        location: String,
        /// Its digest.
        digest: Digest,
        /// The `subject` of a pushed manifest (answered as `OCI-Subject`).
        subject: Option<Digest>,
    },
    /// An upload session's state: 202 after POST/PATCH, 204 for a status GET.
    Upload {
        /// 202 or 204.
        status: StatusCode,
        /// The session's URL.
        location: String,
        /// The session id.
        id: String,
        /// Bytes received so far.
        written: u64,
    },
    /// A status with an empty body (202 after a delete, 204 after a cancel).
    Status(StatusCode),
    /// A JSON document (tag lists, referrers, the catalogue, tokens, the ping).
    Json {
        /// Its `Content-Type`.
        content_type: &'static str,
        /// The document.
        body: Bytes,
        /// HEAD: headers only.
        head: bool,
        /// A `Link` to the next page.
        next: Option<String>,
        /// `OCI-Filters-Applied`, when a referrers filter was applied.
        filters_applied: Option<&'static str>,
        /// Never cached by intermediaries (tokens).
        no_store: bool,
    },
}

impl Answer {
    /// A JSON document without pagination or filters.
    pub fn json(content_type: &'static str, body: impl Into<Bytes>, head: bool) -> Answer {
        Answer::Json { content_type, body: body.into(), head, next: None, filters_applied: None, no_store: false }
    }

    /// Where proxied content came from, for the access log and the content metrics (`None`:
    /// not proxied content; hosted answers are logged and counted as requests only).
    pub fn source(&self) -> Option<Source> {
        let source = match self {
            Answer::Manifest { source, .. } => source,
            Answer::Blob { blob, .. } => &blob.source,
            _ => return None,
        };
        (*source != Source::Hosted).then(|| source.clone())
    }
}

//! Blobs as clients ask for them: a hit streams from disk, a HEAD miss asks an upstream for
//! the headers only, and a GET miss joins (or starts) the one fetch for that digest.

use std::sync::Arc;

use http::Method;

use super::tail::tail_stream;
use super::Cache;
use crate::config::Capability;
use crate::distribution::{internal, unsatisfiable, BlobAnswer, ByteRange, Digest, ErrorCode, ProtocolError, Source};
use crate::registry::Route;
use crate::upstream::UpstreamRequest;

impl Cache {
    /// A blob (or its headers, for HEAD), from disk, an in-progress fetch, or a new fetch.
    pub async fn blob(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<BlobAnswer, ProtocolError> {
        // A store that cannot answer (a bucket that is down) is a fault like an upstream's: the
        // upstreams may still have the blob. The store counts and logs its failures.
        let stored = self.storage.blob_size(digest).await.unwrap_or(None);
        if let Some(size) = stored {
            if !self.servable(route, digest, "blobs").await? {
                return Err(ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} not found")));
            }
            self.count("blob", "hit");
            self.evictor.touch(digest);
            let span = match range {
                Some(r) => Some(r.resolve(size).ok_or_else(|| unsatisfiable(size))?),
                None => None,
            };
            if !head {
                // Cannot sign: stream the bytes instead.
                if let Ok(Some(url)) = self.storage.blob_url(digest).await {
                    return Ok(BlobAnswer {
                        size: Some(size),
                        range: None,
                        body: None,
                        source: Source::Cache,
                        redirect: Some(url),
                    });
                }
            }
            let body = if head {
                None
            } else {
                let (start, end) = span.map(|(s, e)| (s, e + 1)).unwrap_or((0, size));
                match self.storage.read_blob(digest, start, end).await {
                    Ok(Some(s)) => Some(s),
                    // Evicted between stat and open, or unreadable (counted by the store): fetch
                    // it again.
                    Ok(None) | Err(_) => return Box::pin(self.fetch_blob(route, digest, range)).await,
                }
            };
            return Ok(BlobAnswer { size: Some(size), range: span, body, source: Source::Cache, redirect: None });
        }
        if head {
            return self.head_blob(route, digest).await;
        }
        self.fetch_blob(route, digest, range).await
    }

    async fn head_blob(&self, route: &Route, digest: &Digest) -> Result<BlobAnswer, ProtocolError> {
        let pool = self.pool(&route.registry)?;
        let req = UpstreamRequest::new(Method::HEAD, &route.repo, format!("blobs/{digest}"), Capability::Pull);
        let mut attempts = pool.attempts(req);
        let Some(answer) = attempts.next().await else {
            return Err(attempts.into_error(ErrorCode::BlobUnknown, &format!("blob {digest}")));
        };
        // Not `content_length()`: reqwest reports the (empty) body of a HEAD answer there.
        let size = answer
            .response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(BlobAnswer {
            size,
            range: None,
            body: None,
            source: Source::Upstream(answer.upstream.name().to_owned()),
            redirect: None,
        })
    }

    /// Joins (or starts) the fetch of `digest` and, once an upstream answered, streams the
    /// range asked for as the fetch receives it.
    async fn fetch_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobAnswer, ProtocolError> {
        let Some((reader, joined)) = self.join_or_start(route, digest).await? else {
            // Committed while this request looked: a hit after all.
            return Box::pin(self.blob(route, digest, range, false)).await;
        };
        self.count("blob", if joined { "coalesced" } else { "miss" });
        self.answer_from(reader, digest, range).await
    }

    /// Once an upstream (or the owner replica) answered, streams the range asked for from
    /// `reader` as the fetch receives it.
    pub(super) async fn answer_from(
        &self,
        reader: super::tail::Reader,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobAnswer, ProtocolError> {
        let mut rx = reader.progress();
        let progress = rx
            .wait_for(|p| p.ready || p.done.is_some())
            .await
            .map_err(|_| internal("blob fetch ended unexpectedly", digest))?
            .clone();
        if let Some(Err(e)) = progress.done {
            return Err(e);
        }
        if progress.done.is_some() && progress.received == 0 && !progress.ready {
            return Err(internal("blob fetch ended without data", digest));
        }
        let size = progress.total;
        let span = match (range, size) {
            (Some(r), Some(size)) => Some(r.resolve(size).ok_or_else(|| unsatisfiable(size))?),
            _ => None,
        };
        let (start, end) = match span {
            Some((s, e)) => (s, Some(e + 1)),
            None => (0, None),
        };
        Ok(BlobAnswer {
            size,
            range: span,
            body: Some(tail_stream(reader, start, end)),
            source: Source::Upstream(progress.upstream),
            redirect: None,
        })
    }
}

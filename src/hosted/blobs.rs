//! Blobs: served only through a repository's link to them, and unlinked (never deleted) here.

use http::header::HeaderMap;
use http::StatusCode;

use super::Hosted;
use crate::distribution::{
    internal, range_header, Answer, BlobAnswer, Digest, ErrorCode, ProtocolError, RepoName, Source,
};
use crate::storage::layout;

fn blob_unknown(repo: &RepoName, digest: &Digest) -> ProtocolError {
    ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} is not in {repo}"))
}

impl Hosted {
    pub(super) async fn get_blob(
        &self,
        repo: &RepoName,
        d: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Answer, ProtocolError> {
        let digest = Digest::parse(d)?;
        let size = self.linked_blob(repo, &digest).await?.ok_or_else(|| blob_unknown(repo, &digest))?;
        let span = match range_header(headers) {
            Some(r) => Some(r.span(size)?),
            None => None,
        };
        if !head {
            if let Some(url) = self.storage.blob_url(&digest).await.map_err(|e| internal("cannot sign blob URL", e))? {
                let blob = BlobAnswer {
                    size: Some(size),
                    range: None,
                    body: None,
                    source: Source::Hosted,
                    redirect: Some(url),
                };
                return Ok(Answer::Blob { digest, blob });
            }
        }
        let body = if head {
            None
        } else {
            let (start, end) = span.map_or((0, size), |(s, e)| (s, e + 1));
            let stream = self
                .storage
                .read_blob(&digest, start, end)
                .await
                .map_err(|e| internal("cannot read blob", e))?
                .ok_or_else(|| ProtocolError::new(ErrorCode::BlobUnknown, format!("blob {digest} is gone")))?;
            Some(stream)
        };
        Ok(Answer::Blob {
            digest,
            blob: BlobAnswer { size: Some(size), range: span, body, source: Source::Hosted, redirect: None },
        })
    }

    pub(super) async fn delete_blob(&self, repo: &RepoName, d: &str) -> Result<Answer, ProtocolError> {
        let digest = Digest::parse(d)?;
        // Only the link goes: the bytes may be shared, and `ferry gc` decides about them.
        if !self.delete(&layout::layer_link(repo, &digest)).await? {
            return Err(blob_unknown(repo, &digest));
        }
        Ok(Answer::Status(StatusCode::ACCEPTED))
    }
}

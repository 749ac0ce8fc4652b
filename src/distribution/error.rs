//! The spec's error codes and the one error type every handler returns; the HTTP edge turns
//! it into the spec's JSON body, once.

use http::StatusCode;

/// The error codes of the distribution spec (plus Distribution's `UNAVAILABLE`), each with the
/// HTTP status it is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content, or is malformed.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// A `Range` header that cannot be satisfied (HTTP 416); not a spec code, Ferry's own.
    RangeInvalid,
    /// Every upstream failed; the service cannot answer now.
    Unavailable,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error to answer a client with: a spec code, a human message and optional JSON detail.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    /// The spec's code; decides the HTTP status.
    pub code: ErrorCode,
    /// What went wrong, for humans.
    pub message: String,
    /// Structured detail (e.g. which upstreams were tried), or null.
    pub detail: serde_json::Value,
    /// A status other than the code's own (the spec's 413 for a manifest too large, which no
    /// code maps to).
    pub status_override: Option<StatusCode>,
}

impl ProtocolError {
    /// An error without detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError { code, message: message.into(), detail: serde_json::Value::Null, status_override: None }
    }

    /// Answered with `status` instead of the code's own.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status_override = Some(status);
        self
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        self.status_override.unwrap_or_else(|| self.code.status())
    }

    /// Attaches structured detail.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    /// The spec's JSON body: `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": self.detail }]
        })
        .to_string()
    }
}

/// A failure of Ferry's own machinery (storage, a task, a lock): logged here, answered as
/// `UNAVAILABLE` (503), the status clients retry.
pub fn internal(what: &str, e: impl std::fmt::Display) -> ProtocolError {
    // The cause goes to the log only: it can name paths, bucket endpoints and keys, which are
    // the operator's business, not the client's.
    tracing::error!(error = %e, "{what}");
    ProtocolError::new(ErrorCode::Unavailable, what)
}

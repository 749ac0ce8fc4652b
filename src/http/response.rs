//! Every HTTP answer Ferry gives, built in one place: [`Answer`]s of the proxied side and of
//! hosted namespaces alike, errors as the spec's JSON, and the plain-text operations answers.

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};

use super::Body;
use crate::distribution::{Answer, BlobAnswer, Digest, ErrorCode, Manifest, ProtocolError};

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body held in memory (small documents only).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A plain-text answer (operations endpoints).
pub fn text(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The spec's error JSON with the code's status; a 401 carries `challenge`.
pub fn error(e: &ProtocolError, head: bool, challenge: &HeaderValue) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    let mut r = Response::new(if head { empty() } else { full(body) });
    *r.status_mut() = e.status();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if e.code == ErrorCode::Unauthorized {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.clone());
    }
    r
}

/// Renders a successful answer.
pub fn render(answer: Answer) -> Response<Body> {
    match answer {
        Answer::Manifest { manifest, head, .. } => manifest_response(&manifest, head),
        Answer::Blob { digest, blob } => blob_response(&digest, blob),
        Answer::Created { location, digest, subject } => {
            let mut r = with_status(StatusCode::CREATED, empty());
            set(&mut r, header::LOCATION, location);
            set(&mut r, DOCKER_CONTENT_DIGEST, digest);
            if let Some(s) = subject {
                set(&mut r, HeaderName::from_static("oci-subject"), s);
            }
            set(&mut r, header::CONTENT_LENGTH, 0);
            r
        }
        Answer::Upload { status, location, id, written } => {
            let mut r = with_status(status, empty());
            set(&mut r, header::LOCATION, location);
            set(&mut r, HeaderName::from_static("docker-upload-uuid"), id);
            // Distribution's convention: an empty upload reports 0-0.
            set(&mut r, header::RANGE, format!("0-{}", written.saturating_sub(1)));
            set(&mut r, header::CONTENT_LENGTH, 0);
            r
        }
        Answer::Status(status) => {
            let mut r = with_status(status, empty());
            set(&mut r, header::CONTENT_LENGTH, 0);
            r
        }
        Answer::Json { content_type, body, head, next, filters_applied, no_store } => {
            let len = body.len();
            let mut r = with_status(StatusCode::OK, if head { empty() } else { full(body) });
            set(&mut r, header::CONTENT_TYPE, content_type);
            set(&mut r, header::CONTENT_LENGTH, len);
            if let Some(link) = next {
                set(&mut r, header::LINK, link);
            }
            if let Some(f) = filters_applied {
                set(&mut r, HeaderName::from_static("oci-filters-applied"), f);
            }
            if no_store {
                set(&mut r, header::CACHE_CONTROL, "no-store");
            }
            r
        }
    }
}

fn with_status(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// Sets a header whose value Ferry built from validated names, digests and numbers; a value
/// that still is not a valid header (it cannot be) is left out rather than failing the answer.
fn set(r: &mut Response<Body>, name: HeaderName, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        r.headers_mut().insert(name, v);
    }
}

fn manifest_response(m: &Manifest, head: bool) -> Response<Body> {
    let mut r = with_status(StatusCode::OK, if head { empty() } else { full(m.bytes.clone()) });
    set(&mut r, header::CONTENT_TYPE, &m.media_type);
    set(&mut r, DOCKER_CONTENT_DIGEST, &m.digest);
    set(&mut r, header::ETAG, format!("\"{}\"", m.digest));
    set(&mut r, header::CONTENT_LENGTH, m.bytes.len());
    r
}

fn blob_response(digest: &Digest, a: BlobAnswer) -> Response<Body> {
    if let Some(url) = a.redirect {
        // Distribution's redirect middleware answers the same: clients follow it and send no
        // Authorization to the bucket (the URL carries its own signature).
        let mut r = with_status(StatusCode::TEMPORARY_REDIRECT, empty());
        set(&mut r, header::LOCATION, url);
        set(&mut r, DOCKER_CONTENT_DIGEST, digest);
        return r;
    }
    let body = match a.body {
        Some(s) => StreamBody::new(s.map_ok(Frame::data)).boxed_unsync(),
        None => empty(),
    };
    let mut r = with_status(StatusCode::OK, body);
    set(&mut r, header::CONTENT_TYPE, "application/octet-stream");
    set(&mut r, DOCKER_CONTENT_DIGEST, digest);
    set(&mut r, header::ETAG, format!("\"{digest}\""));
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    match (a.range, a.size) {
        (Some((start, end)), Some(size)) => {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            set(&mut r, header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            set(&mut r, header::CONTENT_LENGTH, end - start + 1);
        }
        (_, Some(size)) => set(&mut r, header::CONTENT_LENGTH, size),
        (_, None) => {}
    }
    r
}

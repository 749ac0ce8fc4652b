//! The access log and the request metrics, written once a response body is finished or
//! dropped, so the log line and the histogram cover the whole transfer, not just the headers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header;
use http::{Method, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use super::Body;
use crate::distribution::Source;
use crate::metrics::Metrics;

/// What the access log and the request metrics need, recorded when the body is done.
pub(super) struct AccessLog {
    /// Where the series go.
    pub metrics: Arc<Metrics>,
    /// The request's method.
    pub method: Method,
    /// The request's path (without the query).
    pub path: String,
    /// The bounded `route` label.
    pub route: &'static str,
    /// Where the content came from; `None` for answers that carry no content.
    pub source: Option<Source>,
    /// The peer.
    pub client: SocketAddr,
    /// When the request arrived.
    pub started: Instant,
}

/// Wraps `resp`'s body so that `log` is written when the body is done.
pub(super) fn track(resp: Response<Body>, log: AccessLog) -> Response<Body> {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    // hyper stops polling once Content-Length bytes are out, so "all announced bytes sent"
    // is what complete means; HEAD answers announce a length but send nothing.
    let expected = match log.method == Method::HEAD {
        true => Some(0),
        false => {
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        }
    };
    let tracked = Tracked { inner: body, bytes: 0, expected, finished: false, status, log };
    Response::from_parts(parts, tracked.boxed_unsync())
}

/// A response body that counts its bytes and logs once finished or dropped.
struct Tracked {
    inner: Body,
    bytes: u64,
    expected: Option<u64>,
    finished: bool,
    status: StatusCode,
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
        l.metrics.http_requests.with_label_values(&[method_label(&l.method), l.route, self.status.as_str()]).inc();
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
            status = self.status.as_u16(),
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

/// The `method` label: one of the methods the registry API uses, or `other` — a client's
/// made-up methods must not each create a series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_a_closed_set() {
        let made_up: Vec<Method> = (0..100).map(|i| Method::from_bytes(format!("X{i}").as_bytes()).unwrap()).collect();
        assert!(made_up.iter().all(|m| method_label(m) == "other"));
        assert_eq!(method_label(&Method::PATCH), "PATCH");
    }
}

//! Reading upstream bodies: small ones whole and bounded, and where a blob answer's bytes start.

use super::{error_chain, Reason};

/// Reads a small response body (a token, a manifest), refusing more than `limit` bytes.
pub async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Reason> {
    use futures_util::StreamExt;
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Reason::Body(error_chain(&e)))?;
        if buf.len() + chunk.len() > limit {
            return Err(Reason::Body(format!("answer larger than {limit} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Where an upstream's body starts and the blob's full size, from a 200 or a 206 (`None`: a
/// 206 whose `Content-Range` cannot be read, so its bytes cannot be placed).
pub fn body_span(resp: &reqwest::Response) -> Option<(u64, Option<u64>)> {
    if resp.status() != http::StatusCode::PARTIAL_CONTENT {
        return Some((0, resp.content_length()));
    }
    content_range(resp.headers().get(http::header::CONTENT_RANGE)?.to_str().ok()?)
}

/// `bytes <start>-<end>/<total>` into the start and the total (`*`: unknown).
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes ")?;
    let (span, total) = spec.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::content_range;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range(" bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes */200"), None);
        assert_eq!(content_range("items 0-1/2"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_content_range_parses_or_is_refused_without_panic(v in "\\PC{0,60}") {
            let _ = content_range(&v);
        }

        #[test]
        fn well_formed_content_ranges_round_trip(start in 0u64..u64::MAX / 2, len in 0u64..1 << 40, total in proptest::option::of(0u64..u64::MAX)) {
            let t = total.map_or("*".to_owned(), |t| t.to_string());
            let v = format!("bytes {start}-{}/{t}", start + len);
            proptest::prop_assert_eq!(content_range(&v), Some((start, total)));
        }
    }
}

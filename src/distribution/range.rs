//! `Range: bytes=` requests on blobs (one range; RFC 9110 lets a server answer anything else
//! with the whole representation).

use super::{ErrorCode, ProtocolError};

/// A parsed single `Range: bytes=` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-` or `bytes=a-b` (inclusive).
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses one range; multi-range and malformed headers yield `None` (answered with the
    /// whole blob, as RFC 9110 allows).
    pub fn parse(h: &str) -> Option<ByteRange> {
        let spec = h.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            return b.parse().ok().map(ByteRange::Suffix);
        }
        let start = a.parse().ok()?;
        let end = if b.is_empty() { None } else { Some(b.parse().ok()?) };
        if end.is_some_and(|e| e < start) {
            return None;
        }
        Some(ByteRange::From(start, end))
    }

    /// The inclusive span within a blob of `size` bytes, or `None` if unsatisfiable.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            _ if size == 0 => None,
            ByteRange::From(s, _) if s >= size => None,
            ByteRange::From(s, e) => Some((s, e.unwrap_or(size - 1).min(size - 1))),
            ByteRange::Suffix(0) => None,
            ByteRange::Suffix(n) => Some((size.saturating_sub(n), size - 1)),
        }
    }

    /// The inclusive span, or the spec's 416 error naming the size.
    pub fn span(self, size: u64) -> Result<(u64, u64), ProtocolError> {
        self.resolve(size).ok_or_else(|| unsatisfiable(size))
    }
}

/// The request's `Range`, if it holds one satisfiable-looking range.
pub fn range_header(headers: &http::HeaderMap) -> Option<ByteRange> {
    headers.get(http::header::RANGE).and_then(|v| v.to_str().ok()).and_then(ByteRange::parse)
}

/// The 416 answer for a blob of `size` bytes, with the size in the detail.
pub fn unsatisfiable(size: u64) -> ProtocolError {
    ProtocolError::new(ErrorCode::RangeInvalid, format!("range not satisfiable; the blob has {size} bytes"))
        .with_detail(serde_json::json!({ "size": size }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(ByteRange::parse("bytes=0-99"), Some(ByteRange::From(0, Some(99))));
        assert_eq!(ByteRange::parse("bytes=100-"), Some(ByteRange::From(100, None)));
        assert_eq!(ByteRange::parse("bytes=-5"), Some(ByteRange::Suffix(5)));
        assert_eq!(ByteRange::parse("bytes=5-1"), None);
        assert_eq!(ByteRange::parse("bytes=0-1,3-4"), None);
        assert_eq!(ByteRange::parse("items=0-1"), None);
        assert_eq!(ByteRange::From(0, Some(99)).resolve(50), Some((0, 49)));
        assert_eq!(ByteRange::From(50, None).resolve(50), None);
        assert_eq!(ByteRange::Suffix(10).resolve(5), Some((0, 4)));
        assert_eq!(ByteRange::Suffix(0).resolve(5), None);
        assert_eq!(ByteRange::Suffix(0).span(5).unwrap_err().detail["size"], 5);
    }
}

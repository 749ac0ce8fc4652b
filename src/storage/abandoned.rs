//! Multipart uploads a crash left in the bucket (S3 backend): listed with ListMultipartUploads
//! under Ferry's prefix and, on request, aborted. `object_store` has no call for either, so
//! both are single requests presigned by its signer (the same SigV4 credentials) and sent with
//! Ferry's reqwest; the listing's XML is read for the three fields it needs.
//!
//! An incomplete upload is never visible as an object, so this is about storage cost, not
//! correctness; the bucket's `AbortIncompleteMultipartUpload` lifecycle rule is the other half.
//! Some S3-compatible servers (s3s-fs among them) do not implement the listing: that is
//! reported as such, not as "none found".

use std::io;
use std::time::{Duration, SystemTime};

use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};

/// How long a presigned admin request stays valid.
const SIGNED_FOR: Duration = Duration::from_secs(300);
/// Listing pages followed at most (1000 uploads each).
const MAX_PAGES: usize = 100;
/// Largest listing page read (S3 pages are about 1000 uploads, well under this).
const MAX_PAGE_BYTES: usize = 4 << 20;

/// One incomplete multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The object key it would create.
    pub key: String,
    /// S3's id of the upload.
    pub id: String,
    /// When it was begun, if the server said (RFC 3339).
    pub initiated: Option<String>,
}

/// The uploads under `prefix` begun more than `older_than` ago, or `None` if the server does
/// not implement ListMultipartUploads.
pub async fn list(
    store: &AmazonS3,
    http: &reqwest::Client,
    prefix: &str,
    older_than: Duration,
) -> io::Result<Option<Vec<Upload>>> {
    let mut out = Vec::new();
    let mut markers: Option<(String, String)> = None;
    for _ in 0..MAX_PAGES {
        let mut query = vec![("uploads", String::new()), ("prefix", prefix.to_owned())];
        if let Some((key, id)) = &markers {
            query.push(("key-marker", key.clone()));
            query.push(("upload-id-marker", id.clone()));
        }
        let options = SignedUrlOptions::default().with_query(query);
        let url = store
            .signed_url_opts(http::Method::GET, &Path::from(""), SIGNED_FOR, &options)
            .await
            .map_err(io::Error::other)?;
        let answer = http.get(url).send().await.map_err(io::Error::other)?;
        let status = answer.status();
        if matches!(status.as_u16(), 400 | 405 | 501) {
            return Ok(None);
        }
        let body = read_bounded(answer).await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            if text.contains("NotImplemented") {
                return Ok(None);
            }
            return Err(io::Error::other(format!("ListMultipartUploads answered {status}")));
        }
        let page = String::from_utf8_lossy(&body);
        let cutoff = SystemTime::now() - older_than;
        out.extend(uploads(&page).into_iter().filter(|u| begun_before(u, cutoff)));
        markers = match field(&page, "IsTruncated").as_deref() {
            Some("true") => field(&page, "NextKeyMarker").zip(field(&page, "NextUploadIdMarker")),
            _ => None,
        };
        if markers.is_none() {
            return Ok(Some(out));
        }
    }
    Ok(Some(out))
}

/// Aborts one upload (its parts are deleted by the server).
pub async fn abort(store: &AmazonS3, http: &reqwest::Client, upload: &Upload) -> io::Result<()> {
    let path = Path::parse(&upload.key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let options = SignedUrlOptions::default().with_query([("uploadId", upload.id.as_str())]);
    let url =
        store.signed_url_opts(http::Method::DELETE, &path, SIGNED_FOR, &options).await.map_err(io::Error::other)?;
    let answer = http.delete(url).send().await.map_err(io::Error::other)?;
    match answer.status().as_u16() {
        200..=299 | 404 => Ok(()),
        s => Err(io::Error::other(format!("AbortMultipartUpload answered {s}"))),
    }
}

async fn read_bounded(mut answer: reqwest::Response) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(io::Error::other)? {
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(io::Error::other("ListMultipartUploads page too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn begun_before(u: &Upload, cutoff: SystemTime) -> bool {
    // Unknown age counts as old: the caller asked about everything older than a bound.
    let Some(at) = u.initiated.as_deref() else { return true };
    humantime::parse_rfc3339_weak(at.trim_end_matches('Z').split('.').next().unwrap_or(at)).map_or(true, |t| t < cutoff)
}

/// The `<Upload>` entries of a ListMultipartUploads page.
fn uploads(page: &str) -> Vec<Upload> {
    page.split("<Upload>")
        .skip(1)
        .filter_map(|chunk| {
            let entry = chunk.split("</Upload>").next()?;
            Some(Upload {
                key: unescape(&field(entry, "Key")?),
                id: field(entry, "UploadId")?,
                initiated: field(entry, "Initiated"),
            })
        })
        .collect()
}

/// The text of the first `<name>…</name>` in `xml`.
fn field(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].to_owned())
}

/// The five XML entities (keys are Ferry's own, but the server escapes what it sends).
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_page_is_read_for_keys_ids_and_times() {
        let page = "<ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>true</IsTruncated>\
            <NextKeyMarker>p/b</NextKeyMarker><NextUploadIdMarker>2</NextUploadIdMarker>\
            <Upload><Key>p/a&amp;b</Key><UploadId>1</UploadId><Initiated>2020-01-01T00:00:00.000Z</Initiated></Upload>\
            <Upload><Key>p/b</Key><UploadId>2</UploadId></Upload></ListMultipartUploadsResult>";
        let found = uploads(page);
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].key.as_str(), found[0].id.as_str()), ("p/a&b", "1"));
        assert_eq!(found[1].initiated, None);
        assert_eq!(field(page, "NextUploadIdMarker").as_deref(), Some("2"));
        let now = SystemTime::now();
        assert!(begun_before(&found[0], now), "2020 is before now");
        let fresh = Upload { initiated: Some(humantime::format_rfc3339_millis(now).to_string()), ..found[0].clone() };
        assert!(!begun_before(&fresh, now - Duration::from_secs(3600)), "begun just now is not an hour old");
    }
}

//! The formats of the small records Ferry keeps: manifest records (cached and pushed alike) and
//! proxied tag entries. One definition each, so the cache, hosted namespaces, `gc` and
//! `ferry cache verify` can never disagree about what a record means.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::distribution::{Digest, Manifest};

/// A manifest record: the media type, a newline, the exact bytes (media types never hold a
/// newline; the constructors of [`Manifest`] refuse one).
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut v = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
    v.extend_from_slice(m.media_type.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(&m.bytes);
    v
}

/// Reads a manifest record back; `None` when it is malformed or no longer matches its digest
/// (such a record is treated as absent, and refetched or reported).
pub fn decode_manifest(digest: &Digest, record: Vec<u8>) -> Option<Manifest> {
    let nl = record.iter().position(|&b| b == b'\n')?;
    let media_type = std::str::from_utf8(&record[..nl]).ok()?.to_owned();
    let bytes = Bytes::from(record).slice(nl + 1..);
    (Digest::of(&bytes) == *digest).then(|| Manifest { digest: digest.clone(), media_type, bytes })
}

/// A proxied tag's last known meaning.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    /// The digest the tag pointed at.
    pub digest: String,
    /// That manifest's media type.
    pub media_type: String,
    /// Unix seconds of the last upstream confirmation.
    pub validated_at: u64,
}

impl TagEntry {
    /// The stored form (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored entry; `None` if it is not one.
    pub fn decode(raw: &[u8]) -> Option<TagEntry> {
        serde_json::from_slice(raw).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_records_round_trip() {
        let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
        let m = Manifest {
            digest: Digest::of(&bytes),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        let back = decode_manifest(&m.digest, encode_manifest(&m)).unwrap();
        assert_eq!((back.media_type.as_str(), &back.bytes[..]), (m.media_type.as_str(), &m.bytes[..]));
        assert!(decode_manifest(&Digest::of(b"other"), encode_manifest(&m)).is_none(), "a record must match its name");
        assert!(decode_manifest(&m.digest, b"no newline".to_vec()).is_none());
        let mut corrupt = encode_manifest(&m);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(decode_manifest(&m.digest, corrupt).is_none());
    }

    #[test]
    fn tag_entries_round_trip() {
        let e = TagEntry { digest: "sha256:x".into(), media_type: "t".into(), validated_at: 7 };
        assert_eq!(TagEntry::decode(&e.encode()), Some(e));
        assert_eq!(TagEntry::decode(b"junk"), None);
    }
}

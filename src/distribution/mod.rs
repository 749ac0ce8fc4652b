//! Protocol types of the OCI Distribution API: repository names, references, digests (with a
//! streaming verifier), manifest media types, and the spec's error codes with their JSON body.
//!
//! Everything here is pure: no I/O, so it can be parsed and tested in isolation.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

mod answer;
mod endpoint;
mod error;
#[cfg(test)]
mod proptests;
mod range;
pub use answer::{Answer, BlobAnswer, ByteStream, Manifest, Source};
pub use endpoint::{split_api, Api, Endpoint};
pub use error::{internal, ErrorCode, ProtocolError};
pub use range::{range_header, unsatisfiable, ByteRange};

/// Longest repository name accepted (Distribution's limit).
pub const MAX_NAME_LEN: usize = 255;

/// Largest manifest Ferry will read, from a client or an upstream (the spec suggests 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Manifest media types Ferry knows; requested upstream when a client sends no `Accept`.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2];
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (multi-arch).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A validated repository name such as `library/alpine`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Parses and validates a name against the spec's grammar:
    /// path components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(ProtocolError::new(
                ErrorCode::NameInvalid,
                format!("repository name must be 1 to {MAX_NAME_LEN} characters"),
            ));
        }
        if !s.split('/').all(valid_component) {
            return Err(ProtocolError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name {s:?}: components are lowercase letters and digits, separated by '.', '_', '__' or '-', joined by '/'"),
            ));
        }
        Ok(RepoName(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of `/`-separated components.
    pub fn components(&self) -> usize {
        self.0.split('/').count()
    }

    /// The name with `prefix/` prepended (e.g. `library/` for Docker Hub's official images).
    pub fn with_prefix(&self, prefix: &str) -> RepoName {
        RepoName(format!("{prefix}/{}", self.0))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A supported content digest. Only sha256 is accepted: it is what every registry in the field
/// produces, and content addressing needs one verifier we can trust.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        let invalid = |why: &str| ProtocolError::new(ErrorCode::DigestInvalid, format!("invalid digest {s:?}: {why}"));
        let (alg, hex) = s.split_once(':').ok_or_else(|| invalid("expected algorithm:hex"))?;
        match alg {
            "sha256" => {}
            "sha512" | "sha384" | "blake3" => return Err(invalid("only sha256 is supported")),
            _ => return Err(invalid("unknown algorithm")),
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(invalid("sha256 needs 64 lowercase hex characters"));
        }
        Ok(Digest { hex: hex.to_owned() })
    }

    /// The digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        let mut v = DigestVerifier::new();
        v.update(bytes);
        v.finish()
    }

    /// The hex part, 64 characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// Hashes a stream of bytes incrementally; `finish` yields the digest to compare.
#[derive(Clone, Default)]
pub struct DigestVerifier {
    hasher: Sha256,
}

impl DigestVerifier {
    /// A verifier that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        Digest { hex: hex::encode(self.hasher.finalize()) }
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag such as `3.19`.
    Tag(String),
    /// An immutable content digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`) or a digest (anything with a `:`).
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Reference::Tag(s.to_owned()))
        } else {
            Err(ProtocolError::new(
                ErrorCode::ManifestInvalid,
                format!("invalid tag {s:?}: up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"),
            ))
        }
    }
}

impl Reference {
    /// Parses a reference a client reads (GET/HEAD): a string that cannot be a tag names no
    /// manifest, so it is `404 MANIFEST_UNKNOWN` (as Distribution answers and the OCI
    /// conformance tests expect), not the `400 MANIFEST_INVALID` a PUT gets.
    pub fn parse_to_read(s: &str) -> Result<Self, ProtocolError> {
        Reference::parse(s).map_err(|e| match e.code {
            ErrorCode::ManifestInvalid => {
                ProtocolError::new(ErrorCode::ManifestUnknown, format!("manifest unknown: {}", e.message))
            }
            _ => e,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Whether an `Accept` header list admits a media type (`*/*` and an empty list admit all).
pub fn accepts(accept: &[String], media_type: &str) -> bool {
    if accept.is_empty() {
        return true;
    }
    accept.iter().flat_map(|h| h.split(',')).any(|item| {
        let t = item.split(';').next().unwrap_or("").trim();
        t == media_type || t == "*/*"
    })
}

/// Parses the `Accept` header values of a request into a list.
pub fn accept_list(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The client's `Accept` list, or every manifest type Ferry knows when it sent none.
pub fn accept_or_all(accept: &[String]) -> Vec<String> {
    if accept.is_empty() {
        MANIFEST_MEDIA_TYPES.iter().map(|s| s.to_string()).collect()
    } else {
        accept.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["alpine", "library/alpine", "a/b/c", "my-app", "a__b", "a.b_c-d", "x---y", "0"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alpine", "a//b", "/a", "a/", "a/../b", "..", "a..b", "a___b", "-a", "a-", "a_", "a b", "a:b"] {
            let e = RepoName::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::NameInvalid, "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn references_and_digests() {
        let d = "sha256:".to_owned() + &"ab".repeat(32);
        assert_eq!(Reference::parse(&d).unwrap(), Reference::Digest(Digest::parse(&d).unwrap()));
        assert_eq!(Reference::parse("3.19").unwrap(), Reference::Tag("3.19".into()));
        assert!(Reference::parse("_x").is_ok());
        assert_eq!(Reference::parse(".x").unwrap_err().code, ErrorCode::ManifestInvalid);
        assert_eq!(Reference::parse(&"a".repeat(129)).unwrap_err().code, ErrorCode::ManifestInvalid);
        for bad in ["sha256:abc", "sha256:", "md5:00", "sha512:00", &("sha256:".to_owned() + &"AB".repeat(32))] {
            assert_eq!(Digest::parse(bad).unwrap_err().code, ErrorCode::DigestInvalid, "{bad}");
        }
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn accept_lists() {
        let a = vec![format!("{OCI_MANIFEST}, {DOCKER_MANIFEST_V2};q=0.9")];
        assert!(accepts(&a, DOCKER_MANIFEST_V2));
        assert!(!accepts(&a, OCI_INDEX));
        assert!(accepts(&[], OCI_INDEX));
        assert!(accepts(&["*/*".into()], OCI_INDEX));
    }

    #[test]
    fn error_body() {
        let e = ProtocolError::new(ErrorCode::BlobUnknown, "nope");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(e.code.status(), 404);
    }
}

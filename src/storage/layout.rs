//! Every key and path of the store, built in this one file (the model is Distribution's
//! `registry/storage/paths.go`). Nothing else in Ferry formats a storage key.
//!
//! ```text
//! <root>/
//! ├── blobs/sha256/<2 hex>/<64 hex>      blob bytes, named by their verified digest; shared by
//! │                                      the cache and hosted namespaces
//! ├── tmp/<pid>-<n>                      staging: fetches and uploads in progress (emptied at
//! │                                      start-up; never visible under blobs/)
//! ├── quarantine/<64 hex>                blobs that failed `ferry cache verify`
//! └── objects/                           small metadata objects (the keys below)
//!     ├── manifests/sha256/<64 hex>      manifest record: media type, "\n", the exact bytes
//!     │                                  (cached and pushed manifests alike; see `records`)
//!     ├── uploads/<32 hex>/<20-digit offset>-<32 hex>
//!     │                                  a chunk of an upload session shared by the replicas of
//!     │                                  a cluster (the session itself is in Redis)
//!     ├── tags/<registry>/<repo>/_tags/<tag>/<index|single>
//!     │                                  a proxied tag's last known digest (JSON `TagEntry`);
//!     │                                  `index` for clients that accept an index
//!     └── hosted/
//!         ├── blobs/<64 hex>             ownership mark: hosted content uses this digest
//!         │                              (JSON `Mark`; eviction skips it; see `marks`)
//!         ├── catalog/<repo>/_repo       the hosted repository exists (for /v2/_catalog)
//!         └── repos/<repo>/
//!             ├── _layers/<64 hex>                  blob link: the repository may serve it
//!             ├── _manifests/revisions/<64 hex>     manifest link
//!             ├── _manifests/tags/<tag>             tag → digest (text)
//!             └── _referrers/<subject hex>/<64 hex> referrer descriptor (JSON)
//! ```
//!
//! Repository components start with `[a-z0-9]` and tags cannot contain `/`, so the
//! `_`-prefixed directories never collide with a nested repository or another tag.

use crate::distribution::{Digest, RepoName};

/// Directory (under the root) of committed blobs.
pub const BLOBS_DIR: &str = "blobs/sha256";
/// Directory of staging files.
pub const STAGING_DIR: &str = "tmp";
/// Directory of quarantined blobs.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Directory holding every metadata object.
pub const OBJECTS_DIR: &str = "objects";

/// Prefix of every manifest record.
pub const MANIFESTS_PREFIX: &str = "manifests/sha256/";
/// Prefix of every proxied tag entry.
pub const TAGS_PREFIX: &str = "tags/";
/// Prefix of every hosted ownership mark.
pub const MARKS_PREFIX: &str = "hosted/blobs/";
/// Prefix of the hosted catalogue.
pub const CATALOG_PREFIX: &str = "hosted/catalog/";
/// Prefix of every hosted repository's links.
pub const REPOS_PREFIX: &str = "hosted/repos/";

/// Prefix of every chunk of a shared upload session.
pub const UPLOADS_PREFIX: &str = "uploads/";

/// Whether `id` can name an upload session: 32 lower-case hex digits (a simple UUID), so a
/// session id from a client's URL can never form another key.
pub fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the chunks of shared upload `id` live (a prefix ending in `/`).
pub fn upload_dir(id: &str) -> String {
    format!("{UPLOADS_PREFIX}{id}/")
}

/// One chunk of shared upload `id`, starting at byte `start`; `name` (32 hex) makes the key of
/// each attempt unique, so two replicas racing for one offset never write the same object.
pub fn upload_chunk(id: &str, start: u64, name: &str) -> String {
    format!("{}{start:020}-{name}", upload_dir(id))
}

/// The session id a chunk key belongs to, if it is one.
pub fn upload_of_chunk(key: &str) -> Option<&str> {
    let id = key.strip_prefix(UPLOADS_PREFIX)?.split('/').next()?;
    is_upload_id(id).then_some(id)
}

/// `blobs/sha256/<2 hex>/<64 hex>`, relative to the root.
pub fn blob_path(digest: &Digest) -> String {
    let hex = digest.hex();
    format!("{BLOBS_DIR}/{}/{hex}", &hex[..2])
}

/// The digest a blob file or mark is named by (`<64 hex>`), if it is one.
pub fn digest_from_hex(hex: &str) -> Option<Digest> {
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// The manifest record of `digest`.
pub fn manifest_record(digest: &Digest) -> String {
    format!("{MANIFESTS_PREFIX}{}", digest.hex())
}

/// A proxied tag's entry; `index` separates answers for clients that accept an index.
pub fn tag_entry(registry: &str, repo: &RepoName, tag: &str, index: bool) -> String {
    let form = if index { "index" } else { "single" };
    format!("{TAGS_PREFIX}{registry}/{repo}/_tags/{tag}/{form}")
}

/// The prefix of every tag entry of `repo` on `registry` (and of no other repository's: the
/// `_tags` component cannot be part of a repository name's path under it).
pub fn repo_tags_prefix(registry: &str, repo: &RepoName) -> String {
    format!("{TAGS_PREFIX}{registry}/{repo}/_tags/")
}

/// The ownership mark of `digest`.
pub fn mark(digest: &Digest) -> String {
    format!("{MARKS_PREFIX}{}", digest.hex())
}

/// The catalogue entry of a hosted repository.
pub fn catalog_entry(repo: &RepoName) -> String {
    format!("{CATALOG_PREFIX}{repo}/_repo")
}

/// The repository a catalogue key names, if it is one.
pub fn repo_from_catalog_key(key: &str) -> Option<&str> {
    key.strip_prefix(CATALOG_PREFIX)?.strip_suffix("/_repo")
}

fn repo_key(repo: &RepoName, rest: &str) -> String {
    format!("{REPOS_PREFIX}{repo}/{rest}")
}

/// The link that lets `repo` serve blob `digest`.
pub fn layer_link(repo: &RepoName, digest: &Digest) -> String {
    repo_key(repo, &format!("_layers/{}", digest.hex()))
}

/// The link that makes manifest `digest` part of `repo`.
pub fn revision_link(repo: &RepoName, digest: &Digest) -> String {
    repo_key(repo, &format!("_manifests/revisions/{}", digest.hex()))
}

/// Where `repo`'s tags live (a prefix ending in `/`).
pub fn tags_dir(repo: &RepoName) -> String {
    repo_key(repo, "_manifests/tags/")
}

/// One hosted tag of `repo`.
pub fn hosted_tag(repo: &RepoName, tag: &str) -> String {
    format!("{}{tag}", tags_dir(repo))
}

/// Where the referrers of `subject` in `repo` live (a prefix ending in `/`).
pub fn referrers_dir(repo: &RepoName, subject: &Digest) -> String {
    repo_key(repo, &format!("_referrers/{}/", subject.hex()))
}

/// One referrer (`digest`) of `subject` in `repo`.
pub fn referrer(repo: &RepoName, subject: &Digest, digest: &Digest) -> String {
    format!("{}{}", referrers_dir(repo, subject), digest.hex())
}

/// What a key under [`REPOS_PREFIX`] is, for `gc`'s single listing of every repository.
#[derive(Debug, PartialEq, Eq)]
pub enum RepoKey<'a> {
    /// `_manifests/revisions/<hex>`.
    Revision(&'a str),
    /// `_layers/<hex>`.
    Layer(&'a str),
    /// Anything else (tags, referrers).
    Other,
}

/// Classifies a key under [`REPOS_PREFIX`].
pub fn classify_repo_key(key: &str) -> RepoKey<'_> {
    if let Some((_, hex)) = key.split_once("/_manifests/revisions/") {
        RepoKey::Revision(hex)
    } else if let Some((_, hex)) = key.split_once("/_layers/") {
        RepoKey::Layer(hex)
    } else {
        RepoKey::Other
    }
}

/// Refuses an object key that could escape its directory (or prefix): Ferry builds keys from
/// validated names, so this is a last line of defence shared by every backend.
pub fn check_object_key(key: &str) -> std::io::Result<()> {
    if key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad object key {key:?}")));
    }
    Ok(())
}

/// The staging file name of the `n`th staging file of this process.
pub fn staging_file(n: u64) -> String {
    format!("{STAGING_DIR}/{}-{n}", std::process::id())
}

/// The readiness probe's file (in staging, so a crash leaves it where start-up cleans).
pub fn readiness_probe() -> String {
    format!("{STAGING_DIR}/.readyz-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let d = Digest::of(b"x");
        let repo = RepoName::parse("internal/app").unwrap();
        assert_eq!(blob_path(&d), format!("blobs/sha256/{}/{}", &d.hex()[..2], d.hex()));
        assert_eq!(tag_entry("docker.io", &repo, "v1", true), "tags/docker.io/internal/app/_tags/v1/index");
        assert_eq!(repo_from_catalog_key(&catalog_entry(&repo)), Some("internal/app"));
        assert_eq!(classify_repo_key(&revision_link(&repo, &d)), RepoKey::Revision(d.hex()));
        assert_eq!(classify_repo_key(&layer_link(&repo, &d)), RepoKey::Layer(d.hex()));
        assert_eq!(classify_repo_key(&hosted_tag(&repo, "v1")), RepoKey::Other);
        assert_eq!(digest_from_hex(d.hex()), Some(d));
        let id = "0123456789abcdef0123456789abcdef";
        assert!(is_upload_id(id) && !is_upload_id("../x") && !is_upload_id(&id.to_uppercase()));
        let chunk = upload_chunk(id, 42, id);
        assert_eq!(chunk, format!("uploads/{id}/00000000000000000042-{id}"));
        assert_eq!(upload_of_chunk(&chunk), Some(id));
    }
}

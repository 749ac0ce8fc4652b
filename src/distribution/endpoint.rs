//! The endpoints of the registry API under `/v2/<name>/`, parsed from a path. One enum for the
//! proxied side and hosted namespaces alike.

/// The API endpoint a `/v2/<name>/...` path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `/manifests/<reference>`.
    Manifest(&'a str),
    /// `/blobs/<digest>`.
    Blob(&'a str),
    /// The upload session id after `/blobs/uploads/` (empty when starting one).
    Uploads(&'a str),
    /// `/tags/list`.
    Tags,
    /// `/referrers/<digest>`.
    Referrers(&'a str),
}

impl Endpoint<'_> {
    /// The bounded `route` label of request metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Manifest(_) => "manifest",
            Endpoint::Blob(_) => "blob",
            Endpoint::Uploads(_) => "upload",
            Endpoint::Tags => "tags",
            Endpoint::Referrers(_) => "other",
        }
    }
}

/// A `/v2/<name>/<endpoint>` path, split.
#[derive(Debug, PartialEq, Eq)]
pub struct Api<'a> {
    /// The repository name as sent (not yet validated).
    pub name: &'a str,
    /// What is asked of it.
    pub endpoint: Endpoint<'a>,
}

/// Splits `<name>/<endpoint>` at the LAST endpoint marker: names may contain `manifests` or
/// `blobs` as components, references never contain `/`.
pub fn split_api(rest: &str) -> Option<Api<'_>> {
    // Every way the path could end, with where its name ends; the last one wins, since names
    // may contain `blobs`, `manifests` or `uploads` as components but endpoints come last.
    let mut found: Vec<(usize, Api<'_>)> = Vec::new();
    if let Some(name) = rest.strip_suffix("/tags/list") {
        found.push((name.len(), Api { name, endpoint: Endpoint::Tags }));
    }
    if let Some(i) = rest.rfind("/blobs/uploads") {
        let tail = &rest[i + "/blobs/uploads".len()..];
        let id = tail.strip_prefix('/').unwrap_or(tail);
        if (tail.is_empty() || tail.starts_with('/')) && !id.contains('/') {
            found.push((i, Api { name: &rest[..i], endpoint: Endpoint::Uploads(id) }));
        }
    }
    for marker in ["/manifests/", "/blobs/", "/referrers/"] {
        let Some(i) = rest.rfind(marker) else { continue };
        let reference = &rest[i + marker.len()..];
        if reference.is_empty() || reference.contains('/') {
            continue;
        }
        let endpoint = match marker {
            "/manifests/" => Endpoint::Manifest(reference),
            "/blobs/" => Endpoint::Blob(reference),
            _ => Endpoint::Referrers(reference),
        };
        found.push((i, Api { name: &rest[..i], endpoint }));
    }
    // On a tie (`x/blobs/uploads`) the upload reading wins: it is pushed first.
    let best = found.iter().map(|(i, _)| *i).max()?;
    found.into_iter().find(|(i, _)| *i == best).map(|(_, api)| api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_may_contain_endpoint_words() {
        let api = split_api("a/blobs/uploads/b/manifests/x").unwrap();
        assert_eq!((api.name, api.endpoint), ("a/blobs/uploads/b", Endpoint::Manifest("x")));
        let api = split_api("a/blobs/uploads/b/blobs/uploads/").unwrap();
        assert_eq!((api.name, api.endpoint), ("a/blobs/uploads/b", Endpoint::Uploads("")));
        let api = split_api("a/tags/list/x/tags/list").unwrap();
        assert_eq!((api.name, api.endpoint), ("a/tags/list/x", Endpoint::Tags));
    }

    #[test]
    fn api_paths() {
        let d = "sha256:".to_owned() + &"a".repeat(64);
        assert_eq!(
            split_api("library/alpine/manifests/3.19"),
            Some(Api { name: "library/alpine", endpoint: Endpoint::Manifest("3.19") })
        );
        assert_eq!(
            split_api(&format!("a/blobs/b/blobs/{d}")),
            Some(Api { name: "a/blobs/b", endpoint: Endpoint::Blob(&d) })
        );
        assert_eq!(
            split_api("x/manifests/y/blobs/uploads/"),
            Some(Api { name: "x/manifests/y", endpoint: Endpoint::Uploads("") })
        );
        assert_eq!(split_api("a/blobs/uploads/abc").map(|a| a.endpoint), Some(Endpoint::Uploads("abc")));
        assert_eq!(split_api("a/tags/list").map(|a| a.endpoint), Some(Endpoint::Tags));
        assert_eq!(split_api("a/manifests/"), None);
        assert_eq!(split_api("a/manifests/x/y"), None);
        assert_eq!(split_api("nothing"), None);
    }
}

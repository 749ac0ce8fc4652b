//! Where a request for a repository goes: to a hosted namespace, or to which mirrored registry
//! and which repository on it.
//!
//! Hosted namespaces are decided first, on the name as sent: `ns=`, a host prefix or the
//! default registry never turn a hosted name into a proxied one (a push to `internal/app` must
//! not become a pull from Docker Hub). For the proxied side there are three ways in, in order: containerd's `?ns=<registry>` query parameter, a path prefix
//! (`/v2/ghcr.io/org/app/...`, for clients that cannot send `ns`), or the default registry
//! (Docker's `registry-mirrors`). Only configured registries are ever dialled: Ferry must not
//! become an open proxy to arbitrary hosts.

use std::collections::BTreeSet;

use crate::config::under;
use crate::distribution::{ErrorCode, ProtocolError, RepoName};

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Canonical registry name (a key of `registries:`).
    pub registry: String,
    /// Repository as the upstream knows it (e.g. `library/alpine` on docker.io).
    pub repo: RepoName,
}

/// Who answers a request for a repository name.
#[derive(Debug)]
pub enum Target {
    /// A hosted namespace: served from storage, never proxied.
    Hosted,
    /// A mirrored registry. The routing error (an unconfigured registry, an invalid name) is
    /// kept rather than returned at once: the caller checks credentials first, so that a client
    /// that may not pull learns nothing about which registries are mirrored.
    Proxied(Result<Route, ProtocolError>),
}

/// Maps request names to hosted namespaces and configured registries.
#[derive(Clone, Debug)]
pub struct Router {
    registries: BTreeSet<String>,
    default_registry: String,
    /// Hosted namespace prefixes (`hosted.namespaces`, when hosting is on).
    hosted: Vec<String>,
}

/// Docker Hub's canonical name; single-component names there live under `library/`.
pub const DOCKER_HUB: &str = "docker.io";

impl Router {
    /// A router over the configured registry names, with no hosted namespace.
    pub fn new(registries: impl IntoIterator<Item = String>, default_registry: &str) -> Router {
        Router {
            registries: registries.into_iter().collect(),
            default_registry: default_registry.to_owned(),
            hosted: Vec::new(),
        }
    }

    /// The same router, serving `namespaces` as hosted (`hosted.namespaces`).
    pub fn with_hosted(mut self, namespaces: Vec<String>) -> Router {
        self.hosted = namespaces;
        self
    }

    /// The hosted namespaces, as configured (for the refusal message of proxied namespaces).
    pub fn hosted_namespaces(&self) -> &[String] {
        &self.hosted
    }

    /// Whether a repository name (as sent) falls under a hosted namespace, matching whole path
    /// components (as `HostedConfig::namespace_of`).
    pub fn is_hosted(&self, raw: &str) -> bool {
        self.hosted.iter().any(|ns| under(raw, ns))
    }

    /// Who answers for the name from the URL path (`raw`) and the optional `ns` parameter.
    pub fn target(&self, raw: &str, ns: Option<&str>) -> Target {
        if self.is_hosted(raw) {
            return Target::Hosted;
        }
        Target::Proxied(self.route(raw, ns))
    }

    /// Resolves the name from the URL path (`raw`) and the optional `ns` query parameter.
    pub fn route(&self, raw: &str, ns: Option<&str>) -> Result<Route, ProtocolError> {
        let (first, rest) = raw.split_once('/').unwrap_or((raw, ""));
        let prefixed = !rest.is_empty() && looks_like_host(first);
        let (registry, name) = match (ns, prefixed) {
            (_, true) => (canonical(first), rest),
            (Some(ns), false) => (canonical(ns), raw),
            (None, false) => (self.default_registry.as_str(), raw),
        };
        if !self.registries.contains(registry) {
            // The configured registries are the operator's business, not an anonymous client's.
            return Err(ProtocolError::new(
                ErrorCode::NameUnknown,
                format!("registry {registry:?} is not mirrored here"),
            ));
        }
        let mut repo = RepoName::parse(name)?;
        if registry == DOCKER_HUB && repo.components() == 1 {
            repo = repo.with_prefix("library");
        }
        Ok(Route { registry: registry.to_owned(), repo })
    }
}

/// The Docker rule: a first component with a `.` or `:`, or `localhost`, is a registry host.
fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Docker Hub answers to several names; Ferry's config knows it as `docker.io`.
fn canonical(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
        h => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(["docker.io".to_owned(), "ghcr.io".to_owned(), "127.0.0.1:5001".to_owned()], "docker.io")
    }

    fn route(raw: &str, ns: Option<&str>) -> Result<(String, String), ErrorCode> {
        router().route(raw, ns).map(|r| (r.registry, r.repo.to_string())).map_err(|e| e.code)
    }

    #[test]
    fn routes() {
        assert_eq!(route("alpine", None), Ok(("docker.io".into(), "library/alpine".into())));
        assert_eq!(route("bitnami/redis", None), Ok(("docker.io".into(), "bitnami/redis".into())));
        assert_eq!(route("org/app", Some("ghcr.io")), Ok(("ghcr.io".into(), "org/app".into())));
        assert_eq!(route("ghcr.io/org/app", None), Ok(("ghcr.io".into(), "org/app".into())));
        assert_eq!(route("127.0.0.1:5001/app", None), Ok(("127.0.0.1:5001".into(), "app".into())));
        assert_eq!(route("alpine", Some("index.docker.io")), Ok(("docker.io".into(), "library/alpine".into())));
        assert_eq!(route("docker.io/alpine", None), Ok(("docker.io".into(), "library/alpine".into())));
    }

    #[test]
    fn hosted_names_are_decided_before_routing() {
        let r = router().with_hosted(vec!["internal".to_owned(), "team-a/app".to_owned()]);
        let hosted = |raw: &str, ns: Option<&str>| matches!(r.target(raw, ns), Target::Hosted);
        assert!(hosted("internal", None));
        assert!(hosted("internal/app", Some("ghcr.io")));
        assert!(hosted("team-a/app/x", None));
        assert!(!hosted("internalx/app", None));
        assert!(!hosted("team-a/other", None));
        assert!(!hosted("ghcr.io/internal/app", None));
        match r.target("alpine", None) {
            Target::Proxied(Ok(route)) => assert_eq!(route.repo.to_string(), "library/alpine"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(router().target("internal/app", None), Target::Proxied(Ok(_))));
    }

    #[test]
    fn unconfigured_registries_are_refused() {
        assert_eq!(route("x/y", Some("evil.example")), Err(ErrorCode::NameUnknown));
        assert_eq!(route("evil.example/x", None), Err(ErrorCode::NameUnknown));
        let Target::Proxied(Err(e)) = router().target("evil.example/x", None) else { panic!() };
        assert!(!e.message.contains("docker.io"), "the error lists no configured registry: {}", e.message);
        assert_eq!(route("Bad/Name", None), Err(ErrorCode::NameInvalid));
    }
}

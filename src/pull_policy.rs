//! What may be pulled through each mirrored registry (`registries.<name>.allow` / `deny`):
//! decided on the routed repository name before anything else (no upstream is contacted and no
//! cached content is served for a denied repository). Hosted namespaces are decided before
//! routing and never reach this.

use std::collections::{BTreeMap, HashMap};

use crate::config::{NamedGlobs, RegistryConfig};
use crate::distribution::{ErrorCode, ProtocolError};
use crate::registry::Route;

/// The allow and deny lists of every registry that has one.
#[derive(Debug, Default)]
pub struct PullPolicy {
    by_registry: HashMap<String, NamedGlobs>,
}

impl PullPolicy {
    /// From the validated `registries:` section (a glob that does not compile was refused by
    /// validation; here it would be skipped).
    pub fn new(registries: &BTreeMap<String, RegistryConfig>) -> PullPolicy {
        let by_registry = registries
            .iter()
            .filter_map(|(name, r)| Some((name.clone(), r.repository_globs().ok()?)))
            .filter(|(_, g)| !g.allow.is_empty() || !g.deny.is_empty())
            .collect();
        PullPolicy { by_registry }
    }

    /// `Ok` if `route`'s repository may be pulled; `DENIED` naming the rule otherwise. A
    /// deny rule wins over any allow rule.
    pub fn check(&self, route: &Route) -> Result<(), ProtocolError> {
        let Some(globs) = self.by_registry.get(&route.registry) else { return Ok(()) };
        let repo = route.repo.as_str();
        let at = |key: &str| format!("registries.{}.{key}", route.registry);
        if let Some((key, _)) = globs.deny.iter().find(|(_, g)| g.matches(repo)) {
            let msg = format!("{}/{repo} may not be pulled through this mirror: denied by {}", route.registry, at(key));
            return Err(ProtocolError::new(ErrorCode::Denied, msg));
        }
        if !globs.allow.is_empty() && !globs.allow.iter().any(|(_, g)| g.matches(repo)) {
            let msg =
                format!("{}/{repo} may not be pulled through this mirror: not in {}", route.registry, at("allow"));
            return Err(ProtocolError::new(ErrorCode::Denied, msg));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::RepoName;

    fn route(repo: &str) -> Route {
        Route { registry: "docker.io".into(), repo: RepoName::parse(repo).unwrap() }
    }

    #[test]
    fn deny_wins_and_allow_is_a_closed_list() {
        let config = RegistryConfig {
            allow: vec!["library/*".into(), "bitnami/*".into()],
            deny: vec!["*/cryptominer*".into()],
            ..RegistryConfig::default()
        };
        let policy = PullPolicy::new(&BTreeMap::from([("docker.io".to_owned(), config)]));
        assert!(policy.check(&route("library/nginx")).is_ok());
        assert!(policy.check(&route("bitnami/redis")).is_ok());
        let denied = policy.check(&route("library/cryptominer-x")).unwrap_err();
        assert_eq!(denied.code, ErrorCode::Denied);
        assert!(denied.message.contains("registries.docker.io.deny[0] = */cryptominer*"), "{}", denied.message);
        let outside = policy.check(&route("someone/app")).unwrap_err();
        assert!(outside.message.contains("not in registries.docker.io.allow"), "{}", outside.message);
        let other = Route { registry: "ghcr.io".into(), repo: RepoName::parse("someone/app").unwrap() };
        assert!(policy.check(&other).is_ok(), "a registry without lists allows everything");
    }
}

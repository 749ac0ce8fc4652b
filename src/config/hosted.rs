//! `hosted:` — private namespaces that accept pushes, their users and rules, and how clients
//! are challenged for credentials.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `hosted:` — private namespaces where `docker push` works.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostedConfig {
    /// Repository prefixes served as a registry (`internal` covers `internal` and `internal/...`).
    pub namespaces: Vec<String>,
    /// htpasswd file with bcrypt entries (`htpasswd -B`): the users of hosted namespaces.
    pub htpasswd: Option<PathBuf>,
    /// May clients without credentials pull hosted images?
    pub anonymous_pull: bool,
    /// Allow `DELETE` of manifests and blobs (space is reclaimed by `ferry gc`).
    pub delete: bool,
    /// Who may do what where. Empty: every htpasswd user may pull, push and delete everywhere.
    pub rules: Vec<AccessRule>,
    /// htpasswd users who may use the admin endpoints (`ferry cache forget`). With an htpasswd
    /// file and nobody named here, the admin endpoints refuse everyone; without an htpasswd
    /// file they are open to whoever reaches the port (like `/metrics`).
    pub admins: Vec<String>,
    /// Require htpasswd credentials for proxied namespaces too (gateways beyond a trusted network).
    pub proxied_requires_auth: bool,
    /// Upload sessions idle longer than this are purged with their data.
    #[serde(with = "humantime_serde")]
    pub upload_max_age: Duration,
    /// How clients are challenged: `bearer` (default; Ferry's token endpoint, as Docker Hub and
    /// Harbor do, so Docker can still pull proxied images anonymously) or `basic` (plain
    /// Basic auth; Docker clients must then `docker login` even to pull through the mirror).
    pub challenge: ChallengeKind,
    /// The token endpoint's URL as clients reach it (behind a reverse proxy); default: built
    /// from each request's Host and Ferry's scheme.
    pub token_realm: Option<String>,
}

/// How unauthenticated clients are challenged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeKind {
    /// `Bearer realm=<token endpoint>`: anonymous tokens for anonymous clients.
    #[default]
    Bearer,
    /// `Basic realm="ferry"`.
    Basic,
}

impl Default for HostedConfig {
    fn default() -> Self {
        HostedConfig {
            namespaces: Vec::new(),
            htpasswd: None,
            anonymous_pull: false,
            delete: false,
            rules: Vec::new(),
            admins: Vec::new(),
            proxied_requires_auth: false,
            upload_max_age: Duration::from_secs(24 * 3600),
            challenge: ChallengeKind::Bearer,
            token_realm: None,
        }
    }
}

/// What a rule grants, each level including the ones before it (Harbor's guest, developer and
/// maintainer roles; Distribution's `pull`, `push`, `delete` actions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read manifests, blobs, tags, referrers.
    Pull,
    /// Pull, plus upload blobs and put manifests (tags move).
    Push,
    /// Push, plus delete manifests, tags and blobs (when `hosted.delete` is on).
    Delete,
}

/// One row of the rules table: `{namespace: team-a, users: [alice], access: push}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A hosted namespace or a repository path under one (`team-a`, `team-a/app`).
    pub namespace: String,
    /// htpasswd users, or `"*"` for every authenticated user.
    pub users: Vec<String>,
    /// `pull`, `push` or `delete`.
    pub access: Access,
}

impl HostedConfig {
    /// The configured namespace `repo` falls under, if any (matching whole path components).
    pub fn namespace_of(&self, repo: &str) -> Option<&str> {
        self.namespaces.iter().map(String::as_str).find(|ns| under(repo, ns))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, ns) in self.namespaces.iter().enumerate() {
            let at = format!("hosted.namespaces[{i}]");
            if crate::distribution::RepoName::parse(ns).is_err() {
                return Err(ConfigError::new(
                    at,
                    format!("{ns:?} is not a repository path such as internal or team-a"),
                ));
            }
            if self.namespaces[..i].iter().any(|o| under(ns, o) || under(o, ns)) {
                return Err(ConfigError::new(at, format!("{ns:?} overlaps another namespace")));
            }
        }
        if !self.namespaces.is_empty() && self.htpasswd.is_none() {
            return Err(ConfigError::new("hosted.htpasswd", "hosted namespaces need an htpasswd file (htpasswd -B)"));
        }
        if !self.admins.is_empty() && self.htpasswd.is_none() {
            return Err(ConfigError::new("hosted.admins", "admin users need an htpasswd file"));
        }
        if self.proxied_requires_auth && self.htpasswd.is_none() {
            return Err(ConfigError::new("hosted.htpasswd", "proxied_requires_auth needs an htpasswd file"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("hosted.rules[{i}]");
            if self.namespace_of(&rule.namespace).is_none() {
                return Err(ConfigError::new(
                    format!("{at}.namespace"),
                    format!("{:?} is not under any of hosted.namespaces", rule.namespace),
                ));
            }
            if rule.users.is_empty() {
                return Err(ConfigError::new(format!("{at}.users"), "name at least one user, or \"*\""));
            }
        }
        if self.upload_max_age.is_zero() {
            return Err(ConfigError::new("hosted.upload_max_age", "must be more than zero"));
        }
        Ok(())
    }
}

/// Whether repository path `repo` is `prefix` or lies under it, by whole components.
pub fn under(repo: &str, prefix: &str) -> bool {
    repo == prefix || repo.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::super::tests::error_at;
    use super::super::Config;
    use super::Access;

    #[test]
    fn hosted_section() {
        let c = Config::from_yaml(
            "hosted:\n  namespaces: [internal, team-a]\n  htpasswd: /x\n  rules: [{namespace: team-a, users: [alice], access: push}]\n",
        )
        .unwrap();
        assert_eq!(c.hosted.namespace_of("team-a/x/y"), Some("team-a"));
        assert_eq!(c.hosted.namespace_of("internal"), Some("internal"));
        assert_eq!(c.hosted.namespace_of("internalx/y"), None);
        assert_eq!(c.hosted.rules[0].access, Access::Push);
        assert_eq!(error_at("hosted:\n  namespaces: [internal]\n").path, "hosted.htpasswd");
        assert_eq!(error_at("hosted:\n  namespaces: [a, a/b]\n  htpasswd: /x\n").path, "hosted.namespaces[1]");
        assert_eq!(error_at("hosted:\n  namespaces: [Bad]\n  htpasswd: /x\n").path, "hosted.namespaces[0]");
        let e = error_at(
            "hosted:\n  namespaces: [a]\n  htpasswd: /x\n  rules: [{namespace: b, users: [u], access: pull}]\n",
        );
        assert_eq!(e.path, "hosted.rules[0].namespace");
        let e = error_at("hosted:\n  rules: [{namespace: a, users: [u], access: admin}]\n");
        assert!(e.path.starts_with("hosted.rules[0]"), "{e}");
    }
}

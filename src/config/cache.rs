//! `cache:` — the in-memory metadata tier and how long what a tag says is trusted: one TTL for
//! all, or per image by policy (release tags rarely move, `latest` often does).

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `cache:` — the in-memory metadata tier and tag freshness.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a tag→digest answer is trusted before one `HEAD` revalidates it (unless a
    /// policy says otherwise).
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Per-image TTLs: the first policy whose glob matches `registry/repository:tag` wins.
    pub tag_policies: Vec<TagPolicy>,
    /// How old a tag answer may be and still be served when no upstream answers.
    #[serde(with = "humantime_serde")]
    pub serve_stale: Duration,
    /// When the resolving upstream answers 404 for a tag Ferry knows, serve the last good
    /// digest instead of passing the 404 on (an image deleted upstream that clusters still run).
    pub keep_deleted_tags: bool,
    /// Memory for cached manifest bodies (the fast tier; disk keeps the record).
    pub memory: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(300),
            tag_policies: Vec::new(),
            serve_stale: Duration::from_secs(7 * 24 * 3600),
            keep_deleted_tags: false,
            memory: ByteSize::mib(64),
        }
    }
}

/// One row of `cache.tag_policies`: `{match: "*:latest", ttl: "1m"}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagPolicy {
    /// A glob on `registry/repository:tag` (`*`, `?`, `[0-9]`; `*` crosses `/`), with the
    /// repository as the upstream knows it (`docker.io/library/nginx:1.27`).
    pub r#match: String,
    /// How long such a tag is trusted.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

/// The longest TTL a policy may set: a year. Longer is "never", which a mutable tag never is.
const MAX_TAG_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

impl CacheConfig {
    /// The compiled policies, in order. Fails on a malformed glob only if [`Self::validate`]
    /// was skipped.
    pub fn compiled_policies(&self) -> Result<Vec<(glob::Pattern, Duration)>, ConfigError> {
        self.tag_policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                glob::Pattern::new(&p.r#match).map(|g| (g, p.ttl)).map_err(|e| {
                    ConfigError::new(
                        format!("cache.tag_policies[{i}].match"),
                        format!("{:?} is not a glob: {} at character {}", p.r#match, e.msg, e.pos),
                    )
                })
            })
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.compiled_policies()?;
        for (i, p) in self.tag_policies.iter().enumerate() {
            if p.ttl > MAX_TAG_TTL {
                return Err(ConfigError::new(format!("cache.tag_policies[{i}].ttl"), "at most a year (366d)"));
            }
            if p.r#match.is_empty() {
                return Err(ConfigError::new(format!("cache.tag_policies[{i}].match"), "must not be empty"));
            }
        }
        if self.tag_ttl > MAX_TAG_TTL {
            return Err(ConfigError::new("cache.tag_ttl", "at most a year (366d)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::error_at;

    #[test]
    fn a_malformed_policy_glob_names_its_key() {
        let e = error_at("cache:\n  tag_policies:\n    - {match: \"*:latest\", ttl: 1m}\n    - {match: \"docker.io/[0-9\", ttl: 1h}\n");
        assert_eq!(e.path, "cache.tag_policies[1].match");
        assert!(e.message.contains("not a glob"), "{}", e.message);
        let e = error_at("cache:\n  tag_policies:\n    - {match: \"*\", ttl: 400d}\n");
        assert_eq!(e.path, "cache.tag_policies[0].ttl");
        let e = error_at("cache:\n  tag_policies:\n    - {match: \"*\"}\n");
        assert!(e.path.starts_with("cache.tag_policies"), "{}", e.path);
    }
}

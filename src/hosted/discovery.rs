//! Discovery: tag lists and the catalog (both paginated with `n`/`last` and a `Link` to the next
//! page), and referrers of a subject manifest.

use super::{query_param, Hosted};
use crate::auth::{unauthorized, Identity};
use crate::distribution::{Answer, Digest, ErrorCode, ProtocolError, RepoName, OCI_INDEX};
use crate::storage::layout;

/// `n` and `last` of a paginated list.
struct Page {
    n: Option<usize>,
    last: Option<String>,
}

impl Page {
    fn parse(query: Option<&str>) -> Result<Page, ProtocolError> {
        let n = match query_param(query, "n") {
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                ProtocolError::new(ErrorCode::Unsupported, format!("n={n:?} is not a non-negative integer"))
            })?),
            None => None,
        };
        Ok(Page { n, last: query_param(query, "last") })
    }

    /// The page of sorted `items` and, if more follow, the `last` value for the next page.
    fn apply(&self, items: Vec<String>) -> (Vec<String>, Option<String>) {
        let start = match &self.last {
            Some(last) => items.partition_point(|t| t.as_str() <= last.as_str()),
            None => 0,
        };
        let rest = &items[start..];
        match self.n {
            Some(n) if rest.len() > n => {
                let page = rest[..n].to_vec();
                let next = if n == 0 { None } else { page.last().cloned() };
                (page, next)
            }
            _ => (rest.to_vec(), None),
        }
    }

    /// The JSON answer for this page of sorted `items` (`document` wraps the page), with a
    /// `Link` to the next page of `path` when more follow.
    fn answer(
        &self,
        items: Vec<String>,
        path: &str,
        document: impl FnOnce(Vec<String>) -> serde_json::Value,
        head: bool,
    ) -> Answer {
        let (items, next) = self.apply(items);
        let mut r = Answer::json("application/json", document(items).to_string(), head);
        if let (Answer::Json { next: link, .. }, Some(last), Some(n)) = (&mut r, next, self.n) {
            let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
            *link = Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""));
        }
        r
    }
}

impl Hosted {
    pub(super) async fn tags(&self, repo: &RepoName, query: Option<&str>, head: bool) -> Result<Answer, ProtocolError> {
        if !self.exists(&layout::catalog_entry(repo)).await? {
            return Err(ProtocolError::new(ErrorCode::NameUnknown, format!("repository {repo} is unknown")));
        }
        let page = Page::parse(query)?;
        let prefix = layout::tags_dir(repo);
        let mut tags: Vec<String> =
            self.list(&prefix).await?.into_iter().filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned)).collect();
        tags.sort();
        let path = format!("/v2/{repo}/tags/list");
        Ok(page.answer(tags, &path, |tags| serde_json::json!({ "name": repo.as_str(), "tags": tags }), head))
    }

    pub(super) async fn referrers(
        &self,
        repo: &RepoName,
        d: &str,
        query: Option<&str>,
        head: bool,
    ) -> Result<Answer, ProtocolError> {
        let subject = Digest::parse(d)?;
        let filter = query_param(query, "artifactType");
        let mut manifests = Vec::new();
        for key in self.list(&layout::referrers_dir(repo, &subject)).await? {
            let Some(bytes) = self.get(&key, "cannot read referrer").await? else { continue };
            let Ok(desc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if filter.as_deref().is_none_or(|f| desc["artifactType"].as_str() == Some(f)) {
                manifests.push(desc);
            }
        }
        let body = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let mut r = Answer::json(OCI_INDEX, body.to_string(), head);
        if let (Answer::Json { filters_applied, .. }, Some(_)) = (&mut r, &filter) {
            *filters_applied = Some("artifactType");
        }
        Ok(r)
    }

    /// `GET /v2/_catalog`: the hosted repositories `who` may pull, paginated like tags.
    pub async fn catalog(&self, who: &Identity, query: Option<&str>, head: bool) -> Result<Answer, ProtocolError> {
        if *who == Identity::Anonymous && self.auth.access(who, "").is_none() {
            return Err(unauthorized("authentication required to list repositories"));
        }
        let page = Page::parse(query)?;
        let mut repos: Vec<String> = self
            .list(layout::CATALOG_PREFIX)
            .await?
            .into_iter()
            .filter_map(|k| layout::repo_from_catalog_key(&k).map(str::to_owned))
            .filter(|repo| self.auth.access(who, repo).is_some())
            .collect();
        // By name, not by storage key: `a/b` sorts after `a-b` though `a/b/_repo` does not.
        repos.sort();
        Ok(page.answer(repos, "/v2/_catalog", |repos| serde_json::json!({ "repositories": repos }), head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let p = |q: &str| Page::parse(Some(q)).unwrap().apply(items.clone());
        assert_eq!(p("n=2"), (vec!["a".to_string(), "b".into()], Some("b".into())));
        assert_eq!(p("n=2&last=b"), (vec!["c".to_string(), "d".into()], None));
        assert_eq!(p("last=c"), (vec!["d".to_string()], None));
        assert_eq!(p("n=0"), (vec![], None));
        assert_eq!(p("n=10"), (items.clone(), None));
        assert!(Page::parse(Some("n=x")).is_err());
    }
}

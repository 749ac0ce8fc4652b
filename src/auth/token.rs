//! Ferry's bearer tokens, scoped like Docker Hub's and Distribution's: a client asks
//! `/auth/token?scope=repository:team-a/app:pull,push`, gets what it asked for intersected with
//! what its rules allow, and every request is checked against that signed grant. A leaked pull
//! token therefore opens one repository for reading, for five minutes, and nothing else.
//!
//! Wire form: `base64url(JSON claims) . base64url(HMAC-SHA256(claims))`, keyed per process.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::Access;

/// Longest scope list a token request may carry (a bound on the token's size and work).
pub const MAX_SCOPES: usize = 32;

/// What one repository grant allows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actions {
    /// `pull`.
    pub pull: bool,
    /// `push`.
    pub push: bool,
    /// `delete`.
    pub delete: bool,
}

impl Actions {
    /// Parses Docker's action list (`pull,push`, `*`); unknown actions are ignored.
    pub fn parse(list: &str) -> Actions {
        let mut a = Actions::default();
        for action in list.split(',').map(str::trim) {
            match action {
                "pull" => a.pull = true,
                "push" => a.push = true,
                "delete" => a.delete = true,
                "*" => a = Actions { pull: true, push: true, delete: true },
                _ => {}
            }
        }
        a
    }

    /// The actions of `self` that `allowed` permits.
    pub fn within(&self, allowed: Option<Access>) -> Actions {
        let at_least = |need| allowed.is_some_and(|a| a >= need);
        Actions {
            pull: self.pull && at_least(Access::Pull),
            push: self.push && at_least(Access::Push),
            delete: self.delete && at_least(Access::Delete),
        }
    }

    /// The highest level these actions cover, counting from pull (the rules' ordering).
    pub fn level(&self) -> Option<Access> {
        match (self.pull, self.push, self.delete) {
            (true, true, true) => Some(Access::Delete),
            (true, true, false) => Some(Access::Push),
            (true, false, _) => Some(Access::Pull),
            _ => None,
        }
    }

    /// Docker's spelling, for the token response's `access` list.
    pub fn names(&self) -> Vec<&'static str> {
        [(self.pull, "pull"), (self.push, "push"), (self.delete, "delete")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// A requested or granted repository scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The repository name as clients send it.
    pub name: String,
    /// What may be done there.
    pub actions: Actions,
}

/// Parses the `scope` parameters of a token request (`repository:<name>:<actions>`, several per
/// parameter separated by spaces, as Docker sends them). Other resource types and malformed
/// scopes are ignored: they are never granted.
pub fn requested_scopes(query: Option<&str>) -> Vec<Grant> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|scope| {
            // The name may hold a `:` (a registry host with a port), the actions never do.
            let rest = scope.strip_prefix("repository:")?;
            let (name, actions) = rest.rsplit_once(':')?;
            (!name.is_empty()).then(|| Grant { name: name.to_owned(), actions: Actions::parse(actions) })
        })
        .take(MAX_SCOPES)
        .collect()
}

/// What a token says: who, until when, and what it grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user, or `None` for an anonymous token.
    #[serde(rename = "sub")]
    pub user: Option<String>,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "exp")]
    pub expires: u64,
    /// Granted repository scopes.
    #[serde(rename = "access")]
    pub grants: Vec<Grant>,
}

impl Claims {
    /// What the token grants on `repo` (`None`: nothing).
    pub fn on(&self, repo: &str) -> Option<&Actions> {
        self.grants.iter().find(|g| g.name == repo).map(|g| &g.actions)
    }
}

/// Signs `claims` with `mac` (an HMAC over the encoded claims).
pub fn encode(claims: &Claims, mac: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    format!("{}.{}", b64.encode(&payload), b64.encode(mac(&payload)))
}

/// The claims of a token whose signature `verify` accepts and that has not expired at `now`.
pub fn decode(token: &str, now: u64, verify: impl Fn(&[u8], &[u8]) -> bool) -> Option<Claims> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, sig) = token.split_once('.')?;
    let (payload, sig) = (b64.decode(payload).ok()?, b64.decode(sig).ok()?);
    if !verify(&payload, &sig) {
        return None;
    }
    let claims: Claims = serde_json::from_slice(&payload).ok()?;
    (claims.expires >= now).then_some(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let q = "service=ferry&scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush%20repository%3A127.0.0.1%3A5000%2Fx%3Apull&scope=registry%3Acatalog%3A*&scope=repository%3Ab%3A*";
        let s = requested_scopes(Some(q));
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].name.as_str(), s[0].actions.names()), ("team-a/app", vec!["pull", "push"]));
        assert_eq!(s[1].name, "127.0.0.1:5000/x");
        assert_eq!(s[2].actions.names(), vec!["pull", "push", "delete"]);
        assert!(requested_scopes(Some("scope=repository%3A%3Apull")).is_empty());
        assert!(requested_scopes(None).is_empty());
    }

    #[test]
    fn grants_never_exceed_the_rules() {
        let asked = Actions::parse("pull,push,delete");
        assert_eq!(asked.within(Some(Access::Pull)).names(), vec!["pull"]);
        assert_eq!(asked.within(None).level(), None);
        assert_eq!(asked.within(Some(Access::Push)).level(), Some(Access::Push));
    }
}

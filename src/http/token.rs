//! Ferry's token endpoint (`hosted.challenge: bearer`) and the challenge a 401 carries.
//!
//! Docker cannot pull anonymously from a registry that challenges with Basic, so by default
//! Ferry challenges with Bearer, as Docker Hub and Harbor do, and gives anonymous clients
//! anonymous tokens. A token says who the client is; what it may do is decided per request.

use http::header::{self, HeaderValue};
use http::{Request, Response};

use super::{response, Body};
use crate::app::App;
use crate::auth::{requested_scopes, Actions, Auth, Identity, CHALLENGE, TOKEN_PATH, TOKEN_SERVICE, TOKEN_TTL};
use crate::config::ChallengeKind;
use crate::distribution::Answer;
use crate::registry::Router;

/// The `WWW-Authenticate` value a 401 to `req` carries. Bearer (the default) points at
/// Ferry's token endpoint; the token endpoint itself challenges with Basic, since it takes
/// Basic credentials (a Bearer challenge there would send the client round in a circle).
pub(super) fn challenge_for<B>(app: &App, req: &Request<B>) -> HeaderValue {
    if app.challenge == ChallengeKind::Basic || req.uri().path() == TOKEN_PATH {
        return HeaderValue::from_static(CHALLENGE);
    }
    let realm = match &app.token_realm {
        Some(r) => r.clone(),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .unwrap_or("localhost");
            format!("{}://{host}{TOKEN_PATH}", app.scheme)
        }
    };
    HeaderValue::from_str(&format!("Bearer realm=\"{realm}\",service=\"{TOKEN_SERVICE}\""))
        .unwrap_or_else(|_| HeaderValue::from_static(CHALLENGE))
}

/// The token for `who` granting the scopes the request asks for, as far as the rules allow
/// (never cached by proxies). The `access` list says what was granted, as Docker Hub's does.
pub(super) fn issue(auth: &Auth, who: &Identity, query: Option<&str>) -> Response<Body> {
    let (token, claims) = auth.issue_token(who, &requested_scopes(query));
    let access: Vec<serde_json::Value> = claims
        .grants
        .iter()
        .map(|g| serde_json::json!({ "type": "repository", "name": g.name, "actions": g.actions.names() }))
        .collect();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_TTL.as_secs(),
        "access": access,
    })
    .to_string();
    let mut answer = Answer::json("application/json", body, false);
    if let Answer::Json { no_store, .. } = &mut answer {
        *no_store = true;
    }
    response::render(answer)
}

/// Whether a token request asks (at least once) and only asks to pull proxied repositories.
pub(super) fn only_proxied_pulls(router: &Router, query: Option<&str>) -> bool {
    let scopes = requested_scopes(query);
    let asked = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).count())
        .sum::<usize>();
    // Every scope asked must be a repository pull (a scope that did not parse is not one).
    !scopes.is_empty()
        && scopes.len() == asked
        && scopes.iter().all(|g| g.actions == Actions::parse("pull") && !router.is_hosted(&g.name))
}

//! Ferry's token endpoint (`hosted.challenge: bearer`) and the challenge a 401 carries.
//!
//! Docker cannot pull anonymously from a registry that challenges with Basic, so by default
//! Ferry challenges with Bearer, as Docker Hub and Harbor do, and gives anonymous clients
//! anonymous tokens. A token says who the client is; what it may do is decided per request.

use http::header::{self, HeaderValue};
use http::{Request, Response};

use super::{response, Body};
use crate::app::App;
use crate::auth::{Auth, Identity, CHALLENGE, TOKEN_PATH, TOKEN_SERVICE, TOKEN_TTL};
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

/// The token for `who`, as the token endpoint answers it (never cached by proxies).
pub(super) fn issue(auth: &Auth, who: &Identity) -> Response<Body> {
    let token = auth.issue_token(who);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_TTL.as_secs(),
    })
    .to_string();
    let mut answer = Answer::json("application/json", body, false);
    if let Answer::Json { no_store, .. } = &mut answer {
        *no_store = true;
    }
    response::render(answer)
}

/// Whether a token request's scopes (at least one) all ask only to pull proxied repositories.
pub(super) fn only_proxied_pulls(router: &Router, query: Option<&str>) -> bool {
    let scopes: Vec<String> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    !scopes.is_empty()
        && scopes.iter().all(|scope| {
            let mut parts = scope.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("repository"), Some(name), Some(actions)) => {
                    actions.split(',').all(|a| a == "pull") && !router.is_hosted(name)
                }
                _ => false,
            }
        })
}

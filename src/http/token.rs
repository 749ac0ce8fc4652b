//! Ferry's token endpoint (`hosted.challenge: bearer`) and the challenge a 401 carries.
//!
//! Docker cannot pull anonymously from a registry that challenges with Basic, so by default
//! Ferry challenges with Bearer, as Docker Hub and Harbor do, and gives anonymous clients
//! anonymous tokens. A token says who the client is; what it may do is decided per request.

use http::header::{self, HeaderValue};
use http::{Request, Response};

use super::listener::ListenerAddr;
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
            // The client's Host names Ferry as the client reached it; anything that is not a
            // plain host[:port] (`evil",service="x`) is never copied into the challenge.
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .filter(|h| valid_host(h))
                .map(str::to_owned)
                .or_else(|| req.extensions().get::<ListenerAddr>().map(|a| a.0.to_string()))
                .unwrap_or_else(|| "localhost".to_owned());
            format!("{}://{host}{TOKEN_PATH}", app.scheme)
        }
    };
    HeaderValue::from_str(&format!("Bearer realm=\"{realm}\",service=\"{TOKEN_SERVICE}\""))
        .unwrap_or_else(|_| HeaderValue::from_static(CHALLENGE))
}

/// A `Host` value Ferry may repeat: a DNS name or IPv4 address, or a bracketed IPv6 address,
/// with an optional port.
fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (h, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    host_ok && port_ok
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["ferry.example:5000", "127.0.0.1:5000", "[::1]:5000", "localhost", "[fe80::1]"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in ["evil\",service=\"x", "a b", "", "x:", "x:123456", "[::1", "::1", "h/x", "a@b"] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}

//! What each request is answered with: one function per endpoint family — the ping, the
//! catalog, the token endpoint (in [`super::token`]), the operations endpoints, hosted
//! namespaces, proxied manifests and proxied blobs. Errors stay [`ProtocolError`]s until
//! [`handle`] renders them, once, through [`response`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::TryStreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::access_log::{self, AccessLog};
use super::{response, token, Body};
use crate::app::App;
use crate::auth::{unauthorized, Auth, Identity, TOKEN_PATH};
use crate::cluster::{peer, Cluster};
use crate::distribution::{accept_list, range_header, split_api, Answer, Api, Digest, Endpoint};
use crate::distribution::{ErrorCode, ProtocolError, Reference, Source};
use crate::hosted::{Hosted, HostedRequest};
use crate::registry::{Route, Target};

/// A handler's outcome: the response and where its content came from, or the error to render.
type Handled = Result<(Response<Body>, Option<Source>), ProtocolError>;

/// Answers one request. Never fails: errors become the spec's JSON.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let challenge = token::challenge_for(&app, &req);
    let sent_body = sends_body(&req);
    let (route, handled) = dispatch(&app, req, client).await;
    let (mut resp, source) = match handled {
        Ok(ok) => ok,
        Err(e) => (response::error(&e, method == Method::HEAD, &challenge), None),
    };
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    if sent_body && resp.status().as_u16() >= 400 {
        // A refusal may come before the body was read (a 401 to a PUT, a 416 to an
        // out-of-order PATCH); hyper then closes the HTTP/1 connection, and a client that
        // reuses it (Go's, in Docker and containerd) fails with EOF. Saying so lets it open
        // a new one.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let log = AccessLog { metrics: app.metrics.clone(), method, path, route, source, client, started };
    access_log::track(resp, log)
}

/// Whether an HTTP/1 request carries a body (HTTP/2 has no connection to close: a stream
/// reset ends just that request, and `Connection` is not allowed there).
fn sends_body<B>(req: &Request<B>) -> bool {
    let h1 = matches!(req.version(), http::Version::HTTP_10 | http::Version::HTTP_11);
    let length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    h1 && (length.is_some_and(|l| l > 0) || req.headers().contains_key(header::TRANSFER_ENCODING))
}

/// Picks the endpoint family; returns the `route` metrics label with the outcome.
async fn dispatch(app: &App, req: Request<Incoming>, client: SocketAddr) -> (&'static str, Handled) {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let path = req.uri().path();
    let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
    // Not yet an error: what bad credentials mean depends on where the request goes.
    let authn = authenticate(app, &req, client).await;
    // Paths that are no endpoint for this method or configuration fall through to the API
    // split below, which answers them with "no such endpoint".
    match path {
        "/v2" | "/v2/" if read_only => return ("other", ping(app, &req, authn)),
        "/v2/_catalog" if read_only => {
            if let Some(hosted) = &app.hosted {
                return ("other", catalog(hosted, &req, authn).await);
            }
        }
        TOKEN_PATH if read_only => {
            if let Some(auth) = &app.auth {
                return ("other", token_request(app, auth, &req, authn));
            }
        }
        "/healthz" | "/readyz" | "/metrics" => return ("other", Ok((operations(app, path).await, None))),
        _ => {}
    }
    if super::admin::is_admin_path(path) {
        return ("other", super::admin::handle(app, &req, authn).await.map(|r| (r, None)));
    }
    if let (CLUSTER_VIEW_PATH, Some(cluster), true) = (path, &app.cluster, read_only) {
        return ("other", Ok((cluster_view(cluster).await, None)));
    }
    if let (Some(digest), Some(cluster)) = (path.strip_prefix(peer::PATH), &app.cluster) {
        if read_only {
            return ("peer", for_peer(app, cluster, &req, digest).await);
        }
    }
    let Some(api) = path.strip_prefix("/v2/").and_then(split_api) else {
        return ("other", Err(no_endpoint(path)));
    };
    let label = api.endpoint.label();
    let ns = query_param(req.uri().query(), "ns");
    let handled = match (app.router.target(api.name, ns.as_deref()), &app.hosted) {
        (Target::Hosted, Some(hosted)) => hosted_request(hosted, &req, api, authn, body).await,
        (Target::Proxied(route), _) => proxied(app, &req, api, authn, route).await,
        // Cannot happen: App::new gives the router hosted namespaces only with a Hosted.
        (Target::Hosted, None) => Err(no_endpoint(path)),
    };
    (label, handled)
}

/// Who sent the request, for paths where credentials mean something (`/v2/...`, the token
/// endpoint and the admin endpoints, with an htpasswd file); anonymous everywhere else.
async fn authenticate(app: &App, req: &Request<()>, client: SocketAddr) -> Result<Identity, ProtocolError> {
    let path = req.uri().path();
    match (&app.auth, path.starts_with("/v2") || path == TOKEN_PATH || super::admin::is_admin_path(path)) {
        (Some(auth), true) => auth.authenticate(req.headers(), client).await,
        _ => Ok(Identity::Anonymous),
    }
}

/// The one rule for proxied content: Docker sends the credentials it has for the registry it
/// mirrors (its Docker Hub login) to a mirror that challenged it, so credentials that are not
/// ours count as anonymous — unless proxied namespaces require credentials
/// (`hosted.proxied_requires_auth`), where the failure stands. Used for proxied requests and
/// for token requests that only pull proxied repositories.
fn as_proxied(auth: &Auth, authn: Result<Identity, ProtocolError>) -> Result<Identity, ProtocolError> {
    match authn {
        Err(e) if auth.check_proxied(&Identity::Anonymous).is_err() => Err(e),
        Err(_) => Ok(Identity::Anonymous),
        ok => ok,
    }
}

/// `/v2/`. With credentials configured, an anonymous ping gets the challenge: Docker and
/// containers/image send Basic credentials only to registries that asked at /v2/. Anonymous
/// pulls of proxied images still work (clients treat this 401 as a hint). Wrong credentials
/// fail here too, so `docker login` reports them. A client that presents a token we issued
/// (an anonymous one included) or skopeo's empty Basic credentials has done its part: it may
/// ping.
fn ping(app: &App, req: &Request<()>, authn: Result<Identity, ProtocolError>) -> Handled {
    if app.auth.is_some() && (authn.is_err() || !req.headers().contains_key(header::AUTHORIZATION)) {
        return Err(authn.err().unwrap_or_else(|| unauthorized("authentication required")));
    }
    let ping = Answer::json("application/json", "{}", req.method() == Method::HEAD);
    Ok((response::render(ping), None))
}

/// The token endpoint. Anonymous clients get anonymous tokens; wrong credentials get 401
/// (`docker login` reports them). Docker asks with whatever credentials it has for the
/// registry it mirrors: for pulls of proxied repositories only, those count as anonymous, by
/// the proxied rule ([`as_proxied`]). A login (no scope) or any hosted or push scope still
/// gets the 401. What a token may do is decided per request by the rules.
fn token_request(app: &App, auth: &Auth, req: &Request<()>, authn: Result<Identity, ProtocolError>) -> Handled {
    let authn = match token::only_proxied_pulls(&app.router, req.uri().query()) {
        true => as_proxied(auth, authn),
        false => authn,
    };
    Ok((token::issue(auth, &authn?, req.uri().query()), None))
}

/// `/v2/_catalog`: the hosted repositories the client may pull.
async fn catalog(hosted: &Hosted, req: &Request<()>, authn: Result<Identity, ProtocolError>) -> Handled {
    let who = authn?;
    let reply = hosted.catalog(&who, req.uri().query(), req.method() == Method::HEAD).await;
    reply.map(|r| (response::render(r), None))
}

/// `/healthz`, `/readyz` and `/metrics`, for any method and without credentials.
async fn operations(app: &App, path: &str) -> Response<Body> {
    match path {
        "/readyz" if app.storage.probe().await.is_ok() => match app.storage.degraded().await {
            None => response::text(StatusCode::OK, "ready\n"),
            Some(why) => response::text(StatusCode::OK, format!("ready, degraded: {why}\n")),
        },
        "/readyz" => response::text(StatusCode::SERVICE_UNAVAILABLE, "storage is not writable\n"),
        "/metrics" => {
            let mut r = response::text(StatusCode::OK, app.metrics.render());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        _ => response::text(StatusCode::OK, "ok\n"),
    }
}

/// Where a replica of a cluster says what the cluster is doing (`ferry cache stats --server`).
pub const CLUSTER_VIEW_PATH: &str = "/_ferry/cluster";

/// `GET /_ferry/cluster`: whether this replica works alone, the bytes cached in the bucket and
/// the fetches in progress per owner (counts and replica URLs, never digests or names).
async fn cluster_view(cluster: &Cluster) -> Response<Body> {
    let fetches = cluster.fetches_by_owner().await;
    let cached = cluster.lru_total().await;
    let view = serde_json::json!({
        "advertise": cluster.advertise(),
        "degraded": cluster.is_degraded(),
        "cached_bytes": cached,
        "fetches_by_owner": fetches,
    });
    let mut r = response::text(StatusCode::OK, view.to_string());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A request for a repository under a hosted namespace: credentials must be ours.
async fn hosted_request(
    hosted: &Hosted,
    req: &Request<()>,
    api: Api<'_>,
    authn: Result<Identity, ProtocolError>,
    body: Incoming,
) -> Handled {
    let who = authn?;
    let body: crate::storage::ByteStream = Box::pin(body.into_data_stream().map_err(io::Error::other));
    let hosted_req = HostedRequest {
        method: req.method(),
        name: api.name,
        endpoint: api.endpoint,
        query: req.uri().query(),
        headers: req.headers(),
        who: &who,
        body,
    };
    hosted.handle(hosted_req).await.map(|r| (response::render(r), None))
}

/// A request for a repository of a mirrored registry: credentials first (see [`as_proxied`]),
/// then the route, then what the endpoint allows (this is a read-only mirror).
async fn proxied(
    app: &App,
    req: &Request<()>,
    api: Api<'_>,
    authn: Result<Identity, ProtocolError>,
    route: Result<Route, ProtocolError>,
) -> Handled {
    if let Some(auth) = &app.auth {
        let who = as_proxied(auth, authn)?;
        auth.check_proxied(&who)?;
    }
    let route = route?;
    if let Err(denied) = app.pull_policy.check(&route) {
        app.metrics.pulls_denied.with_label_values(&[&route.registry]).inc();
        return Err(denied);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(read_only_refusal(app, api.name, &route, "pushes and deletes are"));
    }
    match api.endpoint {
        Endpoint::Manifest(reference) => proxied_manifest(app, req, &route, reference).await,
        Endpoint::Blob(digest) => proxied_blob(app, req, &route, digest).await,
        Endpoint::Uploads(_) => Err(read_only_refusal(app, api.name, &route, "pushes are")),
        Endpoint::Tags => Err(ProtocolError::new(ErrorCode::Unsupported, "tag listing is not proxied by this mirror")),
        // 404, not 405: oras, cosign and notation fall back to the referrers tag schema on a
        // 404 only.
        Endpoint::Referrers(_) => Err(ProtocolError::new(
            ErrorCode::ManifestUnknown,
            "the referrers API is not proxied by this mirror; use the referrers tag schema",
        )),
    }
}

/// `GET`/`HEAD /v2/<name>/manifests/<reference>` of a mirrored registry.
async fn proxied_manifest(app: &App, req: &Request<()>, route: &Route, reference: &str) -> Handled {
    let reference = Reference::parse_to_read(reference)?;
    let accept = accept_list(req.headers());
    let (manifest, source) = app.cache.manifest(route, &reference, &accept).await?;
    let head = req.method() == Method::HEAD;
    Ok((response::render(Answer::Manifest { manifest, source: source.clone(), head }), Some(source)))
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>` of a mirrored registry, ranges included.
async fn proxied_blob(app: &App, req: &Request<()>, route: &Route, digest: &str) -> Handled {
    let digest = Digest::parse(digest)?;
    let head = req.method() == Method::HEAD;
    let blob = app.cache.blob(route, &digest, range_header(req.headers()), head).await?;
    let source = blob.source.clone();
    Ok((response::render(Answer::Blob { digest, blob }), Some(source)))
}

/// `GET /_ferry/peer/blobs/<digest>`: another replica of the cluster streams this replica's
/// fetch in progress. Only a request signed with the cluster's secret is answered.
async fn for_peer(app: &App, cluster: &Cluster, req: &Request<()>, digest: &str) -> Handled {
    let digest = Digest::parse(digest)?;
    let signed = req.headers().get(peer::HEADER).and_then(|v| v.to_str().ok());
    if !signed.is_some_and(|h| cluster.verify(h, &digest)) {
        return Err(ProtocolError::new(ErrorCode::Denied, "only replicas of this cluster may ask for this"));
    }
    let blob = app.cache.for_peer(&digest, range_header(req.headers())).await?;
    let source = blob.source.clone();
    Ok((response::render(Answer::Blob { digest, blob }), Some(source)))
}

/// The refusal of a write to a proxied namespace, naming where pushes do go.
fn read_only_refusal(app: &App, name: &str, route: &Route, what: &str) -> ProtocolError {
    let namespaces = app.router.hosted_namespaces();
    let hint = match namespaces.is_empty() {
        true => String::new(),
        false => format!("; pushes are accepted under {}", namespaces.join("/, ") + "/"),
    };
    ProtocolError::new(
        ErrorCode::Unsupported,
        format!("{name} is a read-only mirror of {}: {what} not accepted here{hint}", route.registry),
    )
}

pub(super) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

fn no_endpoint(path: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::NameUnknown, format!("no such endpoint: {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        assert_eq!(query_param(Some("ns=ghcr.io&x=1"), "ns").as_deref(), Some("ghcr.io"));
        assert_eq!(query_param(Some("ns=localhost%3A5000"), "ns").as_deref(), Some("localhost:5000"));
        assert_eq!(query_param(None, "ns"), None);
    }
}

//! The admin endpoints (`ferry cache forget`): with an htpasswd file only for the users named
//! in `hosted.admins`, by password; without one, for whoever reaches the port (they can only
//! make Ferry ask its upstreams again).

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::{response, Body};
use crate::app::App;
use crate::auth::Identity;
use crate::distribution::{ErrorCode, ProtocolError, Reference};

/// `POST /_ferry/forget?image=REGISTRY/REPO[:TAG]`: drop a proxied tag, or every tag of a
/// repository, on every replica.
pub const FORGET_PATH: &str = "/_ferry/forget";

/// Whether `path` is an admin endpoint (credentials are read for it).
pub fn is_admin_path(path: &str) -> bool {
    path == FORGET_PATH
}

/// Answers an admin request.
pub async fn handle(
    app: &App,
    req: &Request<()>,
    authn: Result<Identity, ProtocolError>,
) -> Result<Response<Body>, ProtocolError> {
    if let Some(auth) = &app.auth {
        auth.check_admin(&authn?)?;
    }
    if req.method() != Method::POST {
        return Err(ProtocolError::new(ErrorCode::Unsupported, format!("{FORGET_PATH} takes POST")));
    }
    let image = super::dispatch::query_param(req.uri().query(), "image")
        .ok_or_else(|| ProtocolError::new(ErrorCode::NameInvalid, "name the image: ?image=REGISTRY/REPO[:TAG]"))?;
    let (name, tag) = split_image(&image)?;
    if app.router.is_hosted(name) {
        return Err(ProtocolError::new(
            ErrorCode::Unsupported,
            format!("{name} is hosted here: its tags are never cached, so there is nothing to forget"),
        ));
    }
    let route = app.router.route(name, None)?;
    let forgotten = app.cache.forget(&route, tag).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot forget tags");
        ProtocolError::new(ErrorCode::Unavailable, "storage did not answer; nothing or part was forgotten")
    })?;
    let body = serde_json::json!({
        "registry": route.registry,
        "repository": route.repo.to_string(),
        "tag": tag,
        "records": forgotten.records,
        "every_replica": forgotten.every_replica,
    });
    let mut r = response::text(StatusCode::OK, body.to_string());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// `REGISTRY/REPO[:TAG]` into the name (routed as a client's would be) and the tag. A digest
/// is refused: what a digest names never changes.
fn split_image(image: &str) -> Result<(&str, Option<&str>), ProtocolError> {
    if image.contains('@') {
        return Err(ProtocolError::new(
            ErrorCode::NameInvalid,
            "a digest never changes: forget a tag (IMAGE:TAG) or every tag (IMAGE)",
        ));
    }
    let last = image.rfind('/').map_or(0, |i| i + 1);
    match image[last..].rfind(':') {
        Some(i) => {
            let (name, tag) = (&image[..last + i], &image[last + i + 1..]);
            match Reference::parse(tag) {
                Ok(Reference::Tag(_)) => Ok((name, Some(tag))),
                _ => Err(ProtocolError::new(ErrorCode::NameInvalid, format!("{tag:?} is not a tag"))),
            }
        }
        None => Ok((image, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn images_split_at_the_tag_not_at_a_port() {
        assert_eq!(split_image("docker.io/library/nginx:1.27").unwrap(), ("docker.io/library/nginx", Some("1.27")));
        assert_eq!(split_image("nginx").unwrap(), ("nginx", None));
        assert_eq!(split_image("127.0.0.1:5001/app").unwrap(), ("127.0.0.1:5001/app", None));
        assert_eq!(split_image("127.0.0.1:5001/app:v1").unwrap(), ("127.0.0.1:5001/app", Some("v1")));
        assert!(split_image("nginx@sha256:abcd").is_err());
        assert!(split_image("nginx:").is_err());
        assert!(split_image("nginx:bad tag").is_err());
    }
}

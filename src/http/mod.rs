//! The HTTP side: the listeners (`listener`), what each request path is answered with
//! (`dispatch`, the token endpoint in `token`, the admin endpoints in [`admin`]), the one place answers and errors become
//! responses ([`response`]), the access log, and TLS.
//!
//! Everything a request needs comes from an `Arc<App>` ([`crate::app`]); nothing here builds
//! storage, pools or credentials.

use std::io;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

mod access_log;
pub mod admin;
mod dispatch;
pub mod guard;
mod listener;
pub mod response;
mod tls;
mod token;

pub use dispatch::handle;
pub use listener::{run, serve};
pub use tls::Tls;

/// Response body type: streamed, boxed, errors abort the connection.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

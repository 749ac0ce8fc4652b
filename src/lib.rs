//! Ferry: a pull-through caching mirror for OCI / Docker container registries.
//!
//! See `DESIGN.md` for the module map and the path of a pull. In short: `server` routes
//! `/v2/...` requests; `registry` decides which mirrored registry a name means; `cache` serves
//! manifests and blobs from `storage` or fetches them, once per digest, through `upstream`.
//! `distribution` and `config` are pure leaves; `metrics` names every exported series. `hosted`
//! serves private namespaces that accept pushes, guarded by `auth`.

pub mod auth;
pub mod cache;
pub mod config;
pub mod distribution;
pub mod hosted;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod storage;
pub mod upstream;

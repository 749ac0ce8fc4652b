//! Ferry: a pull-through caching mirror for OCI / Docker container registries.
//!
//! In short: `app` builds everything from the `config`; `http` listens and answers each
//! request path; `registry` decides whether a name is hosted or which mirrored registry it
//! means, and `pull_policy` whether it may be pulled; `cache` serves manifests and blobs from `storage` or fetches them, once per digest,
//! through `upstream`, and, with `cluster`, across replicas that share a bucket and a Redis. `distribution` and `config` are pure leaves; `metrics` names every
//! exported series. `hosted` serves private namespaces that accept pushes, guarded by `auth`.

pub mod app;
pub mod auth;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod distribution;
pub mod hosted;
pub mod http;
pub mod metrics;
pub mod pull_policy;
pub mod registry;
pub mod storage;
pub mod throttle;
pub mod upstream;

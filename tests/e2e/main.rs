//! Ferry's end-to-end tests: one test binary (so the harness compiles once), one module per
//! area. Every test starts the real `ferry` binary against real CNCF Distribution upstreams
//! (`docker-registry`) and drives it with real clients (skopeo, containerd's `ctr`, curl) or
//! the harness's own HTTP client; see [`harness`].
//!
//! Run one area with `cargo test --test e2e failover::`, one test by its full name.

mod harness;

// Ferry, area by area.
mod cache;
mod cluster;
mod conformance;
mod containerd;
mod durability;
mod failover;
mod floods;
mod hosted;
mod limits;
mod operations;
mod pull_through;
mod s3;
mod soak;
mod tags;
mod upstream_auth;

// The harness's own tests, against the real tools and without Ferry.
mod fault_proxy_harness;
mod token_upstream_harness;
mod upstream_harness;

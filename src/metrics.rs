//! Every Prometheus metric Ferry exports: names, help texts and labels live here and nowhere
//! else. Labels are bounded sets (routes, sources, upstream names from the config): never a
//! repository name or a digest.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics of one Ferry instance, on its own registry (so several can live in one process).
pub struct Metrics {
    registry: Registry,
    /// `ferry_http_requests_total{method,route,status}`
    pub http_requests: IntCounterVec,
    /// `ferry_http_request_duration_seconds{route,source}`
    pub http_duration: HistogramVec,
    /// `ferry_cache_requests_total{kind,result}`
    pub cache_requests: IntCounterVec,
    /// `ferry_bytes_served_total{source}`
    pub bytes_served: IntCounterVec,
    /// `ferry_upstream_bytes_total{upstream}`
    pub upstream_bytes: IntCounterVec,
    /// `ferry_upstream_requests_total{upstream,status}`
    pub upstream_requests: IntCounterVec,
    /// `ferry_upstream_request_duration_seconds{upstream}` (time to response headers)
    pub upstream_duration: HistogramVec,
    /// `ferry_upstream_failovers_total{registry,from,reason}`
    pub upstream_failovers: IntCounterVec,
    /// `ferry_upstream_up{upstream}`: 1 while the circuit is closed.
    pub upstream_up: IntGaugeVec,
    /// `ferry_upstream_ratelimit_remaining{upstream}` from Docker Hub's headers.
    pub upstream_ratelimit_remaining: IntGaugeVec,
    /// `ferry_inflight_fetches`
    pub inflight_fetches: IntGauge,
    /// `ferry_digest_mismatches_total`
    pub digest_mismatches: IntCounter,
    /// `ferry_upstream_invalid_manifests_total{upstream}`
    pub invalid_manifests: IntCounterVec,
    /// `ferry_pulls_denied_total{registry}`: requests refused by a registry's allow/deny lists.
    pub pulls_denied: IntCounterVec,
    /// `ferry_cache_write_errors_total`: blobs served uncached because the disk refused them.
    pub cache_write_errors: IntCounter,
    /// `ferry_storage_errors_total{op}`: store operations that failed (see `storage::metered`).
    pub storage_errors: IntCounterVec,
    /// `ferry_storage_operation_duration_seconds{op}`.
    pub storage_duration: HistogramVec,
    /// `ferry_storage_bytes_total{direction}`: blob bytes read from and written to the store.
    pub storage_bytes: IntCounterVec,
    /// `ferry_cache_size_bytes`: bytes of cached blobs on disk.
    pub cache_size_bytes: IntGauge,
    /// `ferry_cache_blobs`: cached blobs on disk.
    pub cache_blobs: IntGauge,
    /// `ferry_cache_evictions_total`: blobs removed to stay under `storage.max_size`.
    pub cache_evictions: IntCounter,
    /// `ferry_cluster_degraded`: 1 while Redis does not answer (the replica works alone).
    pub cluster_degraded: IntGauge,
    /// `ferry_cluster_redis_errors_total`: Redis commands that failed or timed out.
    pub cluster_redis_errors: IntCounter,
    /// `ferry_cluster_fetches_total{role}`: blob fetches by how this replica took part
    /// (`owner`: it held the lease; `peer`: streamed from the owner; `takeover`: the owner
    /// went away mid-way; `alone`: Redis did not answer).
    pub cluster_fetches: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Creates and registers every metric. One list on purpose (longer than our usual function):
    /// every name, help text and label set of Ferry's metrics reads in one place.
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let inflight_fetches = IntGauge::new("ferry_inflight_fetches", "Upstream blob fetches in progress.")?;
        r.register(Box::new(inflight_fetches.clone()))?;
        let digest_mismatches = IntCounter::new(
            "ferry_digest_mismatches_total",
            "Upstream content whose sha256 did not match its digest (never cached, never completed).",
        )?;
        r.register(Box::new(digest_mismatches.clone()))?;
        let cache_write_errors = IntCounter::new(
            "ferry_cache_write_errors_total",
            "Blobs streamed to clients without being cached because the disk write failed.",
        )?;
        r.register(Box::new(cache_write_errors.clone()))?;
        let cache_size_bytes = IntGauge::new("ferry_cache_size_bytes", "Bytes of cached blobs on disk.")?;
        r.register(Box::new(cache_size_bytes.clone()))?;
        let cache_blobs = IntGauge::new("ferry_cache_blobs", "Cached blobs on disk.")?;
        r.register(Box::new(cache_blobs.clone()))?;
        let cache_evictions =
            IntCounter::new("ferry_cache_evictions_total", "Blobs evicted to stay under storage.max_size.")?;
        r.register(Box::new(cache_evictions.clone()))?;
        let cluster_degraded =
            IntGauge::new("ferry_cluster_degraded", "1 while Redis does not answer and this replica works alone.")?;
        r.register(Box::new(cluster_degraded.clone()))?;
        let cluster_redis_errors =
            IntCounter::new("ferry_cluster_redis_errors_total", "Redis commands that failed or timed out.")?;
        r.register(Box::new(cluster_redis_errors.clone()))?;
        Ok(Metrics {
            cluster_degraded,
            cluster_redis_errors,
            cluster_fetches: counter_vec(
                &r,
                "ferry_cluster_fetches_total",
                "Blob fetches by this replica's part in them (owner, peer, takeover, alone).",
                &["role"],
            )?,
            cache_size_bytes,
            cache_blobs,
            cache_evictions,
            http_requests: counter_vec(
                &r,
                "ferry_http_requests_total",
                "HTTP requests answered.",
                &["method", "route", "status"],
            )?,
            http_duration: histogram_vec(
                &r,
                "ferry_http_request_duration_seconds",
                "Time to answer a request, until the last body byte.",
                &["route", "source"],
            )?,
            cache_requests: counter_vec(
                &r,
                "ferry_cache_requests_total",
                "Cache lookups by kind (manifest, blob) and result (hit, miss, stale, coalesced, kept_deleted).",
                &["kind", "result"],
            )?,
            bytes_served: counter_vec(
                &r,
                "ferry_bytes_served_total",
                "Body bytes sent to clients, by source.",
                &["source"],
            )?,
            upstream_bytes: counter_vec(
                &r,
                "ferry_upstream_bytes_total",
                "Body bytes received from upstreams.",
                &["upstream"],
            )?,
            upstream_requests: counter_vec(
                &r,
                "ferry_upstream_requests_total",
                "Requests sent to upstreams, by HTTP status or error kind.",
                &["upstream", "status"],
            )?,
            upstream_duration: histogram_vec(
                &r,
                "ferry_upstream_request_duration_seconds",
                "Upstream time to response headers.",
                &["upstream"],
            )?,
            upstream_failovers: counter_vec(
                &r,
                "ferry_upstream_failovers_total",
                "Requests moved on from an upstream to the next.",
                &["registry", "from", "reason"],
            )?,
            upstream_up: gauge_vec(
                &r,
                "ferry_upstream_up",
                "1 while the upstream's circuit is closed.",
                &["upstream"],
            )?,
            upstream_ratelimit_remaining: gauge_vec(
                &r,
                "ferry_upstream_ratelimit_remaining",
                "The upstream's last reported ratelimit-remaining (Docker Hub).",
                &["upstream"],
            )?,
            invalid_manifests: counter_vec(
                &r,
                "ferry_upstream_invalid_manifests_total",
                "Manifests an upstream answered that were not JSON or contradicted their Content-Type (never cached).",
                &["upstream"],
            )?,
            pulls_denied: counter_vec(
                &r,
                "ferry_pulls_denied_total",
                "Requests for repositories a registry's allow/deny lists refuse (by configured registry).",
                &["registry"],
            )?,
            storage_errors: counter_vec(
                &r,
                "ferry_storage_errors_total",
                "Store operations (disk or bucket) that failed, by operation.",
                &["op"],
            )?,
            storage_duration: histogram_vec(
                &r,
                "ferry_storage_operation_duration_seconds",
                "Time a store operation took (a read: until its stream opened).",
                &["op"],
            )?,
            storage_bytes: counter_vec(
                &r,
                "ferry_storage_bytes_total",
                "Blob bytes read from (read) and committed to (written) the store.",
                &["direction"],
            )?,
            inflight_fetches,
            digest_mismatches,
            cache_write_errors,
            registry: r,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format; an empty page is the fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

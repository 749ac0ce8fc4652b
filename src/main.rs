//! The `ferry` command: `serve`, `check-config`, `gc`, `--version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::config::{Config, LogFormat};

/// A pull-through caching mirror for container registries.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API (embedded defaults without --config).
    Serve {
        /// YAML configuration file (see config.example.yml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Delete hosted blobs and manifests that no manifest of a hosted repository references.
    /// Run it when pushes are quiet; content younger than --grace is always kept.
    Gc {
        /// YAML configuration file (its storage.root is collected).
        #[arg(long, short)]
        config: PathBuf,
        /// Keep unreferenced content younger than this (a push may be in progress).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a configuration file and print the effective configuration (secrets redacted).
    CheckConfig {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect and maintain the cache on disk (safe while Ferry runs).
    Cache {
        /// YAML configuration file (for storage.root and listen); defaults without it.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Size, blobs, manifests, tags; hit counts from the running instance if it answers.
    Stats {
        /// Base URL of the running Ferry for hit counts (default: derived from `listen`).
        #[arg(long)]
        server: Option<String>,
    },
    /// Re-hash every blob; quarantine mismatches; abort multipart uploads a crash left in the
    /// bucket (S3); exit 1 if any mismatch was found.
    Verify {
        /// Uploads begun longer ago than this are abandoned (a fetch of a live Ferry running
        /// longer would lose its upload and store the blob afresh at its end).
        #[arg(long, default_value = "1d")]
        abandoned_after: humantime::Duration,
    },
    /// Drop a proxied tag (IMAGE:TAG), or every tag of a repository (IMAGE), on the running
    /// Ferry and every replica of its cluster: the next pull asks the upstream again.
    Forget {
        /// `REGISTRY/REPO[:TAG]` as a client names it (`nginx`, `registry.k8s.io/pause:3.10`).
        image: String,
        /// Base URL of the running Ferry (default: derived from `listen`).
        #[arg(long)]
        server: Option<String>,
        /// One of `hosted.admins`; the password is read from the FERRY_PASSWORD environment
        /// variable (never from the command line, where `ps` shows it).
        #[arg(long)]
        user: Option<String>,
    },
    /// Remove the oldest blobs until the cache fits in SIZE (e.g. 100GiB).
    Prune {
        /// Target size.
        #[arg(long)]
        max_size: bytesize::ByteSize,
    },
}

fn cache_command(config: &Config, action: CacheAction) -> Result<bool, String> {
    use ferry::cache::admin;
    if let CacheAction::Forget { image, server, user } = action {
        let url = server.or_else(|| local_url(config)).ok_or("pass --server URL of the running Ferry")?;
        return forget(&url, &image, user.as_deref());
    }
    let storage = ferry::storage::open(&config.storage, false, false)
        .map_err(|e| format!("storage.root {}: {e}", config.storage.root.display()))?;
    let storage = &*storage;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        match action {
            CacheAction::Stats { server } => {
                let s = admin::stats(storage).await.map_err(|e| e.to_string())?;
                println!("store:      {}", store_name(config));
                println!("blobs:      {}", s.blobs);
                println!("size:       {} ({} bytes)", bytesize::ByteSize(s.blob_bytes), s.blob_bytes);
                println!("manifests:  {}", s.manifests);
                println!("tags:       {}", s.tags);
                let server = server.or_else(|| local_url(config));
                match &server {
                    Some(url) => match running_hit_counts(url).await {
                        Some(lines) => {
                            println!("hit counts (from {url}):");
                            lines.iter().for_each(|l| println!("{l}"));
                        }
                        None => println!("hit counts: no running Ferry answered at {url}"),
                    },
                    None => println!("hit counts: pass --server URL of the running Ferry"),
                }
                if let (Some(url), Some(_)) = (&server, &config.cluster) {
                    match running_cluster_view(url).await {
                        Some(lines) => lines.iter().for_each(|l| println!("{l}")),
                        None => println!("cluster: {url} did not answer {CLUSTER_VIEW}"),
                    }
                }
                Ok(true)
            }
            CacheAction::Verify { abandoned_after } => {
                let v = admin::verify(storage, abandoned_after.into()).await.map_err(|e| e.to_string())?;
                match &v.abandoned_uploads {
                    Some(keys) => keys.iter().for_each(|k| println!("ABANDONED UPLOAD {k} (aborted)")),
                    None => println!(
                        "multipart uploads: the S3 server cannot list them; the bucket's lifecycle rule removes abandoned ones"
                    ),
                }
                println!("blobs verified: {}", v.good_blobs);
                for d in &v.bad_blobs {
                    println!("MISMATCH {d} (moved to {}/quarantine/)", store_name(config));
                }
                for k in &v.bad_manifests {
                    println!("BAD MANIFEST RECORD {k} (removed; refetched on the next pull)");
                }
                Ok(v.bad_blobs.is_empty() && v.bad_manifests.is_empty())
            }
            CacheAction::Forget { .. } => Ok(true),
            CacheAction::Prune { max_size } => {
                let (n, bytes) = admin::prune(storage, max_size.as_u64()).await.map_err(|e| e.to_string())?;
                println!("removed {n} blobs, {}", bytesize::ByteSize(bytes));
                Ok(true)
            }
        }
    })
}

/// The store, as the admin commands name it: the root directory or `s3://bucket/prefix`.
fn store_name(config: &Config) -> String {
    match &config.storage.s3 {
        Some(s3) => format!("s3://{}/{}", s3.bucket, s3.prefix.trim_end_matches('/')),
        None => config.storage.root.display().to_string(),
    }
}

/// Where the instance configured by `config` answers locally (none for port 0).
fn local_url(config: &Config) -> Option<String> {
    let mut addr = config.listen_addr().ok()?;
    if addr.port() == 0 {
        return None;
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(format!("http://{addr}"))
}

/// `ferry_cache_requests_total` lines from the running instance at `url`, if it answers.
async fn running_hit_counts(url: &str) -> Option<Vec<String>> {
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).no_proxy().build().ok()?;
    let page = client.get(format!("{}/metrics", url.trim_end_matches('/'))).send().await.ok()?.text().await.ok()?;
    Some(page.lines().filter(|l| l.starts_with("ferry_cache_requests_total")).map(|l| format!("  {l}")).collect())
}

const CLUSTER_VIEW: &str = "/_ferry/cluster";

/// The cluster as the running replica at `url` sees it, as lines to print.
async fn running_cluster_view(url: &str) -> Option<Vec<String>> {
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).no_proxy().build().ok()?;
    let reply = client.get(format!("{}{CLUSTER_VIEW}", url.trim_end_matches('/'))).send().await.ok()?;
    let text = reply.error_for_status().ok()?.text().await.ok()?;
    let view: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut lines = vec![format!("cluster (from {url}):")];
    let degraded = view["degraded"].as_bool().unwrap_or(false);
    lines.push(format!("  this replica: {}", if degraded { "works alone (Redis does not answer)" } else { "joined" }));
    if let Some(bytes) = view["cached_bytes"].as_u64() {
        lines.push(format!("  cached in the bucket: {} ({bytes} bytes)", bytesize::ByteSize(bytes)));
    }
    match view["fetches_by_owner"].as_object() {
        Some(owners) if owners.is_empty() => lines.push("  fetches in progress: none".into()),
        Some(owners) => {
            lines.push("  fetches in progress, by owner:".into());
            owners.iter().for_each(|(o, n)| lines.push(format!("    {o}  {n}")));
        }
        None => lines.push("  fetches in progress: unknown (Redis does not answer)".into()),
    }
    Some(lines)
}

/// `ferry cache forget`: asks the running Ferry at `url` to forget `image`'s tags.
fn forget(url: &str, image: &str, user: Option<&str>) -> Result<bool, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("image", image).finish();
        let endpoint = format!("{}{}?{query}", url.trim_end_matches('/'), ferry::http::admin::FORGET_PATH);
        let mut req = client.post(endpoint);
        if let Some(user) = user {
            req = req.basic_auth(user, std::env::var("FERRY_PASSWORD").ok());
        }
        let reply = req.send().await.map_err(|e| format!("{url} did not answer: {e}"))?;
        let status = reply.status();
        let text = reply.text().await.map_err(|e| e.to_string())?;
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if !status.is_success() {
            let message = body["errors"][0]["message"].as_str().unwrap_or(text.trim());
            return Err(format!("{url} refused ({status}): {message}"));
        }
        let what = match body["tag"].as_str() {
            Some(t) => format!("{}/{}:{t}", body["registry"].as_str().unwrap_or("?"), body["repository"].as_str().unwrap_or("?")),
            None => format!("every tag of {}/{}", body["registry"].as_str().unwrap_or("?"), body["repository"].as_str().unwrap_or("?")),
        };
        let records = body["records"].as_u64().unwrap_or(0);
        println!("forgot {what} ({records} stored records); the next pull revalidates it upstream");
        if body["every_replica"] == serde_json::Value::Bool(false) {
            println!("warning: Redis did not take the invalidation: other replicas may serve the old answer for up to its TTL");
        }
        Ok(true)
    })
}

fn load(path: Option<&PathBuf>) -> Result<Config, ferry::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

fn gc(config: &std::path::Path, grace: std::time::Duration, dry_run: bool) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {}: invalid configuration: {e}", config.display());
            return ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
        let storage = ferry::storage::open(&config.storage, false, false)?;
        rt.block_on(ferry::hosted::gc(&*storage, grace, dry_run))
    });
    match result {
        Ok(report) => {
            let verb = if dry_run { "would remove" } else { "removed" };
            let mut bytes = 0;
            for (digest, size) in &report.removed_blobs {
                println!("{verb} blob {digest} ({size} bytes)");
                bytes += size;
            }
            for digest in &report.removed_manifests {
                println!("{verb} manifest {digest}");
            }
            for digest in &report.released_shared {
                println!("released {digest} (bytes shared with the cache stay)");
            }
            println!(
                "gc: {verb} {} blobs ({bytes} bytes) and {} manifests; kept {} referenced, {} younger than the grace period",
                report.removed_blobs.len(),
                report.removed_manifests.len(),
                report.kept,
                report.young
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry: gc failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cache { config, action } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: invalid configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            match cache_command(&config, action) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => match serde_saphyr::to_string(&c) {
                Ok(yaml) => {
                    println!("# {}: valid. Effective configuration (secrets redacted):", config.display());
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ferry: cannot print the configuration: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("ferry: {}: invalid configuration: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Gc { config, grace, dry_run } => gc(&config, grace, dry_run),
        Command::Serve { config: path } => {
            let config = match load(path.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: invalid configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ferry: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(ferry::http::run(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("cannot start: {e}");
                    eprintln!("ferry: cannot start: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

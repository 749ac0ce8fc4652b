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
        let storage = ferry::storage::FsStorage::open(&config.storage.root)?;
        rt.block_on(ferry::hosted::gc(&storage, grace, dry_run))
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
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
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
            match runtime.block_on(ferry::server::run(config)) {
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

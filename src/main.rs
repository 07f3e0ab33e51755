//! The `trstream` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use trstream::config::{Config, Sources};
use trstream::tools::produce::{GenOptions, ProduceOptions, ProduceProgress};

#[derive(Parser)]
#[command(name = "trstream", version, about = "Kafka → Parquet → S3 ingestion of financial transactions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ingestion daemon.
    Run(RunArgs),
    /// Produce synthetic transactions to Kafka.
    Produce(ProduceArgs),
    /// Everything in one process on embedded Kafka and S3, with a live progress line.
    Demo(trstream::tools::demo::DemoArgs),
    /// End-to-end throughput and peak memory on the embedded infrastructure.
    Bench(trstream::tools::bench::BenchArgs),
    /// Reconcile the topic, the DLQ and the lake: missing, duplicated, unexpected transactions.
    Audit(AuditArgs),
    /// Ask a running daemon's /healthz or /readyz; exit 0 on 200 (for container health checks).
    Healthcheck(HealthcheckArgs),
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The endpoint: /healthz (the supervision tree is up) or /readyz (consuming and able to upload).
    #[arg(long, default_value = "http://127.0.0.1:9464/healthz")]
    url: String,
    /// Give up after this long, e.g. 3s.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the effective configuration (secret redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Also check raw-data: every valid transaction exactly once per Kafka partition.
    #[arg(long)]
    raw: bool,
    /// Give up on a topic that returns nothing for this long before its end is reached.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
}

/// Where the configuration comes from: the same sources and flags for `run` and `audit`.
#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file; every key can also be set by TRSTREAM_<SECTION>_<KEY>.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override any key: --set flush.max_rows=50000 (repeatable; wins over file and env).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Shorthand for --set kafka.brokers=…
    #[arg(long)]
    brokers: Option<String>,
    /// Shorthand for --set kafka.topic=…
    #[arg(long)]
    topic: Option<String>,
    /// Shorthand for --set kafka.group_id=…
    #[arg(long)]
    group_id: Option<String>,
    /// Shorthand for --set s3.endpoint=…
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Shorthand for --set http.listen=…
    #[arg(long)]
    http_listen: Option<String>,
}

impl ConfigArgs {
    fn load(self) -> Result<Config, trstream::config::ConfigError> {
        let mut overrides = Vec::new();
        for (key, v) in [
            ("kafka.brokers", &self.brokers),
            ("kafka.topic", &self.topic),
            ("kafka.group_id", &self.group_id),
            ("s3.endpoint", &self.s3_endpoint),
            ("http.listen", &self.http_listen),
        ] {
            if let Some(v) = v {
                overrides.push(format!("{key}={v:?}"));
            }
        }
        overrides.extend(self.overrides);
        Config::load(&Sources { file: self.config, env: std::env::vars().collect(), overrides })
    }
}

#[derive(Args)]
struct ProduceArgs {
    #[arg(long, default_value = "localhost:9092", env = "TRSTREAM_KAFKA_BROKERS")]
    brokers: String,
    #[arg(long, default_value = "transactions")]
    topic: String,
    /// Stop after this many records (default: run until --duration or Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Records per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<u64>,
    /// Stop after this long, e.g. 30s, 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Number of distinct users (message keys).
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// Force transaction_type (CREDIT, DEBIT, TRANSFER, PAYMENT, WITHDRAWAL, REFUND).
    #[arg(long)]
    transaction_type: Option<String>,
    /// Smallest amount, a decimal like 0.01.
    #[arg(long, default_value = "0.01")]
    amount_min: String,
    /// Largest amount, a decimal like 5000.00.
    #[arg(long, default_value = "5000.00")]
    amount_max: String,
    /// Force currency (ISO 4217, from the allow-list).
    #[arg(long)]
    currency: Option<String>,
    /// Force country (ISO 3166-1 alpha-2).
    #[arg(long)]
    country: Option<String>,
    /// Fraction of invalid records, cycling through every DLQ reason (0.0..=1.0).
    #[arg(long, default_value_t = 0.0)]
    invalid_ratio: f64,
    /// Size oversized records are padded to, in bytes (the daemon's validation.max_record_bytes + 1).
    #[arg(long, default_value_t = 64 * 1024 + 1)]
    oversize_bytes: usize,
    /// Random seed (the same seed gives the same records, ids included).
    #[arg(long)]
    seed: Option<u64>,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Caps glibc's malloc arenas at two. With one arena per thread (its default, up to 8 per core)
/// the flush threads fragment memory: `trstream bench` measured 236 MB peak RSS with the default
/// and 170 MB with two arenas, at the same throughput. mimalloc and jemalloc did no better here.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // A fixed threshold: buffers of 4 MiB and more (an input file, an upload part, a
        // column) are mapped and unmapped whole. glibc's default raises the threshold after
        // each such free, up to 32 MiB, after which they stay in the heap, fragmented: a
        // streamed merge of 190 MiB then peaked at 177 MiB RSS instead of about 100.
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // The demo and the benchmark draw a progress line; only warnings may interrupt it.
    init_tracing(match cli.command {
        Command::Demo(_) | Command::Bench(_) | Command::Audit(_) | Command::Healthcheck(_) => "warn",
        _ => "info,librdkafka=warn,rdkafka=warn",
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let res = match cli.command {
        Command::Run(args) => rt.block_on(run(args)),
        Command::Produce(args) => produce(args),
        Command::Demo(args) => rt.block_on(trstream::tools::demo::run(args)),
        Command::Bench(args) => rt.block_on(trstream::tools::bench::run(args)),
        Command::Audit(args) => rt.block_on(audit(args)),
        Command::Healthcheck(args) => trstream::metrics::check_health(&args.url, args.timeout).map(|body| {
            print!("{body}");
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    if args.print_config {
        print!("{config}");
        return Ok(());
    }
    // Test-only fault injection (the chaos tests); never set in production.
    let faults = match std::env::var(trstream::faults::ENV) {
        Ok(spec) => {
            let faults = Arc::new(trstream::Faults::from_spec(&spec).map_err(anyhow::Error::msg)?);
            tracing::warn!(
                spec,
                "fault injection is ON ({}): actors will panic, the process may kill itself",
                trstream::faults::ENV
            );
            if faults.arms_on_usr1() {
                use tokio::signal::unix::{SignalKind, signal};
                let (faults, mut usr1) = (faults.clone(), signal(SignalKind::user_defined1())?);
                tokio::spawn(async move {
                    usr1.recv().await;
                    tracing::warn!("SIGUSR1: the injected faults are armed");
                    faults.arm_random();
                });
            }
            {
                // SIGUSR2: no new random fault strikes (a test's end; late writes already struck
                // still land).
                use tokio::signal::unix::{SignalKind, signal};
                let (faults, mut usr2) = (faults.clone(), signal(SignalKind::user_defined2())?);
                tokio::spawn(async move {
                    usr2.recv().await;
                    tracing::warn!("SIGUSR2: the injected faults are disarmed");
                    faults.disarm_random();
                });
            }
            faults
        }
        Err(_) => Arc::new(trstream::Faults::default()),
    };
    trstream::run(config, faults, shutdown_signal()).await
}

async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let opts = trstream::tools::audit::AuditOptions { raw: args.raw, timeout: args.timeout, progress: true };
    let report = trstream::tools::audit::audit(&config, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if !report.clean {
        let t = &report.total;
        anyhow::bail!(
            "audit found {} missing, {} duplicated, {} unexpected, {} altered and {} misplaced transactions, and {} DLQ records for valid ones",
            t.missing + t.raw_missing.unwrap_or(0),
            t.duplicated + t.raw_duplicated.unwrap_or(0),
            t.unexpected,
            t.altered,
            t.misplaced,
            t.dlq_unexpected
        );
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let cents = |flag: &str, v: &str| {
        trstream::record::parse_amount_cents(v).map_err(|e| anyhow::anyhow!("{flag} {v:?}: {}", e.detail))
    };
    let opts = ProduceOptions {
        brokers: a.brokers,
        topic: a.topic,
        count: a.count,
        rate: a.rate,
        duration: a.duration,
        generator: GenOptions {
            users: a.users,
            transaction_type: a.transaction_type,
            amount_min_cents: cents("--amount-min", &a.amount_min)?,
            amount_max_cents: cents("--amount-max", &a.amount_max)?,
            currency: a.currency,
            country: a.country,
            invalid_ratio: a.invalid_ratio,
            oversize_bytes: a.oversize_bytes,
            seed: a.seed.unwrap_or_else(trstream::tools::produce::time_seed),
            ..GenOptions::default()
        },
        properties: Vec::new(),
        progress: true,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc_flag(s);
    let summary = trstream::tools::produce::produce(&opts, &stop, Arc::new(ProduceProgress::default()))
        .map_err(anyhow::Error::msg)?;
    eprintln!(
        "done: {} records in {:.1?} ({:.0}/s), {} acknowledged, {} failed, {} invalid by design",
        summary.sent,
        summary.elapsed,
        summary.sent as f64 / summary.elapsed.as_secs_f64().max(1e-3),
        summary.acked,
        summary.failed,
        summary.invalid
    );
    if summary.failed > 0 {
        anyhow::bail!("{} records were not acknowledged by the broker", summary.failed);
    }
    Ok(())
}

/// Sets `flag` on Ctrl-C, from a small runtime of its own (produce is synchronous).
fn ctrlc_flag(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

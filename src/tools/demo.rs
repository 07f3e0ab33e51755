//! `trstream demo`: the whole pipeline in one process on the embedded defaults (design §6) —
//! the librdkafka mock cluster, s3s-fs over `./lake`, a producer at a steady rate and the
//! daemon — with a live progress line and a summary. The lake is a plain folder, so the files
//! can be opened straight from disk (DuckDB, pandas, parquet-tools).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::metrics::Stats;
use crate::tools::embedded::{EmbeddedKafka, EmbeddedS3};
use crate::tools::produce::{GenOptions, ProduceOptions, ProduceProgress};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long to produce, e.g. 30s, 2m; Ctrl-C stops earlier, cleanly.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Records produced per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Partitions of the `transactions` topic (and of its DLQ). The embedded broker keeps about
    /// 30,000 records per partition: 48 partitions keep a minute at 10,000/s fully auditable.
    #[arg(long, default_value_t = 48)]
    pub partitions: i32,
    /// Folder served as S3: `<lake>/raw-data/…` holds the Parquet files.
    #[arg(long, default_value = "./lake")]
    pub lake: PathBuf,
    /// Fraction of invalid records mixed in (every DLQ reason class).
    #[arg(long, default_value_t = 0.01)]
    pub invalid_ratio: f64,
    /// Where /metrics, /healthz and /readyz listen ("" disables).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http_listen: String,
    /// Flush age of the daemon (how soon files appear).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub flush_age: Duration,
    /// Time between compaction passes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub compact_every: Duration,
    /// After the summary, keep the embedded Kafka and S3 up (until Ctrl-C) so that
    /// `trstream audit` or any Kafka/S3 client can be pointed at them.
    #[arg(long)]
    pub hold: bool,
}

fn lag(progress: &ProduceProgress, stats: &Stats) -> i64 {
    let committed: i64 = stats.committed().values().sum();
    progress.acked.load(Ordering::Relaxed) as i64 - committed
}

fn line(started: Instant, progress: &ProduceProgress, stats: &Stats) -> String {
    format!(
        "[{:>5.1}s] produced {:>8}  raw rows {:>8} in {:>4} files  DLQ {:>6}  lag {:>7}  partitioned {:>8} rows  merges {:>4}",
        started.elapsed().as_secs_f64(),
        progress.acked.load(Ordering::Relaxed),
        Stats::get(&stats.written),
        Stats::get(&stats.files),
        Stats::get(&stats.invalid),
        lag(progress, stats),
        Stats::get(&stats.partitioned_rows),
        Stats::get(&stats.compactions),
    )
}

/// Records the librdkafka mock cluster keeps per partition (it keeps 5 MB of message sets and
/// silently drops older ones), measured with the demo's records and batches: 30,500 records
/// produced to one partition at 10,000/s over 24 partitions lost their oldest 512.
const EMBEDDED_RETAINED_PER_PARTITION: u64 = 28_000;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let config_base = Config::default();
    let raw = args.lake.join(&config_base.s3.raw_bucket);
    let table = args.lake.join(&config_base.s3.table_bucket);
    for dir in [&raw, &table] {
        if dir.exists() {
            // The embedded Kafka starts empty each run, so offsets restart at 0: files of an
            // earlier run would be taken for this run's (the recovery scan would adopt them).
            eprintln!("clearing {} (the embedded Kafka starts empty on every run)", dir.display());
            std::fs::remove_dir_all(dir)?;
        }
    }
    std::fs::create_dir_all(&args.lake)?;
    let kafka = EmbeddedKafka::start(
        1,
        &[(&config_base.kafka.topic, args.partitions), (&config_base.kafka.dlq_topic, args.partitions)],
    )?;
    let per_partition = args.rate.saturating_mul(args.duration.as_secs()) / args.partitions.max(1) as u64;
    if per_partition > EMBEDDED_RETAINED_PER_PARTITION {
        eprintln!(
            "note: about {per_partition} records per partition; the embedded broker keeps only about \
             {EMBEDDED_RETAINED_PER_PARTITION} of them, so the final audit can check only the newest \
             (the older ones are counted as before_log_start). Raise --partitions or lower --rate to audit everything."
        );
    }
    let s3 = EmbeddedS3::start(&args.lake, 0, &[&config_base.s3.raw_bucket, &config_base.s3.table_bucket]).await?;
    eprintln!("embedded Kafka at {}, S3 (s3s-fs over {}) at {}", kafka.bootstrap, s3.root.display(), s3.endpoint);

    let mut config = config_base;
    kafka.configure(&mut config.kafka);
    s3.configure(&mut config.s3);
    config.s3.create_bucket = true;
    config.flush.max_age = args.flush_age;
    config.compactor.interval = args.compact_every;
    // Small enough that a minute of demo shows merges.
    config.compactor.min_files = 4;
    config.http.listen = args.http_listen.clone();
    config.validate()?;
    let audit_config = config.clone();
    let oversize = config.validation.max_record_bytes + 1;
    let mut pipeline = crate::start(config, Arc::new(crate::Faults::default())).await?;
    if let Some(addr) = pipeline.http_addr {
        eprintln!("metrics at http://{addr}/metrics");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(ProduceProgress::default());
    let opts = ProduceOptions {
        brokers: kafka.bootstrap.clone(),
        topic: "transactions".into(),
        count: None,
        rate: Some(args.rate),
        duration: Some(args.duration),
        generator: GenOptions {
            invalid_ratio: args.invalid_ratio,
            oversize_bytes: oversize,
            seed: crate::tools::produce::time_seed(),
            ..Default::default()
        },
        properties: Vec::new(),
        progress: false,
    };
    let (s, p) = (stop.clone(), progress.clone());
    let producer = std::thread::spawn(move || crate::tools::produce::produce(&opts, &s, p));

    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                eprintln!("\ninterrupted: stopping the producer and draining");
                break;
            }
            reason = pipeline.stopped() => anyhow::bail!("the daemon stopped: {reason}"),
        }
        eprint!("\r{}", line(started, &progress, &pipeline.stats));
        if producer.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let produced = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))?
        .map_err(anyhow::Error::msg)?;

    // Let the daemon catch up (bounded), then shut it down the way SIGTERM would.
    if !interrupted {
        let deadline = Instant::now() + Duration::from_secs(60);
        while lag(&progress, &pipeline.stats) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            eprint!("\r{}", line(started, &progress, &pipeline.stats));
        }
    }
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await;
    eprintln!("\r{}", line(started, &progress, &stats));
    let lag_left = lag(&progress, &stats);
    eprintln!(
        "\nsummary: {} produced ({} invalid by design) in {:.1?}; {} rows in {} Parquet files ({:.1} MiB), {} in the DLQ; {} restarts; commit lag {}",
        produced.acked,
        produced.invalid,
        produced.elapsed,
        Stats::get(&stats.written),
        Stats::get(&stats.files),
        Stats::get(&stats.upload_bytes) as f64 / 1048576.0,
        Stats::get(&stats.invalid),
        Stats::get(&stats.restarts),
        lag_left,
    );
    if lag_left > 0 {
        eprintln!(
            "{lag_left} records were produced but not consumed when the demo stopped: they stay uncommitted in Kafka, \
             never half-written (a restarted daemon would resume at the committed offsets)"
        );
    }
    eprintln!(
        "table: {} raw files partitioned into {} files ({} rows); {} merges replaced {} files ({:.1} MiB → {:.1} MiB); {} lake actor restarts",
        Stats::get(&stats.partitioned_files),
        Stats::get(&stats.table_files_written),
        Stats::get(&stats.partitioned_rows),
        Stats::get(&stats.compactions),
        Stats::get(&stats.compacted_files),
        Stats::get(&stats.compaction_bytes_before) as f64 / 1048576.0,
        Stats::get(&stats.compaction_bytes_after) as f64 / 1048576.0,
        Stats::get(&stats.lake_restarts),
    );

    eprintln!("\nauditing (topic, DLQ and tb-transactions):");
    let opts = crate::tools::audit::AuditOptions { progress: false, ..Default::default() };
    let clean = match crate::tools::audit::audit(&audit_config, &opts).await {
        Ok(report) => {
            eprint!("{}", report.to_table());
            report.clean
        }
        Err(e) => {
            eprintln!("audit failed: {e}");
            false
        }
    };
    let glob = table.join("year=*").join("**").join("*.parquet");
    eprintln!(
        "\nquery it: duckdb -c \"SELECT year, month, day, transaction_type, count(*), sum(amount) FROM read_parquet('{}', hive_partitioning = true) GROUP BY ALL ORDER BY ALL\"",
        glob.display()
    );
    if args.hold {
        eprintln!(
            "\nholding the embedded Kafka and S3 up until Ctrl-C; audit again with:\n  trstream audit --brokers {} --s3-endpoint {} --set s3.access_key_id={} --set s3.secret_access_key={}",
            kafka.bootstrap,
            s3.endpoint,
            crate::tools::embedded::ACCESS_KEY,
            s3.secret_key
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(s3);
    drop(kafka);
    if !clean {
        anyhow::bail!("the audit did not come out clean");
    }
    Ok(())
}

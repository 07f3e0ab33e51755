//! `trstream demo`: the whole pipeline in one process on the embedded defaults (design §6) —
//! the librdkafka mock cluster, s3s-fs over `./lake`, a producer at a steady rate and the
//! daemon — with a live progress line and a summary. The lake is a plain folder, so the files
//! can be opened straight from disk (DuckDB, pandas, parquet-tools).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::embedded::{EmbeddedKafka, EmbeddedS3};
use crate::metrics::Stats;
use crate::produce::{GenOptions, ProduceOptions, ProduceProgress};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long to produce, e.g. 30s, 2m; Ctrl-C stops earlier, cleanly.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Records produced per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Partitions of the `transactions` topic.
    #[arg(long, default_value_t = 4)]
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
}

fn lag(progress: &ProduceProgress, stats: &Stats) -> i64 {
    let committed: i64 = stats.committed().values().sum();
    progress.acked.load(Ordering::Relaxed) as i64 - committed
}

fn line(started: Instant, progress: &ProduceProgress, stats: &Stats) -> String {
    format!(
        "[{:>5.1}s] produced {:>8}  consumed {:>8}  rows in lake {:>8}  files {:>4}  DLQ {:>6}  commit lag {:>7}",
        started.elapsed().as_secs_f64(),
        progress.acked.load(Ordering::Relaxed),
        Stats::get(&stats.consumed),
        Stats::get(&stats.written),
        Stats::get(&stats.files),
        Stats::get(&stats.invalid),
        lag(progress, stats),
    )
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let raw = args.lake.join("raw-data");
    if raw.exists() {
        // The embedded Kafka starts empty each run, so offsets restart at 0: files of an earlier
        // run would be taken for this run's (the recovery scan would adopt them).
        eprintln!("clearing {} (the embedded Kafka starts empty on every run)", raw.display());
        std::fs::remove_dir_all(&raw)?;
    }
    std::fs::create_dir_all(&args.lake)?;
    let config_base = Config::default();
    let kafka =
        EmbeddedKafka::start(1, &[(&config_base.kafka.topic, args.partitions), (&config_base.kafka.dlq_topic, 1)])?;
    let s3 = EmbeddedS3::start(&args.lake, 0, &["raw-data"]).await?;
    eprintln!("embedded Kafka at {}, S3 (s3s-fs over {}) at {}", kafka.bootstrap, s3.root.display(), s3.endpoint);

    let mut config = config_base;
    config.kafka.brokers = kafka.bootstrap.clone();
    s3.configure(&mut config.s3);
    config.s3.create_bucket = true;
    config.flush.max_age = args.flush_age;
    config.http.listen = args.http_listen.clone();
    config.validate()?;
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
            seed: rand_seed(),
            ..Default::default()
        },
        properties: Vec::new(),
        progress: false,
    };
    let (s, p) = (stop.clone(), progress.clone());
    let producer = std::thread::spawn(move || crate::produce::produce(&opts, &s, p));

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
    let glob = raw.join("**").join("*.parquet");
    eprintln!(
        "query it: duckdb -c \"SELECT transaction_type, count(*), sum(amount) FROM read_parquet('{}') GROUP BY 1\"",
        glob.display()
    );
    drop(s3);
    drop(kafka);
    Ok(())
}

fn rand_seed() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_nanos() as u64
}

//! `trstream bench`: end-to-end valid transactions per second — consume, validate, Parquet,
//! upload, commit — and the daemon's peak memory, on the embedded infrastructure.
//!
//! The mock cluster and s3s-fs run in a child process (`bench --infra`) that pre-loads the topic
//! before the clock starts: the broker then holds every record in its own memory, which must not
//! count against the daemon's peak RSS, and producing must not compete with the daemon for CPU.
//! The clock runs from the first consumed record to the last commit, so the group join of the
//! mock cluster (a few seconds) is not counted.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;
use crate::metrics::Stats;
use crate::tools::embedded::{EmbeddedKafka, EmbeddedS3};
use crate::tools::produce::{GenOptions, ProduceOptions, ProduceProgress};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Valid transactions to ingest.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Partitions of the topic (the mock keeps ~5 MB of compressed log per partition, so the
    /// pre-load of 1,000,000 records needs about 40 of them).
    #[arg(long, default_value_t = 48)]
    pub partitions: i32,
    /// Override the daemon's flush.max_rows (default: the configuration's).
    #[arg(long)]
    pub flush_rows: Option<usize>,
    /// Override the daemon's memory.total_max_buffered_bytes, in MiB (default: the configuration's).
    #[arg(long)]
    pub total_buffer_mib: Option<usize>,
    /// Internal: run the infrastructure process.
    #[arg(long, hide = true)]
    pub infra: bool,
}

/// Peak resident set size of this process, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.infra {
        return infra(args).await;
    }
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "bench",
            "--infra",
            "--records",
            &args.records.to_string(),
            "--partitions",
            &args.partitions.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the infrastructure process")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    eprintln!("pre-loading {} records into {} partitions…", args.records, args.partitions);
    let ready = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("READY ") => break l,
            Some(Ok(_)) => continue,
            _ => anyhow::bail!("the infrastructure process exited before it was ready"),
        }
    };
    let mut parts = ready.split_whitespace().skip(1);
    let mut field = || parts.next().unwrap_or_default().to_string();
    let (bootstrap, endpoint, secret) = (field(), field(), field());

    // TRSTREAM_* variables apply, so a deployment's own settings can be benchmarked; the
    // embedded store's credentials come last, so they win.
    let credentials = [
        ("TRSTREAM_S3_ACCESS_KEY_ID".to_string(), crate::tools::embedded::ACCESS_KEY.to_string()),
        ("TRSTREAM_S3_SECRET_ACCESS_KEY".to_string(), secret),
    ];
    let env = std::env::vars().chain(credentials).collect();
    let mut config = Config::load(&crate::config::Sources { env, ..Default::default() })?;
    config.kafka.brokers = bootstrap.clone();
    config.kafka.group_id = "trstream-bench".into();
    // The embedded mock cluster keeps no transactional offset commits (EmbeddedKafka::configure).
    config.kafka.exactly_once = false;
    config.s3.endpoint = endpoint;
    if let Some(rows) = args.flush_rows {
        config.flush.max_rows = rows;
    }
    if let Some(mib) = args.total_buffer_mib {
        config.memory.total_max_buffered_bytes = mib * 1024 * 1024;
    }
    config.memory.partition_max_buffered_bytes =
        config.memory.partition_max_buffered_bytes.min(config.memory.total_max_buffered_bytes);
    config.flush.max_bytes = config.flush.max_bytes.min(config.memory.partition_max_buffered_bytes);
    config.http.listen = String::new();
    config.validate()?;

    let pipeline = crate::start(config, Arc::new(crate::Faults::default())).await?;
    let stats = pipeline.stats.clone();
    let target = args.records as i64;
    let committed = || stats.committed().values().sum::<i64>();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Stats::get(&stats.consumed) == 0 {
        anyhow::ensure!(Instant::now() < deadline, "nothing consumed within 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let mut last = Instant::now();
    // Once every record is consumed, drain the way SIGTERM does: the final partial buffers are
    // flushed and committed at once instead of waiting for flush.max_age.
    while Stats::get(&stats.consumed) < args.records {
        anyhow::ensure!(Instant::now() < deadline, "not all records consumed within 10 minutes");
        tokio::time::sleep(Duration::from_millis(2)).await;
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\r[{secs:>5.1}s] consumed {:>9}  committed {:>9} / {target}  buffered {:>4} MiB   ",
                Stats::get(&stats.consumed),
                committed(),
                stats.buffered_now() >> 20
            );
        }
    }
    // The clock stops at the last commit; the partitioner's catch-up, which the shutdown waits
    // for, is reported apart.
    let last_commit = {
        let stats = stats.clone();
        tokio::spawn(async move {
            while stats.committed().values().sum::<i64>() < target {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Instant::now()
        })
    };
    pipeline.shutdown().await;
    let settled = started.elapsed();
    last_commit.abort();
    let elapsed = match last_commit.await {
        Ok(at) => at.duration_since(started),
        Err(_) => settled,
    };
    let written = Stats::get(&stats.written);
    let files = Stats::get(&stats.files);
    let bytes = Stats::get(&stats.upload_bytes);
    anyhow::ensure!(committed() == target, "{} offsets committed, expected {target}", committed());
    let peak = peak_rss_bytes().unwrap_or(0);
    drop(child.stdin.take());
    let _ = child.wait();

    anyhow::ensure!(written == args.records, "{written} rows written, expected {}", args.records);
    let rate = written as f64 / elapsed.as_secs_f64();
    eprintln!();
    println!(
        "bench: {written} valid transactions, {} partitions, in {:.2}s = {rate:.0} tx/s; {files} Parquet files ({:.1} MiB zstd); peak RSS {:.1} MiB",
        args.partitions,
        elapsed.as_secs_f64(),
        bytes as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    println!(
        "table: {} of {files} raw files partitioned ({} rows into {} files) {:.2}s after the first record",
        Stats::get(&stats.partitioned_files),
        Stats::get(&stats.partitioned_rows),
        Stats::get(&stats.table_files_written),
        settled.as_secs_f64()
    );
    Ok(())
}

/// The child process: embedded Kafka and S3, the topic pre-loaded, then wait for stdin to close.
async fn infra(args: BenchArgs) -> anyhow::Result<()> {
    let kafka = EmbeddedKafka::start(1, &[("transactions", args.partitions), ("transactions.dlq", 1)])?;
    let dir = tempfile_dir()?;
    let s3 = EmbeddedS3::start(&dir, 0, &["raw-data", "tb-transactions"]).await?;
    let opts = ProduceOptions {
        brokers: kafka.bootstrap.clone(),
        topic: "transactions".into(),
        count: Some(args.records),
        rate: None,
        duration: None,
        generator: GenOptions { seed: 1, users: 100_000, ..Default::default() },
        properties: vec![("batch.size".into(), "1000000".into()), ("linger.ms".into(), "50".into())],
        progress: true,
    };
    let stop = AtomicBool::new(false);
    let summary = tokio::task::block_in_place(|| {
        crate::tools::produce::produce(&opts, &stop, Arc::new(ProduceProgress::default()))
    })
    .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(summary.acked == args.records, "only {} of {} records acknowledged", summary.acked, args.records);
    // The mock silently drops the oldest data past ~5 MB per partition: refuse to measure then.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap).create()?;
    let mut total = 0;
    for p in 0..args.partitions {
        let (low, high) = probe.fetch_watermarks("transactions", p, Duration::from_secs(5))?;
        anyhow::ensure!(low == 0, "the mock cluster dropped the start of partition {p}; use more --partitions");
        total += high;
    }
    anyhow::ensure!(total as u64 == args.records, "topic holds {total} records, expected {}", args.records);
    println!("READY {} {} {}", kafka.bootstrap, s3.endpoint, s3.secret_key);
    std::io::stdout().flush()?;
    let stdin_closed = Arc::new(AtomicBool::new(false));
    let flag = stdin_closed.clone();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        flag.store(true, Ordering::Relaxed);
    });
    while !stdin_closed.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trstream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

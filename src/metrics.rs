//! Metrics and health: every metric name in one place, the Prometheus recorder, and the
//! `/metrics`, `/healthz`, `/readyz` server.
//!
//! Names follow `trstream_<noun>_<unit>[_total]`, labels are low-cardinality only (partition,
//! reason, actor, trigger), and histograms have explicit buckets. Each pipeline also keeps
//! [`Stats`], plain atomics that the demo, the benchmark and tests read without scraping.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub const RECORDS_CONSUMED: &str = "trstream_records_consumed_total";
pub const RECORDS_WRITTEN: &str = "trstream_records_written_total";
pub const RECORDS_INVALID: &str = "trstream_records_invalid_total";
pub const RECORDS_SKIPPED: &str = "trstream_records_skipped_total";
pub const DLQ_RECORDS: &str = "trstream_dlq_records_total";
pub const FILES_UPLOADED: &str = "trstream_files_uploaded_total";
pub const FILES_ADOPTED: &str = "trstream_files_adopted_total";
pub const UPLOAD_BYTES: &str = "trstream_upload_bytes_total";
pub const UPLOAD_DURATION: &str = "trstream_upload_duration_seconds";
pub const UPLOAD_ERRORS: &str = "trstream_upload_errors_total";
pub const UPLOAD_RETRIES: &str = "trstream_upload_retries_total";
pub const DLQ_ERRORS: &str = "trstream_dlq_errors_total";
pub const COMMIT_ERRORS: &str = "trstream_commit_errors_total";
pub const TXN_ABORTS: &str = "trstream_transaction_aborts_total";
pub const KAFKA_EXACTLY_ONCE: &str = "trstream_kafka_exactly_once";
pub const OFFSETS_COMMITTED: &str = "trstream_offsets_committed_total";
pub const CONSUMER_LAG: &str = "trstream_consumer_lag_records";
pub const END_TO_END_LATENCY: &str = "trstream_end_to_end_latency_seconds";
pub const FLUSHES: &str = "trstream_flushes_total";
pub const FLUSH_DURATION: &str = "trstream_flush_duration_seconds";
pub const ACTOR_RESTARTS: &str = "trstream_actor_restarts_total";
pub const LAKE_BACKOFF: &str = "trstream_lake_actor_backoff_seconds";
pub const BUFFERED_BYTES: &str = "trstream_buffered_bytes";
pub const BUFFERED_RECORDS: &str = "trstream_buffered_records";
pub const PARTITIONS_PAUSED: &str = "trstream_partitions_paused";
pub const PARTITIONS_ASSIGNED: &str = "trstream_partitions_assigned";
pub const COMMITTED_OFFSET: &str = "trstream_committed_offset";
pub const PARTITIONER_FILES: &str = "trstream_partitioner_files_total";
pub const PARTITIONER_ROWS: &str = "trstream_partitioner_rows_total";
pub const PARTITIONER_OUTPUT_FILES: &str = "trstream_partitioner_output_files_total";
pub const PARTITIONER_LAG_FILES: &str = "trstream_partitioner_lag_files";
pub const PARTITIONER_ERRORS: &str = "trstream_partitioner_errors_total";
pub const COMPACTIONS: &str = "trstream_compactions_total";
pub const COMPACTION_INPUT_FILES: &str = "trstream_compaction_input_files_total";
pub const COMPACTION_INPUT_BYTES: &str = "trstream_compaction_input_bytes_total";
pub const COMPACTION_OUTPUT_BYTES: &str = "trstream_compaction_output_bytes_total";
pub const COMPACTION_RECOVERED: &str = "trstream_compaction_intents_recovered_total";
pub const OBJECTS_QUARANTINED: &str = "trstream_objects_quarantined_total";
pub const TABLE_FILES_REBUILT: &str = "trstream_table_files_rebuilt_total";
pub const COMPACTION_ERRORS: &str = "trstream_compaction_errors_total";
pub const ZOMBIE_WRITES_REFUSED: &str = "trstream_zombie_writes_refused_total";
pub const PARTITIONS_FENCED: &str = "trstream_partitions_fenced_total";
pub const PROCESS_STALLS: &str = "trstream_process_stalls_total";
pub const PARTITIONS_STOPPED: &str = "trstream_partitions_stopped";
pub const PARTITIONS_STOPPED_TOTAL: &str = "trstream_partitions_stopped_total";
pub const STORE_CONDITIONAL_WRITES: &str = "trstream_store_conditional_writes";
pub const TABLE_OVERLAPS_REPAIRED: &str = "trstream_table_overlaps_repaired_total";
pub const TABLE_OVERLAPS_UNRESOLVED: &str = "trstream_table_overlaps_unresolved_total";
pub const LAKE_FILES: &str = "trstream_lake_files";
pub const LAKE_SMALL_FILES: &str = "trstream_lake_small_files";
pub const LAKE_BYTES: &str = "trstream_lake_bytes";
pub const READY: &str = "trstream_ready";
pub const RESIDENT_MEMORY: &str = "trstream_process_resident_memory_bytes";
pub const BUILD_INFO: &str = "trstream_build_info";

/// The `actor` label of [`ACTOR_RESTARTS`]: a consumer driver failure restarts the whole ingest
/// subtree, so it counts under `ingest_supervisor`.
pub const ACTOR_KINDS: [&str; 4] = ["partition_worker", "ingest_supervisor", "partitioner", "compactor"];

/// Flush and upload durations, seconds: a flush is milliseconds on a healthy store, and retries
/// during an outage stretch it to the upload backoff's ceiling.
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// End-to-end latency, seconds: a record normally waits for `flush.max_age` (seconds); a backlog
/// read after an outage takes minutes to hours, and event times may be days old (backfills).
const LATENCY_BUCKETS: [f64; 16] =
    [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 86400.0];

/// Latency from each record's broker timestamp, and from its `event_time`, to the commit that
/// covers it. Observed for every record, so it is a plain bucket array rather than a recorder
/// histogram (which would keep each sample until the next scrape).
pub static LATENCY_FROM_BROKER: LatencyHistogram = LatencyHistogram::new("broker_time");
pub static LATENCY_FROM_EVENT: LatencyHistogram = LatencyHistogram::new("event_time");

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(FLUSH_DURATION.into()), &DURATION_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(UPLOAD_DURATION.into()), &DURATION_BUCKETS))
                .expect("buckets are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            register();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RECORDS_CONSUMED, Unit::Count, "Records read from the source topic.");
    describe_counter!(RECORDS_WRITTEN, Unit::Count, "Valid records uploaded to raw-data.");
    describe_counter!(RECORDS_INVALID, Unit::Count, "Records dead-lettered, by reason.");
    describe_counter!(RECORDS_SKIPPED, Unit::Count, "Records re-read that a recovered file already holds.");
    describe_counter!(FILES_UPLOADED, Unit::Count, "Raw Parquet files uploaded.");
    describe_counter!(FILES_ADOPTED, Unit::Count, "Uploaded-but-uncommitted files adopted by the recovery scan.");
    describe_counter!(UPLOAD_BYTES, Unit::Bytes, "Bytes of Parquet uploaded.");
    describe_counter!(DLQ_RECORDS, Unit::Count, "Records acknowledged by the DLQ topic.");
    describe_histogram!(UPLOAD_DURATION, Unit::Seconds, "Time to upload one raw file, retries included.");
    describe_counter!(UPLOAD_ERRORS, Unit::Count, "Failed upload attempts.");
    describe_counter!(UPLOAD_RETRIES, Unit::Count, "Failed upload attempts that were retried.");
    describe_counter!(DLQ_ERRORS, Unit::Count, "Failed DLQ deliveries (each retried).");
    describe_counter!(COMMIT_ERRORS, Unit::Count, "Failed offset commits.");
    describe_counter!(
        TXN_ABORTS,
        Unit::Count,
        "Flush transactions (dead letters + offset commit) aborted and tried again (kafka.exactly_once)."
    );
    describe_gauge!(
        KAFKA_EXACTLY_ONCE,
        Unit::Count,
        "1 when each flush's dead letters and offset commit are one Kafka transaction (kafka.exactly_once), else 0."
    );
    describe_counter!(OFFSETS_COMMITTED, Unit::Count, "Offsets moved past by commits, by partition.");
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Log end offset minus committed offset, by owned partition.");
    describe_counter!(FLUSHES, Unit::Count, "Flushes, by trigger (rows, bytes, age, drain).");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Encode + upload + commit time of one flush.");
    describe_counter!(ACTOR_RESTARTS, Unit::Count, "Actors restarted by their supervisor, by actor kind.");
    describe_gauge!(
        LAKE_BACKOFF,
        Unit::Seconds,
        "The delay before the next restart of a lake actor (partitioner, compactor) that keeps failing, 0 once it has run a restart window without failing. Ingestion goes on meanwhile; the table falls behind."
    );
    describe_gauge!(BUFFERED_BYTES, Unit::Bytes, "Consumed-but-uncommitted bytes held in memory.");
    describe_gauge!(BUFFERED_RECORDS, Unit::Count, "Consumed-but-uncommitted records held in memory.");
    describe_gauge!(PARTITIONS_PAUSED, Unit::Count, "Partitions paused for back-pressure.");
    describe_gauge!(PARTITIONS_ASSIGNED, Unit::Count, "Partitions assigned to this instance.");
    describe_gauge!(COMMITTED_OFFSET, Unit::Count, "Last committed offset, by partition.");
    describe_counter!(PARTITIONER_FILES, Unit::Count, "Raw files split into the table.");
    describe_counter!(PARTITIONER_ROWS, Unit::Count, "Rows written to the table by the partitioner.");
    describe_counter!(PARTITIONER_OUTPUT_FILES, Unit::Count, "Table files written by the partitioner.");
    describe_gauge!(PARTITIONER_LAG_FILES, Unit::Count, "Raw files of owned partitions not yet partitioned.");
    describe_counter!(PARTITIONER_ERRORS, Unit::Count, "Failed partitioner attempts (each retried).");
    describe_counter!(COMPACTIONS, Unit::Count, "Merges completed.");
    describe_counter!(COMPACTION_INPUT_FILES, Unit::Count, "Files merged away by compaction.");
    describe_counter!(COMPACTION_INPUT_BYTES, Unit::Bytes, "Bytes of the files merged (before).");
    describe_counter!(COMPACTION_OUTPUT_BYTES, Unit::Bytes, "Bytes of the merged files (after).");
    describe_counter!(COMPACTION_RECOVERED, Unit::Count, "Compaction intents found at start, by outcome.");
    describe_counter!(
        OBJECTS_QUARANTINED,
        Unit::Count,
        "Lake objects that could not be read, moved to _trstream/quarantine/ with their reason (kind: raw, table, watermark, intent)."
    );
    describe_counter!(
        TABLE_FILES_REBUILT,
        Unit::Count,
        "Quarantined table files rebuilt from the raw files under them."
    );
    describe_counter!(COMPACTION_ERRORS, Unit::Count, "Failed compaction attempts (each retried).");
    describe_counter!(
        ZOMBIE_WRITES_REFUSED,
        Unit::Count,
        "Writes refused because another instance claimed the partition since this one did, by kind (raw, table, watermark, intent, offset_commit)."
    );
    describe_counter!(
        PROCESS_STALLS,
        Unit::Count,
        "Times the whole process was stopped or starved for over 250 ms (SIGSTOP, docker pause, a frozen VM); fences then ask the store for a session timeout."
    );
    describe_gauge!(
        PARTITIONS_STOPPED,
        Unit::Count,
        "Partitions stopped (parked): their log is not the one the lake was made from (a re-created topic, another cluster), or the DLQ refuses one of their dead letters for good; /readyz names each with its cause."
    );
    describe_counter!(PARTITIONS_STOPPED_TOTAL, Unit::Count, "Times a partition was stopped for that reason.");
    describe_counter!(
        PARTITIONS_FENCED,
        Unit::Count,
        "Partitions this instance stopped writing because another instance claimed them (a stall past the session timeout)."
    );
    describe_gauge!(
        STORE_CONDITIONAL_WRITES,
        Unit::Count,
        "1 when the store refuses conditional writes whose precondition fails (MinIO, AWS S3), 0 when it ignores them (Garage)."
    );
    describe_counter!(
        TABLE_OVERLAPS_REPAIRED,
        Unit::Count,
        "Table files deleted because another file of the same rows covers their offsets (a late or second writer)."
    );
    describe_counter!(
        TABLE_OVERLAPS_UNRESOLVED,
        Unit::Count,
        "Overlapping table files holding different rows at one offset, left in place (each pass that finds them)."
    );
    describe_gauge!(LAKE_FILES, Unit::Count, "Files of owned partitions in a table, as of the last compaction pass.");
    describe_gauge!(LAKE_SMALL_FILES, Unit::Count, "Files under compactor.small_file_bytes, by table.");
    describe_gauge!(
        LAKE_BYTES,
        Unit::Bytes,
        "Bytes of the owned partitions' files in a table, as of the last compaction pass."
    );
    describe_gauge!(READY, Unit::Count, "1 when /readyz answers 200 (consuming and able to upload), else 0.");
    describe_gauge!(RESIDENT_MEMORY, Unit::Bytes, "Resident set size of the process.");
    describe_gauge!(BUILD_INFO, Unit::Count, "Always 1; the version is a label.");
}

/// Every series a dashboard reads exists from start-up, at zero, so that "nothing happened" is
/// a 0 and not an empty graph. Series labelled by partition or trigger appear with their first
/// event.
fn register() {
    use crate::record::RejectReason;
    for name in [
        RECORDS_SKIPPED,
        DLQ_RECORDS,
        FILES_UPLOADED,
        FILES_ADOPTED,
        UPLOAD_BYTES,
        UPLOAD_ERRORS,
        UPLOAD_RETRIES,
        DLQ_ERRORS,
        COMMIT_ERRORS,
        TXN_ABORTS,
        PARTITIONER_FILES,
        PARTITIONER_ROWS,
        PARTITIONER_OUTPUT_FILES,
        PARTITIONER_ERRORS,
        COMPACTIONS,
        COMPACTION_INPUT_FILES,
        COMPACTION_INPUT_BYTES,
        COMPACTION_OUTPUT_BYTES,
        COMPACTION_ERRORS,
        TABLE_OVERLAPS_REPAIRED,
        TABLE_OVERLAPS_UNRESOLVED,
        PARTITIONS_FENCED,
        PARTITIONS_STOPPED_TOTAL,
        PROCESS_STALLS,
        TABLE_FILES_REBUILT,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ["raw", "table", "watermark", "intent"] {
        metrics::counter!(OBJECTS_QUARANTINED, "kind" => kind).increment(0);
    }
    for kind in ["raw", "table", "watermark", "intent", "offset_commit"] {
        metrics::counter!(ZOMBIE_WRITES_REFUSED, "kind" => kind).increment(0);
    }
    for reason in RejectReason::ALL {
        metrics::counter!(RECORDS_INVALID, "reason" => reason.as_str()).increment(0);
    }
    for actor in ACTOR_KINDS {
        metrics::counter!(ACTOR_RESTARTS, "actor" => actor).increment(0);
    }
    for name in [BUFFERED_BYTES, BUFFERED_RECORDS, PARTITIONS_PAUSED, PARTITIONS_ASSIGNED, PARTITIONER_LAG_FILES, READY]
    {
        metrics::gauge!(name).set(0.0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// A cumulative histogram over [`LATENCY_BUCKETS`] that takes a whole file's records at once.
#[derive(Debug)]
pub struct LatencyHistogram {
    from: &'static str,
    /// Per bucket (the last is `+Inf`), not cumulative; summed when rendered.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    const fn new(from: &'static str) -> Self {
        LatencyHistogram {
            from,
            counts: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Observes `now_us - t` for each timestamp `t` (microseconds since the epoch); a timestamp
    /// in the future (a producer's clock ahead of ours) counts as zero.
    pub fn observe_since(&self, timestamps_us: &[i64], now_us: i64) {
        if timestamps_us.is_empty() {
            return;
        }
        let mut counts = [0u64; LATENCY_BUCKETS.len() + 1];
        let mut sum = 0u64;
        for &t in timestamps_us {
            let micros = now_us.saturating_sub(t).max(0) as u64;
            sum = sum.saturating_add(micros);
            let secs = micros as f64 / 1e6;
            counts[LATENCY_BUCKETS.partition_point(|&le| le < secs)] += 1;
        }
        for (c, n) in self.counts.iter().zip(counts) {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add(sum, Ordering::Relaxed);
    }

    /// Observations so far (for tests and the demo).
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{END_TO_END_LATENCY}_bucket{{from=\"{}\",le=\"{le}\"}} {cumulative}", self.from);
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{END_TO_END_LATENCY}_sum{{from=\"{}\"}} {sum}", self.from);
        let _ = writeln!(out, "{END_TO_END_LATENCY}_count{{from=\"{}\"}} {cumulative}", self.from);
    }
}

/// The text of `/metrics`: the recorder's metrics after refreshing the ones read at scrape time,
/// then the latency histograms.
fn render(handle: &PrometheusHandle, health: &Health) -> String {
    metrics::gauge!(READY).set(if health.ready() { 1.0 } else { 0.0 });
    metrics::gauge!(PARTITIONS_STOPPED).set(health.stopped.lock().unwrap().len() as f64);
    if let Some(rss) = resident_memory_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(rss as f64);
    }
    let mut out = handle.render();
    out.push_str(&format!(
        "# HELP {END_TO_END_LATENCY} Time from a record's broker timestamp or event_time to the commit that covers it.\n# TYPE {END_TO_END_LATENCY} histogram\n"
    ));
    LATENCY_FROM_BROKER.render(&mut out);
    LATENCY_FROM_EVENT.render(&mut out);
    out
}

/// `GET url` (plain `http://host:port/path`) on a daemon's health endpoint: the body on 200, an
/// error naming the URL and the answer otherwise.
pub fn check_health(url: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let rest =
        url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("{url:?}: only http:// URLs are supported"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("{url}: cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url}: {host:?} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("{url}: cannot connect: {e}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| anyhow::anyhow!("{url}: reading the answer: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body.to_string())
    } else {
        anyhow::bail!("{url} answered {status:?}: {}", body.trim())
    }
}

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// In-process counters of one pipeline, for the demo line, the benchmark and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub consumed: AtomicU64,
    pub written: AtomicU64,
    pub invalid: AtomicU64,
    pub skipped: AtomicU64,
    pub files: AtomicU64,
    pub adopted_files: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub upload_errors: AtomicU64,
    /// Restarts of any actor (workers and the ingest subtree).
    pub restarts: AtomicU64,
    /// Restarts of the whole ingest subtree by Root (escalations).
    pub ingest_restarts: AtomicU64,
    pub max_buffered_bytes: AtomicU64,
    pub buffered_bytes: AtomicU64,
    pub pauses: AtomicU64,
    /// Raw files the partitioner has split into the table, and the rows and files it wrote.
    pub partitioned_files: AtomicU64,
    pub partitioned_rows: AtomicU64,
    pub table_files_written: AtomicU64,
    /// Merges completed, the files they replaced, and intents recovered at start.
    pub compactions: AtomicU64,
    pub compacted_files: AtomicU64,
    pub compaction_bytes_before: AtomicU64,
    pub compaction_bytes_after: AtomicU64,
    pub intents_recovered: AtomicU64,
    /// Table files deleted because another covering their offsets holds their rows (I9).
    pub overlaps_repaired: AtomicU64,
    /// Partitions given up because another instance claimed them (I9).
    pub fenced_partitions: AtomicU64,
    /// Writes refused by the fence (I9): raw, table (incl. watermark) and intent writes.
    pub zombie_writes_refused: AtomicU64,
    /// Recoveries that finished after their partition was revoked or replaced: discarded.
    pub stale_recoveries: AtomicU64,
    /// Compaction passes, and those that listed the whole table (the others list only the Hive
    /// partitions the partitioner wrote to since the last pass).
    pub compaction_passes: AtomicU64,
    pub compaction_full_listings: AtomicU64,
    /// Restarts of the partitioner and the compactor.
    pub lake_restarts: AtomicU64,
    /// Lake objects quarantined (I10).
    pub quarantined: AtomicU64,
    /// Quarantined table files rebuilt from raw-data.
    pub table_files_rebuilt: AtomicU64,
    committed: Mutex<BTreeMap<i32, i64>>,
}

impl Stats {
    pub fn record_commit(&self, partition: i32, next_offset: i64) {
        self.committed.lock().unwrap().insert(partition, next_offset);
        metrics::gauge!(COMMITTED_OFFSET, "partition" => partition.to_string()).set(next_offset as f64);
    }

    /// A committed next-offset read from the group (a recovery's): a lower bound of the commit,
    /// kept unless this instance knows a later one (a stale recovery reads an older one).
    pub fn commit_read(&self, partition: i32, next_offset: i64) {
        let mut committed = self.committed.lock().unwrap();
        if committed.get(&partition).is_none_or(|&known| known < next_offset) {
            committed.insert(partition, next_offset);
            metrics::gauge!(COMMITTED_OFFSET, "partition" => partition.to_string()).set(next_offset as f64);
        }
    }

    /// Committed next-offsets by partition, as this instance last committed them (or read them,
    /// recovering a partition).
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        self.committed.lock().unwrap().clone()
    }

    /// Consumed-but-uncommitted bytes right now (I4), as of the driver's last routing round.
    pub fn buffered_now(&self) -> u64 {
        self.buffered_bytes.load(Ordering::Relaxed)
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    /// The supervision tree is up (false once it gave up).
    pub alive: AtomicBool,
    /// The consumer is running and has joined its group.
    pub consuming: AtomicBool,
    /// The last S3 operation succeeded.
    pub s3_ok: AtomicBool,
    /// Why the supervision tree gave up, when it did.
    pub exit_reason: Mutex<Option<String>>,
    /// Partitions stopped because their log is not the lake's, and why.
    pub stopped: Mutex<std::collections::BTreeMap<i32, String>>,
    /// A failure no restart can mend (a fatal consumer error), set by the child that met it: its
    /// parent gives up at once with this reason instead of restarting it.
    pub fatal: Mutex<Option<String>>,
    /// Lake actors restarted with backoff (they keep failing) and why: `/readyz` lists them
    /// without failing (ingestion goes on), until one has run a restart window again.
    pub lake_failing: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Health {
    /// What `/readyz` answers 200 to: consuming, the last S3 operation succeeded, and no
    /// partition stopped.
    pub fn ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
            && self.s3_ok.load(Ordering::Relaxed)
            && self.stopped.lock().unwrap().is_empty()
    }

    pub fn set_lake_failing(&self, actor: &'static str, why: String) {
        self.lake_failing.lock().unwrap().insert(actor, why);
    }

    pub fn clear_lake_failing(&self, actor: &str) {
        self.lake_failing.lock().unwrap().remove(actor);
    }

    pub fn set_stopped(&self, p: i32, why: String) {
        self.stopped.lock().unwrap().insert(p, why);
    }

    /// Partitions given up: the next owner checks them again.
    pub fn clear_stopped(&self, parts: &[i32]) {
        let mut stopped = self.stopped.lock().unwrap();
        for p in parts {
            stopped.remove(p);
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let (socket, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = shutdown.changed() => break,
            };
            let handle = handle.clone();
            let health = health.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = route(req.uri().path(), &handle, &health);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = builder.serve_connection(TokioIo::new(socket), svc).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok(local)
}

fn route(path: &str, handle: &PrometheusHandle, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    match path {
        "/metrics" => text(StatusCode::OK, render(handle, health)),
        "/healthz" => {
            if health.alive.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "supervision tree stopped\n".into())
            }
        }
        "/readyz" => {
            let consuming = health.consuming.load(Ordering::Relaxed);
            let s3 = health.s3_ok.load(Ordering::Relaxed);
            let stopped = health.stopped.lock().unwrap().clone();
            // Ingestion does not wait for the table (I10): a failing lake actor is named, not
            // counted against readiness.
            let lake: String = health
                .lake_failing
                .lock()
                .unwrap()
                .iter()
                .map(|(actor, why)| format!("{actor} keeps failing (the table falls behind): {why}\n"))
                .collect();
            if consuming && s3 && stopped.is_empty() {
                text(StatusCode::OK, format!("ready\n{lake}"))
            } else {
                let mut body = format!("not ready: consuming={consuming} s3_reachable={s3}\n");
                for (p, why) in stopped {
                    body.push_str(&format!("partition {p} stopped: {why}\n"));
                }
                body.push_str(&lake);
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = LatencyHistogram::new("broker_time");
        let now = 1_000_000_000_000;
        // 0.2 s, 2 s, 2 days (beyond the last bucket), and a timestamp 1 s in the future (0).
        h.observe_since(&[now - 200_000, now - 2_000_000, now - 172_800_000_000, now + 1_000_000], now);
        h.observe_since(&[], now);
        let mut out = String::new();
        h.render(&mut out);
        let value = |series: &str| -> f64 {
            let line = out.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} in {out}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let b = |le: &str| value(&format!("{END_TO_END_LATENCY}_bucket{{from=\"broker_time\",le=\"{le}\"}}"));
        assert_eq!(b("0.1"), 1.0, "the future timestamp counts as 0");
        assert_eq!(b("0.25"), 2.0);
        assert_eq!(b("1"), 2.0);
        assert_eq!(b("2.5"), 3.0);
        assert_eq!(b("86400"), 3.0);
        assert_eq!(b("+Inf"), 4.0);
        assert_eq!(value(&format!("{END_TO_END_LATENCY}_count")), 4.0);
        assert!((value(&format!("{END_TO_END_LATENCY}_sum")) - 172_802.2).abs() < 1e-6);
        assert_eq!(h.count(), 4);
    }
}

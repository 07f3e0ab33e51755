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
pub const FILES_UPLOADED: &str = "trstream_files_uploaded_total";
pub const FILES_ADOPTED: &str = "trstream_files_adopted_total";
pub const UPLOAD_BYTES: &str = "trstream_upload_bytes_total";
pub const UPLOAD_ERRORS: &str = "trstream_upload_errors_total";
pub const DLQ_ERRORS: &str = "trstream_dlq_errors_total";
pub const COMMIT_ERRORS: &str = "trstream_commit_errors_total";
pub const FLUSHES: &str = "trstream_flushes_total";
pub const FLUSH_DURATION: &str = "trstream_flush_duration_seconds";
pub const ACTOR_RESTARTS: &str = "trstream_actor_restarts_total";
pub const BUFFERED_BYTES: &str = "trstream_buffered_bytes";
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
pub const COMPACTION_ERRORS: &str = "trstream_compaction_errors_total";
pub const LAKE_FILES: &str = "trstream_lake_files";
pub const LAKE_SMALL_FILES: &str = "trstream_lake_small_files";

const FLUSH_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(FLUSH_DURATION.into()), &FLUSH_BUCKETS)
                .expect("buckets are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
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
    describe_counter!(UPLOAD_ERRORS, Unit::Count, "Failed upload attempts (each retried).");
    describe_counter!(DLQ_ERRORS, Unit::Count, "Failed DLQ deliveries (each retried).");
    describe_counter!(COMMIT_ERRORS, Unit::Count, "Failed offset commits.");
    describe_counter!(FLUSHES, Unit::Count, "Flushes, by trigger (rows, bytes, age, drain).");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Encode + upload + commit time of one flush.");
    describe_counter!(ACTOR_RESTARTS, Unit::Count, "Actors restarted by their supervisor, by actor kind.");
    describe_gauge!(BUFFERED_BYTES, Unit::Bytes, "Consumed-but-uncommitted bytes held in memory.");
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
    describe_counter!(COMPACTION_ERRORS, Unit::Count, "Failed compaction attempts (each retried).");
    describe_gauge!(LAKE_FILES, Unit::Count, "Files of owned partitions in a table, as of the last compaction pass.");
    describe_gauge!(LAKE_SMALL_FILES, Unit::Count, "Files under compactor.small_file_bytes, by table.");
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
    /// Compaction passes, and those that listed the whole table (the others list only the Hive
    /// partitions the partitioner wrote to since the last pass).
    pub compaction_passes: AtomicU64,
    pub compaction_full_listings: AtomicU64,
    /// Restarts of the partitioner and the compactor.
    pub lake_restarts: AtomicU64,
    committed: Mutex<BTreeMap<i32, i64>>,
}

impl Stats {
    pub fn record_commit(&self, partition: i32, next_offset: i64) {
        self.committed.lock().unwrap().insert(partition, next_offset);
        metrics::gauge!(COMMITTED_OFFSET, "partition" => partition.to_string()).set(next_offset as f64);
    }

    /// Committed next-offsets by partition, as this instance last committed them.
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
        "/metrics" => text(StatusCode::OK, handle.render()),
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
            if consuming && s3 {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: consuming={consuming} s3_reachable={s3}\n"))
            }
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

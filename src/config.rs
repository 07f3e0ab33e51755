//! The one configuration struct (design §7): a TOML file, overridden by `TRSTREAM_<SECTION>_<KEY>`
//! environment variables, overridden by command-line `--set section.key=value` and the common flags.
//!
//! Every field has a default that runs the demo; unknown keys and inconsistent values stop start-up
//! with a [`ConfigError`] naming the key, because a daemon that silently ignores a typo in
//! `flush.max_rows` runs for months with the wrong behaviour.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::record::DEFAULT_CURRENCIES;

/// A configuration problem, naming the key (`flush.max_rows`) or the source it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error at `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub flush: FlushConfig,
    pub memory: MemoryConfig,
    pub upload: UploadConfig,
    pub parquet: ParquetConfig,
    pub validation: ValidationConfig,
    pub shutdown: ShutdownConfig,
    pub supervision: SupervisionConfig,
    pub http: HttpConfig,
    pub partitioner: PartitionerConfig,
    pub compactor: CompactorConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// The source topic of transactions.
    pub topic: String,
    /// The dead-letter topic for records that fail validation.
    pub dlq_topic: String,
    /// Consumer group id; every instance of one deployment shares it.
    pub group_id: String,
    /// Where a partition with no committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Group session timeout; a revoked partition must drain well within it.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Upper bound on librdkafka's prefetch queue (all partitions together), in KiB; part of the
    /// I4 memory bound.
    pub fetch_queue_kbytes: u64,
    /// How long librdkafka waits before fetching again once the prefetch queue is full.
    /// librdkafka's own default (1s) stalls a busy consumer; keep it short.
    #[serde(with = "humantime_serde")]
    pub fetch_queue_backoff: Duration,
    /// Bound on a single Kafka admin/commit/metadata request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the consumer lag on `/metrics` is refreshed (librdkafka's statistics interval).
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
    /// Extra librdkafka properties passed verbatim to the consumer and the DLQ producer.
    pub properties: BTreeMap<String, String>,
    /// Which incarnation of the topic this daemon ingests, empty for the first. After the topic
    /// was deleted and re-created (or the daemon pointed at another cluster) with the same
    /// buckets, its offsets start again at 0 and would meet the old lake's files: trstream then
    /// stops those partitions with an error. Setting a new label here (`2`, `2026-11`) ingests
    /// the new log under lake names of its own, `<topic>~<label>+<partition>+…`, beside the old
    /// incarnation's files, which stay as they are.
    pub incarnation: String,
    /// Each flush's dead letters and its offset commit go in one Kafka transaction, of a
    /// transactional producer per partition (`transactional.id` = `<group_id>.<lake topic>.<partition>`):
    /// `read_committed` readers of the DLQ see every dead letter exactly once, and an instance
    /// that lost its partition while stalled has its commits refused by the broker. Needs a
    /// broker with transactions (Apache Kafka 2.5 or later, Redpanda); `false` commits with the
    /// consumer and makes the DLQ at-least-once (librdkafka's mock cluster, which the demo uses,
    /// has no transactional offset commits).
    pub exactly_once: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic: "transactions".into(),
            dlq_topic: "transactions.dlq".into(),
            group_id: "trstream".into(),
            auto_offset_reset: "earliest".into(),
            session_timeout: Duration::from_secs(45),
            fetch_queue_kbytes: 16 * 1024,
            fetch_queue_backoff: Duration::from_millis(10),
            request_timeout: Duration::from_secs(10),
            lag_interval: Duration::from_secs(5),
            properties: BTreeMap::new(),
            incarnation: String::new(),
            exactly_once: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// S3 endpoint URL (MinIO, Garage, AWS), `http://` or `https://`.
    pub endpoint: String,
    pub region: String,
    /// Access key id; prefer the `TRSTREAM_S3_ACCESS_KEY_ID` environment variable.
    pub access_key_id: String,
    /// Secret key; prefer `TRSTREAM_S3_SECRET_ACCESS_KEY`. Never logged.
    pub secret_access_key: String,
    /// Bucket of the raw (bronze) files.
    pub raw_bucket: String,
    /// Bucket of the Hive-partitioned table (`year=/month=/day=/transaction_type=/`).
    pub table_bucket: String,
    /// Key prefix inside the raw bucket (`raw-data/<prefix>/partition=<p>/…`).
    pub raw_prefix: String,
    /// Path-style addressing (`http://host/bucket/key`), needed by MinIO and most self-hosted stores.
    pub force_path_style: bool,
    /// Create the bucket at start-up when it is missing (the demo does; production usually not).
    pub create_bucket: bool,
    /// Bound on one S3 request, retries included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: "http://localhost:9000".into(),
            region: "us-east-1".into(),
            // No built-in credentials: they come from the environment or the config file.
            access_key_id: String::new(),
            secret_access_key: String::new(),
            raw_bucket: "raw-data".into(),
            table_bucket: "tb-transactions".into(),
            raw_prefix: "transactions".into(),
            force_path_style: true,
            create_bucket: false,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Flush a partition's buffer once it holds this many valid rows.
    pub max_rows: usize,
    /// Flush once the consumed payload bytes of the buffer reach this many bytes.
    pub max_bytes: usize,
    /// Flush a non-empty buffer once its oldest record is this old.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig { max_rows: 100_000, max_bytes: 24 * 1024 * 1024, max_age: Duration::from_secs(10) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Bytes of consumed-but-uncommitted records one partition may hold before it is paused (I4).
    pub partition_max_buffered_bytes: usize,
    /// Bytes all partitions together may hold before the largest buffers are flushed early and
    /// fetching is held (I4). Peak RSS is roughly 2.4 × this (see the README's benchmark).
    pub total_max_buffered_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { partition_max_buffered_bytes: 32 * 1024 * 1024, total_max_buffered_bytes: 96 * 1024 * 1024 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// First wait after a failed upload; doubles up to `retry_max_backoff`.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    /// Ceiling of the wait between upload attempts; uploads retry until they succeed or shutdown.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
}

impl UploadConfig {
    /// The wait before retrying a store operation after the wait `previous` (zero: the first).
    pub fn next_backoff(&self, previous: Duration) -> Duration {
        (previous * 2).clamp(self.retry_initial_backoff, self.retry_max_backoff)
    }
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig { retry_initial_backoff: Duration::from_millis(100), retry_max_backoff: Duration::from_secs(10) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    /// zstd level for Parquet pages, 1 (fast) ..= 22 (small).
    pub zstd_level: i32,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        ParquetConfig { zstd_level: 1, row_group_rows: 128 * 1024 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// ISO 4217 allow-list for `currency`.
    pub currencies: Vec<String>,
    /// Payloads larger than this many bytes are dead-lettered as `oversized`.
    pub max_record_bytes: usize,
    /// How far in the future `event_time` may be.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How old `event_time` may be.
    #[serde(with = "humantime_serde")]
    pub max_event_age: Duration,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            currencies: DEFAULT_CURRENCIES.iter().map(|c| c.to_string()).collect(),
            max_record_bytes: 64 * 1024,
            max_future_skew: Duration::from_secs(300),
            max_event_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Deadline for draining one revoked partition (flush, upload, commit); below the session timeout.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Deadline for the whole graceful shutdown on SIGTERM/SIGINT (I7).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout: Duration::from_secs(20), timeout: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Restarts of one child allowed within `restart_window` before its parent gives up.
    pub max_restarts: u32,
    /// The window over which restarts are counted.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig { max_restarts: 5, restart_window: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionerConfig {
    /// Run the partitioner (raw files → the Hive-partitioned table).
    pub enabled: bool,
    /// How often raw-data is listed past each watermark, as a safety net behind the hand-over of
    /// each uploaded file (which covers the common case at once).
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
    /// Raw files of one Kafka partition one listing queues at most (I4): a longer backlog is
    /// listed again from where the last one ended once those are partitioned.
    pub max_files_per_scan: usize,
}

impl Default for PartitionerConfig {
    fn default() -> Self {
        PartitionerConfig { enabled: true, scan_interval: Duration::from_secs(30), max_files_per_scan: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CompactorConfig {
    /// Run the compactor (merges small files of the table).
    pub enabled: bool,
    /// Time between compaction passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A file smaller than this many bytes is small: a candidate for merging.
    pub small_file_bytes: u64,
    /// A merged file is built from inputs adding up to at most this many bytes.
    pub target_file_bytes: u64,
    /// Merge a Hive partition's small files (of one Kafka partition) once there are this many.
    pub min_files: usize,
    /// After a table write failed (it may still be applied by the store: a late write, I9),
    /// for this long the files under its offsets are not merged and its Hive partition is
    /// listed every pass, so what lands is repaired.
    #[serde(with = "humantime_serde")]
    pub late_write_window: Duration,
}

impl Default for CompactorConfig {
    fn default() -> Self {
        CompactorConfig {
            enabled: true,
            interval: Duration::from_secs(60),
            small_file_bytes: 32 << 20,
            target_file_bytes: 128 << 20,
            min_files: 8,
            late_write_window: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of `/metrics`, `/healthz` and `/readyz`; empty disables the server.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: "0.0.0.0:9464".into() }
    }
}

/// Where the configuration came from: the file, then environment, then `--set` overrides.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<std::path::PathBuf>,
    /// `(NAME, value)` pairs, normally `std::env::vars()`; only `TRSTREAM_*` are read.
    pub env: Vec<(String, String)>,
    /// `section.key=value` overrides, last wins.
    pub overrides: Vec<String>,
}

/// librdkafka properties trstream sets itself: overriding them through `kafka.properties` would
/// break a guarantee (auto-commit breaks I1; a cooperative or KIP-848 protocol breaks the eager
/// rebalance handling of the driver), so they are refused, naming the key to use instead.
const OWNED_KAFKA_PROPERTIES: [(&str, &str); 16] = [
    ("bootstrap.servers", "kafka.brokers"),
    ("group.id", "kafka.group_id"),
    ("auto.offset.reset", "kafka.auto_offset_reset"),
    ("session.timeout.ms", "kafka.session_timeout"),
    ("queued.max.messages.kbytes", "kafka.fetch_queue_kbytes"),
    ("fetch.queue.backoff.ms", "kafka.fetch_queue_backoff"),
    ("statistics.interval.ms", "kafka.lag_interval"),
    ("enable.auto.commit", "nothing: trstream commits only after the upload (I1)"),
    ("enable.auto.offset.store", "nothing: trstream commits explicit offsets"),
    ("enable.partition.eof", "nothing"),
    ("partition.assignment.strategy", "nothing: trstream drains partitions with the eager protocol"),
    ("group.protocol", "nothing: trstream drains partitions with the classic protocol"),
    ("transactional.id", "kafka.exactly_once: each partition has its own, <group_id>.<lake topic>.<partition>"),
    (
        "isolation.level",
        "nothing: trstream reads read_committed, so that a producer's aborted transactions never reach the lake",
    ),
    ("enable.idempotence", "nothing: the DLQ producers are idempotent, which their transactions need"),
    ("acks", "nothing: a dead letter counts as written only once every in-sync replica has it (acks=all, I1)"),
];

/// `TRSTREAM_` variables that are not configuration keys.
const NOT_CONFIG_ENV: [&str; 2] = ["TRSTREAM_LOG", crate::faults::ENV];

const SECTIONS: [&str; 12] = [
    "kafka",
    "s3",
    "flush",
    "memory",
    "upload",
    "parquet",
    "validation",
    "shutdown",
    "supervision",
    "http",
    "partitioner",
    "compactor",
];

/// A scalar given as text (env or flag): TOML syntax where it parses (`100`, `true`, `["USD"]`),
/// a plain string otherwise (`localhost:9092`, `30s`).
fn parse_scalar(text: &str) -> toml::Value {
    let doc = format!("v = {text}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

fn set_path(root: &mut toml::Table, path: &str, value: toml::Value, origin: &str) -> Result<(), ConfigError> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::new(origin, format!("`{path}` is not of the form section.key")));
    }
    if !SECTIONS.contains(&parts[0]) {
        return Err(ConfigError::new(
            origin,
            format!("unknown section `{}`, expected one of {}", parts[0], SECTIONS.join(", ")),
        ));
    }
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| ConfigError::new(origin, format!("`{p}` is not a table")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Config {
    /// Loads file + env + overrides, then validates. Any error names the offending key.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut root = match &sources.file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        for (name, value) in &sources.env {
            let Some(rest) = name.strip_prefix("TRSTREAM_") else { continue };
            if NOT_CONFIG_ENV.contains(&name.as_str()) {
                continue;
            }
            // Sections carry no underscore, so the first one separates section from key;
            // `kafka.properties` entries are spelled TRSTREAM_KAFKA_PROPERTIES__fetch.wait.max.ms.
            let lower = rest.to_ascii_lowercase();
            let Some((section, key)) = lower.split_once('_') else {
                return Err(ConfigError::new(name.clone(), "expected TRSTREAM_<SECTION>_<KEY>"));
            };
            let path = match key.split_once("__") {
                Some(("properties", prop)) => {
                    let prop = rest.split_once("__").map_or(prop, |x| x.1);
                    let table =
                        root.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let props = table
                        .as_table_mut()
                        .ok_or_else(|| ConfigError::new(name.clone(), "not a table"))?
                        .entry("properties")
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    props
                        .as_table_mut()
                        .ok_or_else(|| ConfigError::new(name.clone(), "not a table"))?
                        .insert(prop.to_string(), toml::Value::String(value.clone()));
                    continue;
                }
                _ => format!("{section}.{key}"),
            };
            set_path(&mut root, &path, parse_scalar(value), name)?;
        }
        for o in &sources.overrides {
            let (path, value) =
                o.split_once('=').ok_or_else(|| ConfigError::new(o.clone(), "expected --set section.key=value"))?;
            set_path(&mut root, path.trim(), parse_scalar(value.trim()), path.trim())?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The topic's name in the lake's keys (raw files, table files, watermarks, owner records):
    /// `kafka.topic`, followed by `~` and `kafka.incarnation` when that is set. `~` is not
    /// allowed in a Kafka topic name, so no topic's lake name is another's.
    pub fn lake_topic(&self) -> String {
        if self.kafka.incarnation.is_empty() {
            self.kafka.topic.clone()
        } else {
            format!("{}~{}", self.kafka.topic, self.kafka.incarnation)
        }
    }

    /// Cross-field and range checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |k: &str, m: String| Err(ConfigError::new(k, m));
        if self.kafka.brokers.trim().is_empty() {
            return err("kafka.brokers", "must not be empty".into());
        }
        for (k, t) in [("kafka.topic", &self.kafka.topic), ("kafka.dlq_topic", &self.kafka.dlq_topic)] {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return err(k, format!("{t:?} is not a valid Kafka topic name ([a-zA-Z0-9._-]+)"));
            }
        }
        if self.kafka.topic == self.kafka.dlq_topic {
            return err("kafka.dlq_topic", format!("must differ from kafka.topic ({:?})", self.kafka.topic));
        }
        let label = &self.kafka.incarnation;
        if label.len() > 32 || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return err(
                "kafka.incarnation",
                format!("{label:?} is not a label of up to 32 letters, digits, '.', '_' or '-'"),
            );
        }
        for key in self.kafka.properties.keys() {
            if let Some((_, instead)) = OWNED_KAFKA_PROPERTIES.iter().find(|(k, _)| k == key) {
                return err(
                    &format!("kafka.properties.{key}"),
                    format!("is set by trstream and cannot be overridden; use {instead}"),
                );
            }
        }
        if self.kafka.group_id.is_empty() {
            return err("kafka.group_id", "must not be empty".into());
        }
        if !["earliest", "latest"].contains(&self.kafka.auto_offset_reset.as_str()) {
            return err(
                "kafka.auto_offset_reset",
                format!("{:?} is not one of earliest, latest", self.kafka.auto_offset_reset),
            );
        }
        if self.shutdown.drain_timeout >= self.kafka.session_timeout {
            return err(
                "shutdown.drain_timeout",
                format!(
                    "{} must be shorter than kafka.session_timeout ({}), or a slow drain loses the group",
                    humantime::format_duration(self.shutdown.drain_timeout),
                    humantime::format_duration(self.kafka.session_timeout)
                ),
            );
        }
        if self.s3.request_timeout >= self.shutdown.drain_timeout {
            return err(
                "s3.request_timeout",
                format!(
                    "{} must be shorter than shutdown.drain_timeout ({}): a drain must have time for at least one upload",
                    humantime::format_duration(self.s3.request_timeout),
                    humantime::format_duration(self.shutdown.drain_timeout)
                ),
            );
        }
        if !(self.s3.endpoint.starts_with("http://") || self.s3.endpoint.starts_with("https://")) {
            return err("s3.endpoint", format!("{:?} must start with http:// or https://", self.s3.endpoint));
        }
        for (key, value, env) in [
            ("s3.access_key_id", &self.s3.access_key_id, "TRSTREAM_S3_ACCESS_KEY_ID"),
            ("s3.secret_access_key", &self.s3.secret_access_key, "TRSTREAM_S3_SECRET_ACCESS_KEY"),
        ] {
            if value.is_empty() {
                return err(key, format!("is not set; trstream has no built-in credentials: set {env}"));
            }
        }
        if self.kafka.lag_interval < Duration::from_millis(100) {
            return err(
                "kafka.lag_interval",
                format!("{} is too short: at least 100ms", humantime::format_duration(self.kafka.lag_interval)),
            );
        }
        if self.s3.raw_bucket.is_empty() {
            return err("s3.raw_bucket", "must not be empty".into());
        }
        if self.s3.table_bucket.is_empty() {
            return err("s3.table_bucket", "must not be empty".into());
        }
        if self.s3.table_bucket == self.s3.raw_bucket {
            return err("s3.table_bucket", format!("must differ from s3.raw_bucket ({:?})", self.s3.raw_bucket));
        }
        if self.s3.raw_prefix.starts_with('/') || self.s3.raw_prefix.ends_with('/') {
            return err("s3.raw_prefix", format!("{:?} must not start or end with '/'", self.s3.raw_prefix));
        }
        if self.flush.max_rows == 0 {
            return err("flush.max_rows", "must be greater than 0".into());
        }
        if self.flush.max_bytes == 0 {
            return err("flush.max_bytes", "must be greater than 0".into());
        }
        if self.flush.max_age.is_zero() {
            return err("flush.max_age", "must be greater than 0s".into());
        }
        if self.memory.partition_max_buffered_bytes > self.memory.total_max_buffered_bytes {
            return err(
                "memory.partition_max_buffered_bytes",
                format!(
                    "{} exceeds memory.total_max_buffered_bytes ({})",
                    self.memory.partition_max_buffered_bytes, self.memory.total_max_buffered_bytes
                ),
            );
        }
        if self.flush.max_bytes > self.memory.partition_max_buffered_bytes {
            return err(
                "flush.max_bytes",
                format!(
                    "{} exceeds memory.partition_max_buffered_bytes ({}): the partition would pause before it flushes",
                    self.flush.max_bytes, self.memory.partition_max_buffered_bytes
                ),
            );
        }
        if self.validation.max_record_bytes == 0 {
            return err("validation.max_record_bytes", "must be greater than 0".into());
        }
        if self.validation.max_record_bytes > self.memory.partition_max_buffered_bytes {
            return err("validation.max_record_bytes", "exceeds memory.partition_max_buffered_bytes".into());
        }
        if self.validation.currencies.is_empty() {
            return err("validation.currencies", "must list at least one currency".into());
        }
        if let Some(c) =
            self.validation.currencies.iter().find(|c| c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return err("validation.currencies", format!("{c:?} is not an ISO 4217 alpha-3 code"));
        }
        if self.upload.retry_initial_backoff.is_zero()
            || self.upload.retry_initial_backoff > self.upload.retry_max_backoff
        {
            return err(
                "upload.retry_initial_backoff",
                "must be greater than 0 and at most upload.retry_max_backoff".into(),
            );
        }
        if !(1..=22).contains(&self.parquet.zstd_level) {
            return err("parquet.zstd_level", format!("{} is outside 1..=22", self.parquet.zstd_level));
        }
        if self.parquet.row_group_rows == 0 {
            return err("parquet.row_group_rows", "must be greater than 0".into());
        }
        if self.supervision.max_restarts == 0 {
            return err("supervision.max_restarts", "must be at least 1".into());
        }
        if self.partitioner.scan_interval.is_zero() {
            return err("partitioner.scan_interval", "must be greater than 0s".into());
        }
        if self.partitioner.max_files_per_scan == 0 {
            return err("partitioner.max_files_per_scan", "must be at least 1 file".into());
        }
        if self.compactor.interval.is_zero() {
            return err("compactor.interval", "must be greater than 0s".into());
        }
        if self.compactor.min_files < 2 {
            return err(
                "compactor.min_files",
                format!("{} must be at least 2 (merging one file gains nothing)", self.compactor.min_files),
            );
        }
        if self.compactor.small_file_bytes == 0 || self.compactor.small_file_bytes > self.compactor.target_file_bytes {
            return err(
                "compactor.small_file_bytes",
                format!(
                    "{} must be greater than 0 and at most compactor.target_file_bytes ({})",
                    self.compactor.small_file_bytes, self.compactor.target_file_bytes
                ),
            );
        }
        if self.compactor.enabled && !self.partitioner.enabled {
            return err(
                "compactor.enabled",
                "the compactor only merges files the partitioner has finished with; enable partitioner.enabled too"
                    .into(),
            );
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return err("http.listen", format!("{:?} is not an address like 0.0.0.0:9464", self.http.listen));
        }
        Ok(())
    }

    pub fn validator(&self) -> crate::record::Validator {
        crate::record::Validator::new(
            self.validation.currencies.clone(),
            self.validation.max_record_bytes,
            self.validation.max_future_skew,
            self.validation.max_event_age,
        )
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let key = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key.clone(), format!("cannot read the config file: {e}")))?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::new(key, format!("not valid TOML: {e}")))
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut redacted = self.clone();
        redacted.s3.secret_access_key = "<redacted>".into();
        f.write_str(&toml::to_string_pretty(&redacted).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: [(&str, &str); 2] =
        [("TRSTREAM_S3_ACCESS_KEY_ID", "key"), ("TRSTREAM_S3_SECRET_ACCESS_KEY", "secret")];

    /// Loads from a file, `env` and `overrides`, with the S3 credentials in the environment.
    fn load_str(toml_text: &str, env: &[(&str, &str)], overrides: &[&str]) -> Result<Config, ConfigError> {
        load_with(toml_text, &[&CREDENTIALS[..], env].concat(), overrides)
    }

    fn load_with(toml_text: &str, env: &[(&str, &str)], overrides: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trstream.toml");
        std::fs::write(&path, toml_text).unwrap();
        Config::load(&Sources {
            file: Some(path),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn defaults_are_valid_given_credentials() {
        let mut c = Config::default();
        c.s3.access_key_id = "key".into();
        c.s3.secret_access_key = "secret".into();
        c.validate().unwrap();
        assert_eq!(load_str("", &[], &[]).unwrap(), c);
    }

    #[test]
    fn credentials_are_never_built_in() {
        let e = load_with("", &[], &[]).unwrap_err();
        assert_eq!(e.key, "s3.access_key_id", "{e}");
        assert!(e.to_string().contains("TRSTREAM_S3_ACCESS_KEY_ID"), "{e}");
        let e = load_with("", &[CREDENTIALS[0]], &[]).unwrap_err();
        assert_eq!(e.key, "s3.secret_access_key", "{e}");
        assert!(e.to_string().contains("TRSTREAM_S3_SECRET_ACCESS_KEY"), "{e}");
    }

    #[test]
    fn file_then_env_then_flags() {
        let c = load_str(
            "[flush]\nmax_rows = 10\nmax_age = \"2s\"\n[kafka]\nbrokers = \"a:1\"\n",
            &[
                ("TRSTREAM_FLUSH_MAX_ROWS", "20"),
                ("TRSTREAM_KAFKA_BROKERS", "b:2"),
                ("HOME", "/x"),
                ("TRSTREAM_LOG", "debug"),
            ],
            &["flush.max_rows=30"],
        )
        .unwrap();
        assert_eq!(c.flush.max_rows, 30);
        assert_eq!(c.flush.max_age, Duration::from_secs(2));
        assert_eq!(c.kafka.brokers, "b:2");
    }

    #[test]
    fn env_sets_lists_and_librdkafka_properties() {
        let c = load_str(
            "",
            &[
                ("TRSTREAM_VALIDATION_CURRENCIES", "[\"USD\", \"EUR\"]"),
                ("TRSTREAM_KAFKA_PROPERTIES__fetch.wait.max.ms", "50"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.validation.currencies, vec!["USD", "EUR"]);
        assert_eq!(c.kafka.properties.get("fetch.wait.max.ms").map(String::as_str), Some("50"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load_str("[flush]\nmax_rowz = 1\n", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("max_rowz"), "{e}");
        let e = load_str("[flsh]\nmax_rows = 1\n", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("flsh"), "{e}");
        let e = load_str("", &[("TRSTREAM_FLUSH_MAX_ROWZ", "1")], &[]).unwrap_err();
        assert!(e.to_string().contains("max_rowz"), "{e}");
        let e = load_str("", &[("TRSTREAM_NOPE_X", "1")], &[]).unwrap_err();
        assert_eq!(e.key, "TRSTREAM_NOPE_X", "{e}");
        let e = load_str("", &[], &["flush.nope=1"]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn wrong_types_and_units_are_named() {
        let e = load_str("[flush]\nmax_age = 10\n", &[], &[]).unwrap_err();
        assert_eq!(e.key, "flush.max_age", "{e}");
        let e = load_str("[flush]\nmax_age = \"10 parsecs\"\n", &[], &[]).unwrap_err();
        assert_eq!(e.key, "flush.max_age", "{e}");
        let e = load_str("", &[("TRSTREAM_FLUSH_MAX_ROWS", "many")], &[]).unwrap_err();
        assert_eq!(e.key, "flush.max_rows", "{e}");
        let e = load_str("not toml [", &[], &[]).unwrap_err();
        assert!(e.message.contains("TOML"), "{e}");
    }

    #[test]
    fn inconsistent_values_are_named() {
        let cases: &[(&str, &str)] = &[
            ("[shutdown]\ndrain_timeout = \"60s\"\n[kafka]\nsession_timeout = \"30s\"", "shutdown.drain_timeout"),
            (
                "[memory]\npartition_max_buffered_bytes = 200\ntotal_max_buffered_bytes = 100",
                "memory.partition_max_buffered_bytes",
            ),
            ("[flush]\nmax_bytes = 100000000", "flush.max_bytes"),
            ("[flush]\nmax_rows = 0", "flush.max_rows"),
            ("[flush]\nmax_age = \"0s\"", "flush.max_age"),
            ("[kafka]\ndlq_topic = \"transactions\"", "kafka.dlq_topic"),
            ("[kafka]\ntopic = \"bad topic\"", "kafka.topic"),
            ("[kafka]\nincarnation = \"2/3\"", "kafka.incarnation"),
            ("[kafka]\nauto_offset_reset = \"smallest\"", "kafka.auto_offset_reset"),
            ("[s3]\nendpoint = \"localhost:9000\"", "s3.endpoint"),
            ("[validation]\ncurrencies = [\"usd\"]", "validation.currencies"),
            ("[validation]\ncurrencies = []", "validation.currencies"),
            ("[parquet]\nzstd_level = 0", "parquet.zstd_level"),
            ("[partitioner]\nmax_files_per_scan = 0", "partitioner.max_files_per_scan"),
            ("[upload]\nretry_initial_backoff = \"1m\"\nretry_max_backoff = \"1s\"", "upload.retry_initial_backoff"),
            ("[http]\nlisten = \"nowhere\"", "http.listen"),
            ("[kafka.properties]\n\"enable.auto.commit\" = \"true\"", "kafka.properties.enable.auto.commit"),
            (
                "[kafka.properties]\n\"partition.assignment.strategy\" = \"cooperative-sticky\"",
                "kafka.properties.partition.assignment.strategy",
            ),
            ("[kafka.properties]\n\"transactional.id\" = \"mine\"", "kafka.properties.transactional.id"),
            ("[kafka.properties]\n\"isolation.level\" = \"read_uncommitted\"", "kafka.properties.isolation.level"),
            ("[kafka.properties]\n\"enable.idempotence\" = \"false\"", "kafka.properties.enable.idempotence"),
            ("[kafka.properties]\nacks = \"1\"", "kafka.properties.acks"),
            ("[s3]\nrequest_timeout = \"30s\"\n[shutdown]\ndrain_timeout = \"20s\"", "s3.request_timeout"),
        ];
        for (text, key) in cases {
            let e = load_str(text, &[], &[]).unwrap_err();
            assert_eq!(&e.key, key, "{text}: {e}");
        }
        // Two settings that only conflict together: the message names both, in the user's units.
        let e = load_str("[s3]\nrequest_timeout = \"30s\"", &[], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration error at `s3.request_timeout`: 30s must be shorter than shutdown.drain_timeout (20s): a drain must have time for at least one upload"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(&Sources { file: Some("/nonexistent/trstream.toml".into()), ..Default::default() })
            .unwrap_err();
        assert!(e.key.contains("/nonexistent/trstream.toml"), "{e}");
    }

    #[test]
    fn display_redacts_the_secret() {
        let mut c = Config::default();
        c.s3.secret_access_key = "hunter2".into();
        assert!(!c.to_string().contains("hunter2"));
    }
}

//! `trstream audit`: the user's proof of I1 and I2 (design §4).
//!
//! It reads the source topic from the beginning without committing, the DLQ topic, and every
//! file of `tb-transactions` (and, with `--raw`, of `raw-data`), then reports per Kafka partition
//! how many records are valid and invalid, how many valid ones are in the table, and how many are
//! missing, duplicated or unexpected. A record is identified by (partition, offset) and its
//! `transaction_id` is checked too.
//!
//! What the audit shares with the daemon, and what it does not:
//!
//! - **Valid or invalid** is decided by the daemon's own validator (I8: the audit must classify
//!   as the daemon did), with the message's timestamp standing in for the time it was ingested.
//!   A validator that wrongly rejects valid records would pass here: the chaos scenarios close
//!   that gap by comparing the audit's valid count with what the producer generated as valid.
//! - **A row's content** is not taken on the daemon's word: the audit reads each source record
//!   itself (its own JSON reading, its own decimal and RFC 3339 parsing, not the validator's) and
//!   compares the id, amount, event time and type of every lake row with it (`altered`).
//! - **A row's folder** is not either: day and type come from the row's own `event_time` and
//!   `transaction_type`, and a table row in any other Hive folder is `misplaced`. The folder is
//!   read from the object key by the audit's own parsing.
//! - **The DLQ** is read as a `read_committed` consumer: records the daemon sent twice for one
//!   source offset are `dlq_duplicated`, and a DLQ record for a record the validator accepts is
//!   `dlq_unexpected` (one record both in the DLQ and in the lake breaks I8).
//!
//! Memory is bounded by a few bytes per offset: one byte of flags and two 32-bit hashes (the
//! transaction id, the content) per record of the log, and one byte per offset the log has
//! already dropped (retention), so millions of records cost megabytes, and files are read a few
//! at a time with only the six columns the audit needs.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::ingest::dlq::{
    HEADER_SOURCE_INCARNATION, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};
use crate::lake::keys::{self, RawFileName};
use crate::lake::{LakeStore, StoreError, quarantine};

const VALID: u8 = 1;
const INVALID: u8 = 1 << 1;
const IN_DLQ: u8 = 1 << 2;
const LAKE_SHIFT: u8 = 3;
const RAW_SHIFT: u8 = 5;
/// A record the validator accepts but whose content the audit cannot read (its own parsing
/// disagrees with the validator's): every lake row of it counts as altered.
const UNREADABLE: u8 = 1 << 7;
/// Files read concurrently.
const PARALLEL_FILES: usize = 8;

#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Also check `raw-data`: every valid record exactly once per Kafka partition.
    pub raw: bool,
    /// Bound on reading each topic to its end.
    pub timeout: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions { raw: false, timeout: Duration::from_secs(120), progress: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading {key}: {detail}")]
    File { key: String, detail: String },
}

/// The counts of one Kafka partition (or of all, in `total`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Records in the topic (from the log start to its end).
    pub records: u64,
    pub valid: u64,
    pub invalid: u64,
    /// Valid records found in the table (at least once).
    pub in_lake: u64,
    /// Invalid records found in the DLQ (at least once).
    pub in_dlq: u64,
    /// Valid records not in the table, plus invalid records not in the DLQ.
    pub missing: u64,
    /// Records found more than once in the table.
    pub duplicated: u64,
    /// Table rows matching no valid record: an invalid record, an offset past the log end, or a
    /// transaction_id that differs from the record's.
    pub unexpected: u64,
    /// Table rows of offsets the log no longer holds (retention): only checked for duplicates.
    pub before_log_start: u64,
    /// Rows (in the table, or in raw-data with `--raw`) whose transaction_id matches their
    /// source record but whose amount, event time or type does not.
    pub altered: u64,
    /// Table rows in a Hive folder other than the one their own event_time (UTC day) and
    /// transaction_type name.
    pub misplaced: u64,
    /// DLQ records beyond the first for one source offset.
    pub dlq_duplicated: u64,
    /// DLQ records whose source record is valid.
    pub dlq_unexpected: u64,
    /// With `--raw`: valid records missing from raw-data, and records there more than once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_missing: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_duplicated: Option<u64>,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.records += o.records;
        self.valid += o.valid;
        self.invalid += o.invalid;
        self.in_lake += o.in_lake;
        self.in_dlq += o.in_dlq;
        self.missing += o.missing;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
        self.before_log_start += o.before_log_start;
        self.altered += o.altered;
        self.misplaced += o.misplaced;
        self.dlq_duplicated += o.dlq_duplicated;
        self.dlq_unexpected += o.dlq_unexpected;
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.raw_missing = sum(self.raw_missing, o.raw_missing);
        self.raw_duplicated = sum(self.raw_duplicated, o.raw_duplicated);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub log_start: i64,
    pub log_end: i64,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub topic: String,
    pub dlq_topic: String,
    pub table_bucket: String,
    pub partitions: Vec<PartitionReport>,
    pub total: Counts,
    /// Table files read, and rows in them.
    pub table_files: u64,
    pub table_rows: u64,
    /// Rows of the table by UTC day (`YYYY-MM-DD`) and transaction type, as the rows' own
    /// event_time and transaction_type say.
    pub rows_by_day_and_type: BTreeMap<String, BTreeMap<String, u64>>,
    /// Objects the daemon moved aside because it could not read them (I10), in either bucket,
    /// with their reasons. What they held shows in the counts (a raw file's rows missing from
    /// the table, a table file's unless it was rebuilt).
    pub quarantined: Vec<QuarantinedObject>,
    /// Lake files of the topic that the audit itself cannot read: (key, why). Not clean.
    pub unreadable: Vec<(String, String)>,
    pub clean: bool,
}

/// A quarantined object as the audit reports it.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantinedObject {
    pub bucket: String,
    pub key: String,
    pub kind: String,
    pub reason: String,
    pub quarantined_at: String,
}

impl AuditReport {
    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let raw = self.total.raw_missing.is_some();
        out.push_str(&format!(
            "{:>9} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>16}{}\n",
            "partition",
            "records",
            "valid",
            "invalid",
            "in_lake",
            "in_dlq",
            "missing",
            "duplicated",
            "unexpected",
            "before_log_start",
            if raw { "  raw_missing raw_duplicated" } else { "" }
        ));
        let row = |label: String, c: &Counts| {
            let raw_cols = match (c.raw_missing, c.raw_duplicated) {
                (Some(m), Some(d)) => format!(" {m:>12} {d:>14}"),
                _ => String::new(),
            };
            format!(
                "{label:>9} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10} {:>16}{raw_cols}\n",
                c.records,
                c.valid,
                c.invalid,
                c.in_lake,
                c.in_dlq,
                c.missing,
                c.duplicated,
                c.unexpected,
                c.before_log_start
            )
        };
        for p in &self.partitions {
            out.push_str(&row(p.partition.to_string(), &p.counts));
        }
        out.push_str(&row("total".into(), &self.total));
        let t = &self.total;
        out.push_str(&format!(
            "\n{} table files, {} rows; {} rows altered (content differs from the source record), {} misplaced (outside the folder of their own day and type); DLQ: {} duplicated, {} for valid records\n",
            self.table_files, self.table_rows, t.altered, t.misplaced, t.dlq_duplicated, t.dlq_unexpected
        ));
        if !self.quarantined.is_empty() {
            out.push_str(&format!(
                "{} objects quarantined by the daemon (moved to _trstream/quarantine/, unreadable):\n",
                self.quarantined.len()
            ));
            for q in &self.quarantined {
                out.push_str(&format!("  {} {}/{}: {} ({})\n", q.kind, q.bucket, q.key, q.reason, q.quarantined_at));
            }
        }
        if !self.unreadable.is_empty() {
            out.push_str(&format!("{} lake files the audit cannot read:\n", self.unreadable.len()));
            for (key, why) in &self.unreadable {
                out.push_str(&format!("  {key}: {why}\n"));
            }
        }
        out.push_str(if self.clean {
            "result: CLEAN: every valid transaction is in the table exactly once and every invalid one is in the DLQ\n"
        } else {
            "result: MISMATCH: see missing, duplicated, unexpected, altered, misplaced and unreadable above\n"
        });
        out
    }
}

/// One Kafka partition's flags, indexed by offset.
#[derive(Clone)]
struct PartitionBook {
    log_start: i64,
    log_end: i64,
    flags: Vec<u8>,
    id_hash: Vec<u32>,
    content: Vec<u32>,
    /// Table (low 2 bits) and raw (next 2 bits) counts of offsets below `log_start`.
    before: Vec<u8>,
    unexpected: u64,
    altered: u64,
    misplaced: u64,
    dlq_duplicated: u64,
    dlq_unexpected: u64,
}

/// One row of a lake file, as the audit reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LakeRow {
    partition: i32,
    offset: i64,
    id_hash: u32,
    content: u32,
    /// False for a table row outside the Hive folder its own values name.
    in_its_folder: bool,
}

impl PartitionBook {
    fn new(log_start: i64, log_end: i64) -> Self {
        let n = (log_end - log_start).max(0) as usize;
        PartitionBook {
            log_start,
            log_end,
            flags: vec![0; n],
            id_hash: vec![0; n],
            content: vec![0; n],
            before: vec![0; log_start.max(0) as usize],
            unexpected: 0,
            altered: 0,
            misplaced: 0,
            dlq_duplicated: 0,
            dlq_unexpected: 0,
        }
    }

    /// The source record at `offset`, read from the log.
    fn source(&mut self, offset: i64, valid_id: Option<&str>, payload: Option<&[u8]>) {
        let i = (offset - self.log_start) as usize;
        match valid_id {
            Some(id) => {
                self.flags[i] |= VALID;
                self.id_hash[i] = id_hash(id);
                match payload.and_then(SourceContent::read) {
                    Some(c) => self.content[i] = c.fingerprint(),
                    None => self.flags[i] |= UNREADABLE,
                }
            }
            None => self.flags[i] |= INVALID,
        }
    }

    /// A DLQ record naming `offset` as its source.
    fn dead_letter(&mut self, offset: i64) {
        if !(self.log_start..self.log_end).contains(&offset) {
            return; // dropped by retention, or produced after the audit took the log's end
        }
        let f = &mut self.flags[(offset - self.log_start) as usize];
        if *f & IN_DLQ != 0 {
            self.dlq_duplicated += 1;
        }
        if *f & VALID != 0 {
            self.dlq_unexpected += 1;
        }
        *f |= IN_DLQ;
    }

    fn bump(byte: &mut u8, shift: u8) {
        let c = (*byte >> shift) & 3;
        if c < 3 {
            *byte = (*byte & !(3 << shift)) | ((c + 1) << shift);
        }
    }

    /// A row found in the table (`shift` = LAKE_SHIFT) or raw-data (RAW_SHIFT).
    fn found(&mut self, row: &LakeRow, shift: u8) {
        let offset = row.offset;
        if !row.in_its_folder {
            self.misplaced += 1;
        }
        if offset < 0 {
            self.unexpected += 1;
        } else if offset < self.log_start {
            Self::bump(&mut self.before[offset as usize], if shift == LAKE_SHIFT { 0 } else { 2 });
        } else if offset >= self.log_end {
            self.unexpected += 1;
        } else {
            let i = (offset - self.log_start) as usize;
            if self.flags[i] & VALID == 0 || self.id_hash[i] != row.id_hash {
                self.unexpected += 1;
            } else {
                if self.flags[i] & UNREADABLE != 0 || self.content[i] != row.content {
                    self.altered += 1;
                }
                Self::bump(&mut self.flags[i], shift);
            }
        }
    }

    fn counts(&self, raw: bool) -> Counts {
        let mut c = Counts {
            unexpected: self.unexpected,
            records: self.flags.len() as u64,
            altered: self.altered,
            misplaced: self.misplaced,
            dlq_duplicated: self.dlq_duplicated,
            dlq_unexpected: self.dlq_unexpected,
            ..Counts::default()
        };
        let (mut raw_missing, mut raw_dup) = (0, 0);
        for &f in &self.flags {
            let lake = (f >> LAKE_SHIFT) & 3;
            let rawc = (f >> RAW_SHIFT) & 3;
            if f & VALID != 0 {
                c.valid += 1;
                if lake > 0 {
                    c.in_lake += 1;
                } else {
                    c.missing += 1;
                }
                if rawc == 0 {
                    raw_missing += 1;
                }
            } else if f & INVALID != 0 {
                c.invalid += 1;
                if f & IN_DLQ != 0 {
                    c.in_dlq += 1;
                } else {
                    c.missing += 1;
                }
            }
            if lake > 1 {
                c.duplicated += 1;
            }
            if rawc > 1 {
                raw_dup += 1;
            }
        }
        for &b in &self.before {
            let (lake, rawc) = (b & 3, (b >> 2) & 3);
            c.before_log_start += u64::from(lake.min(1));
            if lake > 1 {
                c.duplicated += 1;
            }
            if rawc > 1 {
                raw_dup += 1;
            }
        }
        if raw {
            c.raw_missing = Some(raw_missing);
            c.raw_duplicated = Some(raw_dup);
        }
        c
    }
}

fn id_hash(id: &str) -> u32 {
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish() as u32
}

/// What the audit compares between a source record and its lake rows, read by the audit itself:
/// plain JSON, its own decimal and RFC 3339 parsing, nothing of the daemon's validator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SourceContent {
    /// Canonical form: lower case, hyphenated.
    id: String,
    cents: i128,
    event_time_us: i64,
    transaction_type: String,
}

impl SourceContent {
    fn read(payload: &[u8]) -> Option<SourceContent> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let text = |k: &str| v.get(k).and_then(|x| x.as_str());
        let id = uuid::Uuid::parse_str(text("transaction_id")?).ok()?.hyphenated().to_string();
        let cents = match v.get("amount")? {
            serde_json::Value::String(s) => decimal_cents(s)?,
            serde_json::Value::Number(n) => decimal_cents(&n.to_string())?,
            _ => return None,
        };
        let event_time_us = chrono::DateTime::parse_from_rfc3339(text("event_time")?).ok()?.timestamp_micros();
        Some(SourceContent { id, cents, event_time_us, transaction_type: text("transaction_type")?.to_string() })
    }

    fn fingerprint(&self) -> u32 {
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        h.finish() as u32
    }
}

/// `"12.5"` → 1250: digits, optionally a point and at most two more digits.
fn decimal_cents(text: &str) -> Option<i128> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 30 && s.bytes().all(|b| b.is_ascii_digit());
    let (whole, frac) = match text.split_once('.') {
        Some((whole, frac)) if digits(frac) && frac.len() <= 2 => (whole, frac),
        Some(_) => return None,
        None => (text, ""),
    };
    if !digits(whole) {
        return None;
    }
    let frac: i128 = format!("{frac:0<2}").parse().ok()?;
    Some(whole.parse::<i128>().ok()? * 100 + frac)
}

/// The Hive folder `year=…/month=…/day=…/transaction_type=…` of a table key, read by the audit
/// itself: (`YYYY-MM-DD`, type).
fn key_folder(key: &str) -> Option<(String, String)> {
    let mut parts = BTreeMap::new();
    for segment in key.split('/') {
        if let Some((k, v)) = segment.split_once('=') {
            parts.insert(k, v);
        }
    }
    let (y, m, d, t) = (parts.get("year")?, parts.get("month")?, parts.get("day")?, parts.get("transaction_type")?);
    Some((format!("{y}-{m}-{d}"), t.to_string()))
}

/// The UTC day of a timestamp in µs, `YYYY-MM-DD`.
fn utc_day(us: i64) -> Option<String> {
    Some(chrono::DateTime::from_timestamp_micros(us)?.format("%Y-%m-%d").to_string())
}

fn consumer(config: &Config) -> Result<BaseConsumer, AuditError> {
    let mut c = crate::context::kafka_base_config(config);
    c.set("group.id", format!("trstream-audit-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The end of a partition is where its last message is, or, in a transactional topic (the
        // DLQ of kafka.exactly_once), past the commit marker that follows it: only an EOF says so.
        .set("enable.partition.eof", "true")
        // The DLQ's readers see committed dead letters only; the audit reads it as they do.
        .set("isolation.level", "read_committed")
        // As in the daemon: librdkafka's default waits a second whenever its fetch queue is full.
        .set("fetch.queue.backoff.ms", config.kafka.fetch_queue_backoff.as_millis().to_string())
        .set("queued.max.messages.kbytes", config.kafka.fetch_queue_kbytes.to_string());
    c.create().map_err(|e| AuditError::Kafka(format!("creating a consumer: {e}")))
}

/// `(partition, log start, log end)` of every partition of `topic`.
fn log_bounds(c: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<(i32, i64, i64)>, AuditError> {
    let md =
        c.fetch_metadata(Some(topic), timeout).map_err(|e| AuditError::Kafka(format!("metadata of {topic}: {e}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| AuditError::Kafka(format!("topic {topic} not found")))?;
    if let Some(e) = t.error() {
        return Err(AuditError::Kafka(format!("topic {topic}: {e:?}")));
    }
    let mut out = Vec::new();
    for p in t.partitions() {
        let (lo, hi) = c
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(|e| AuditError::Kafka(format!("offsets of {topic}/{}: {e}", p.id())))?;
        out.push((p.id(), lo, hi));
    }
    out.sort();
    Ok(out)
}

/// Reads every partition of `topic` from its start to the end it had when the read began.
fn read_topic(
    c: &BaseConsumer,
    topic: &str,
    bounds: &[(i32, i64, i64)],
    timeout: Duration,
    progress: bool,
    mut each: impl FnMut(i32, &rdkafka::message::BorrowedMessage<'_>),
) -> Result<u64, AuditError> {
    let mut tpl = TopicPartitionList::new();
    let mut left: HashMap<i32, i64> = HashMap::new();
    for &(p, lo, hi) in bounds {
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Offset(lo)).map_err(|e| AuditError::Kafka(e.to_string()))?;
            left.insert(p, hi);
        }
    }
    if left.is_empty() {
        return Ok(0);
    }
    c.assign(&tpl).map_err(|e| AuditError::Kafka(format!("assigning {topic}: {e}")))?;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut read = 0u64;
    // Every message resets the clock: a slow broker is fine, a silent one is an error.
    let mut last_message = Instant::now();
    while !left.is_empty() {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_message = Instant::now();
                let p = m.partition();
                if let Some(&end) = left.get(&p) {
                    if m.offset() < end {
                        each(p, &m);
                        read += 1;
                    }
                    if m.offset() + 1 >= end {
                        left.remove(&p);
                    }
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                // Nothing more to read now: past the end it had, or at its last stable offset
                // (a transaction still open; what it holds is not committed yet).
                last_message = Instant::now();
                left.remove(&p);
            }
            Some(Err(e)) => return Err(AuditError::Kafka(format!("reading {topic}: {e}"))),
            None => {
                if last_message.elapsed() > timeout {
                    let mut parts: Vec<i32> = left.keys().copied().collect();
                    parts.sort();
                    return Err(AuditError::Kafka(format!(
                        "reading {topic}: partitions {parts:?} returned nothing for {} before reaching their end",
                        humantime::format_duration(timeout)
                    )));
                }
            }
        }
        if progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!("audit: {read} records of {topic} read ({:.0?})", started.elapsed());
        }
    }
    let _ = c.unassign();
    Ok(read)
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == name).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// One lake file's rows, and its rows by (UTC day, type) as their own values say.
#[derive(Debug, Default)]
struct FileRows {
    rows: Vec<LakeRow>,
    by_day_and_type: BTreeMap<(String, String), u64>,
}

/// Reads a lake file's six audited columns. A table file's rows are checked against the Hive
/// folder of its key; a raw file (`table` false) has no folder.
fn file_rows(key: &str, body: bytes::Bytes, table: bool) -> Result<FileRows, AuditError> {
    use arrow_array::types::{Decimal128Type, TimestampMicrosecondType};
    use arrow_schema::{DataType, TimeUnit};
    let err = |e: &dyn std::fmt::Display| AuditError::File { key: key.to_string(), detail: e.to_string() };
    let builder = ParquetRecordBatchReaderBuilder::try_new(body).map_err(|e| err(&e))?;
    let schema = builder.parquet_schema();
    let wanted = ["transaction_id", "kafka_partition", "kafka_offset", "amount", "event_time", "transaction_type"];
    let indices: Vec<usize> =
        (0..schema.num_columns()).filter(|&i| wanted.contains(&schema.column(i).name())).collect();
    if indices.len() != wanted.len() {
        return Err(err(&format!("not a trstream file (columns {} expected)", wanted.join(", "))));
    }
    let folder = if table {
        Some(key_folder(key).ok_or_else(|| err(&"not in a year=/month=/day=/transaction_type= folder"))?)
    } else {
        None
    };
    let mask = ProjectionMask::leaves(schema, indices);
    let reader = builder.with_projection(mask).with_batch_size(64 * 1024).build().map_err(|e| err(&e))?;
    let mut out = FileRows::default();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let col = |name: &str| batch.column_by_name(name).ok_or_else(|| err(&format!("no column {name}")));
        let wrong = |name: &str, expected: &str| err(&format!("column {name} is not {expected}"));
        let ids = col("transaction_id")?.as_string_opt::<i32>().ok_or_else(|| wrong("transaction_id", "text"))?;
        let types = col("transaction_type")?.as_string_opt::<i32>().ok_or_else(|| wrong("transaction_type", "text"))?;
        let parts =
            col("kafka_partition")?.as_primitive_opt::<Int32Type>().ok_or_else(|| wrong("kafka_partition", "Int32"))?;
        let offs =
            col("kafka_offset")?.as_primitive_opt::<Int64Type>().ok_or_else(|| wrong("kafka_offset", "Int64"))?;
        let amount = col("amount")?;
        if !matches!(amount.data_type(), DataType::Decimal128(_, 2)) {
            return Err(wrong("amount", "a decimal with 2 digits after the point"));
        }
        let amounts = amount.as_primitive::<Decimal128Type>();
        let times = col("event_time")?;
        if !matches!(times.data_type(), DataType::Timestamp(TimeUnit::Microsecond, _)) {
            return Err(wrong("event_time", "a timestamp in microseconds"));
        }
        let times = times.as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            let text = |a: &arrow_array::StringArray| if a.is_null(i) { String::new() } else { a.value(i).to_string() };
            let content = SourceContent {
                id: text(ids),
                cents: if amounts.is_null(i) { -1 } else { amounts.value(i) },
                event_time_us: if times.is_null(i) { i64::MIN } else { times.value(i) },
                transaction_type: text(types),
            };
            let day = utc_day(content.event_time_us).unwrap_or_default();
            let in_its_folder = folder.as_ref().is_none_or(|(d, t)| *d == day && *t == content.transaction_type);
            out.rows.push(LakeRow {
                partition: parts.value(i),
                offset: offs.value(i),
                id_hash: id_hash(&content.id),
                content: content.fingerprint(),
                in_its_folder,
            });
            *out.by_day_and_type.entry((day, content.transaction_type)).or_default() += 1;
        }
    }
    Ok(out)
}

/// Reads `keys` of `store` a few at a time, handing each file's rows to `each`.
async fn read_files(
    store: &LakeStore,
    keys: Vec<String>,
    table: bool,
    progress: bool,
    unreadable: &mut Vec<(String, String)>,
    vanished: &mut Vec<String>,
    mut each: impl FnMut(&str, FileRows),
) -> Result<(), AuditError> {
    let total = keys.len();
    let mut pending = keys.into_iter();
    let mut set = tokio::task::JoinSet::new();
    let (mut done, mut last_progress) = (0usize, Instant::now());
    loop {
        while set.len() < PARALLEL_FILES {
            let Some(key) = pending.next() else { break };
            let store = store.clone();
            set.spawn(async move {
                // Gone since the listing: a running daemon's compaction replaced it.
                let Some(body) = store.get_opt(&key).await? else { return Ok((key, None)) };
                let k = key.clone();
                let rows = tokio::task::spawn_blocking(move || file_rows(&k, body, table))
                    .await
                    .map_err(|e| AuditError::File { key: key.clone(), detail: e.to_string() })?;
                Ok::<_, AuditError>((key, Some(rows)))
            });
        }
        let Some(res) = set.join_next().await else { break };
        let (key, rows) = res.map_err(|e| AuditError::File { key: "?".into(), detail: e.to_string() })??;
        match rows {
            None => vanished.push(key),
            Some(Ok(rows)) => each(&key, rows),
            // Reported, and the audit goes on: one bad file must not hide the rest.
            Some(Err(AuditError::File { key, detail })) => unreadable.push((key, detail)),
            Some(Err(e)) => return Err(e),
        }
        done += 1;
        if progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!("audit: {done}/{total} files of {} read", store.bucket());
        }
    }
    Ok(())
}

/// How many times the audit reads the lake when files vanish under it.
const LAKE_READS: u32 = 5;

/// What one reading of the table (and raw-data) found.
struct LakeRead {
    books: BTreeMap<i32, PartitionBook>,
    table_files: u64,
    table_rows: u64,
    by_day: BTreeMap<String, BTreeMap<String, u64>>,
    unknown_partition: u64,
    unreadable: Vec<(String, String)>,
    /// Listed, then gone before they were read.
    vanished: Vec<String>,
}

/// Reads the table (and raw-data with `opts.raw`) into `books`.
async fn read_lake(
    config: &Config,
    opts: &AuditOptions,
    bounds: &[(i32, i64, i64)],
    mut books: BTreeMap<i32, PartitionBook>,
    file_prefix: &str,
    lake_topic: &str,
) -> Result<LakeRead, AuditError> {
    // The table.
    let table = LakeStore::new(&config.s3, &config.s3.table_bucket);
    let keys: Vec<String> = table
        .list_keys("year=", None)
        .await?
        .into_iter()
        // Every Parquet file of the topic, named as the daemon names them or not: a file the
        // daemon's own key parsing would skip is read all the same.
        .filter(|k| k.ends_with(".parquet") && k.rsplit('/').next().is_some_and(|n| n.starts_with(file_prefix)))
        .collect();
    let table_files = keys.len() as u64;
    let mut table_rows = 0u64;
    let mut by_day: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut unknown_partition = 0u64;
    let (mut unreadable, mut vanished) = (Vec::new(), Vec::new());
    read_files(&table, keys, true, opts.progress, &mut unreadable, &mut vanished, |_, file| {
        for ((day, t), n) in file.by_day_and_type {
            *by_day.entry(day).or_default().entry(t).or_default() += n;
        }
        table_rows += file.rows.len() as u64;
        for row in &file.rows {
            match books.get_mut(&row.partition) {
                Some(b) => b.found(row, LAKE_SHIFT),
                None => unknown_partition += 1,
            }
        }
    })
    .await?;

    // Optionally raw-data.
    if opts.raw {
        let raw = LakeStore::new(&config.s3, &config.s3.raw_bucket);
        let mut keys = Vec::new();
        for &(p, _, _) in bounds {
            let prefix = keys::partition_prefix(&config.s3.raw_prefix, p);
            keys.extend(
                raw.list_keys(&prefix, None)
                    .await?
                    .into_iter()
                    .filter(|k| RawFileName::parse(k).is_some_and(|n| n.topic == *lake_topic)),
            );
        }
        read_files(&raw, keys, false, opts.progress, &mut unreadable, &mut vanished, |_, file| {
            for row in &file.rows {
                if let Some(b) = books.get_mut(&row.partition) {
                    b.found(row, RAW_SHIFT);
                }
            }
        })
        .await?;
    }

    Ok(LakeRead { books, table_files, table_rows, by_day, unknown_partition, unreadable, vanished })
}

/// Runs the audit against the Kafka cluster and the lake of `config`.
pub async fn audit(config: &Config, opts: &AuditOptions) -> Result<AuditReport, AuditError> {
    let topic = config.kafka.topic.clone();
    // The lake names files by the incarnation too (`kafka.incarnation`): only this one's count.
    let lake_topic = config.lake_topic();
    let file_prefix = format!("{lake_topic}+");
    let dlq_topic = config.kafka.dlq_topic.clone();
    let validator = config.validator();
    let (cfg, o) = (config.clone(), opts.clone());

    // 1. The source topic and the DLQ, on a blocking thread (librdkafka polls block).
    let (books, bounds) = tokio::task::spawn_blocking(move || -> Result<_, AuditError> {
        let c = consumer(&cfg)?;
        let bounds = log_bounds(&c, &cfg.kafka.topic, cfg.kafka.request_timeout)?;
        let mut books: BTreeMap<i32, PartitionBook> =
            bounds.iter().map(|&(p, lo, hi)| (p, PartitionBook::new(lo, hi))).collect();
        read_topic(&c, &cfg.kafka.topic, &bounds, o.timeout, o.progress, |p, m| {
            let Some(book) = books.get_mut(&p) else { return };
            // The daemon's rule (I8): judged by the record's broker timestamp, never a clock.
            let at = crate::record::broker_time_us(m.timestamp().to_millis());
            let valid = validator.validate(m.payload(), at).ok();
            book.source(m.offset(), valid.as_ref().map(|t| &*t.transaction_id), m.payload());
        })?;
        // A consumer of its own: an end-of-partition event of the source topic still queued
        // would end a DLQ partition of the same number early.
        drop(c);
        let c = consumer(&cfg)?;
        let dlq_bounds = log_bounds(&c, &cfg.kafka.dlq_topic, cfg.kafka.request_timeout)?;
        read_topic(&c, &cfg.kafka.dlq_topic, &dlq_bounds, o.timeout, o.progress, |_, m| {
            if header(m, HEADER_SOURCE_TOPIC) != Some(cfg.kafka.topic.as_str())
                || header(m, HEADER_SOURCE_INCARNATION).unwrap_or("") != cfg.kafka.incarnation
            {
                return; // another topic's, or another incarnation's of this one
            }
            let p = header(m, HEADER_SOURCE_PARTITION).and_then(|v| v.parse::<i32>().ok());
            let off = header(m, HEADER_SOURCE_OFFSET).and_then(|v| v.parse::<i64>().ok());
            if let (Some(p), Some(off)) = (p, off)
                && let Some(book) = books.get_mut(&p)
            {
                book.dead_letter(off);
            }
        })?;
        Ok((books, bounds))
    })
    .await
    .map_err(|e| AuditError::Kafka(format!("reader thread failed: {e}")))??;

    // 2. and 3. The table and raw-data, read again whole when a file listed was gone by the time
    // it was read (a running daemon's compaction replaced it): counted from one listing, its
    // replacement would be missed.
    let mut attempt = 1;
    let lake = loop {
        let read = read_lake(config, opts, &bounds, books.clone(), &file_prefix, &lake_topic).await?;
        if read.vanished.is_empty() {
            break read;
        }
        if attempt == LAKE_READS {
            return Err(AuditError::File {
                key: read.vanished[0].clone(),
                detail: format!(
                    "the lake kept changing while it was read ({LAKE_READS} tries, {} files gone since their listing in the last): audit a settled lake, or stop the daemon",
                    read.vanished.len()
                ),
            });
        }
        if opts.progress {
            eprintln!(
                "audit: {} files were replaced while they were read (a running compaction); reading the lake again",
                read.vanished.len()
            );
        }
        attempt += 1;
    };
    let LakeRead { books, table_files, table_rows, by_day, unknown_partition, unreadable, .. } = lake;

    let mut quarantined = Vec::new();
    for bucket in [&config.s3.raw_bucket, &config.s3.table_bucket] {
        let store = LakeStore::new(&config.s3, bucket);
        for note in quarantine::notes(&store).await? {
            quarantined.push(QuarantinedObject {
                bucket: bucket.clone(),
                key: note.key,
                kind: note.kind,
                reason: note.reason,
                quarantined_at: note.quarantined_at,
            });
        }
    }

    let mut total = Counts::default();
    let partitions: Vec<PartitionReport> = books
        .iter()
        .map(|(&p, b)| {
            let counts = b.counts(opts.raw);
            total.add(&counts);
            PartitionReport { partition: p, log_start: b.log_start, log_end: b.log_end, counts }
        })
        .collect();
    total.unexpected += unknown_partition;
    // DLQ duplicates are reported, not failed on: the DLQ is at-least-once (supervision.md).
    let clean = total.missing == 0
        && total.duplicated == 0
        && total.unexpected == 0
        && total.altered == 0
        && total.misplaced == 0
        && total.dlq_unexpected == 0
        && total.raw_missing.unwrap_or(0) == 0
        && total.raw_duplicated.unwrap_or(0) == 0
        && unreadable.is_empty();
    Ok(AuditReport {
        topic,
        dlq_topic,
        table_bucket: config.s3.table_bucket.clone(),
        partitions,
        total,
        table_files,
        table_rows,
        rows_by_day_and_type: by_day,
        quarantined,
        unreadable,
        clean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file listed and then gone (a running daemon's compaction replaced it) is told apart
    /// from an unreadable one: the audit reads the lake again instead of failing or counting it.
    #[tokio::test]
    async fn a_file_gone_since_its_listing_is_reported_as_vanished_not_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let s3 = crate::embedded::EmbeddedS3::start(dir.path(), 0, &["tb-audit"]).await.unwrap();
        let mut config = Config::default();
        s3.configure(&mut config.s3);
        let store = LakeStore::new(&config.s3, "tb-audit");
        store
            .put("year=2026/bad.parquet", bytes::Bytes::from_static(b"not parquet"), "application/octet-stream")
            .await
            .unwrap();
        let keys = vec!["year=2026/gone.parquet".to_string(), "year=2026/bad.parquet".to_string()];
        let (mut unreadable, mut vanished, mut read) = (Vec::new(), Vec::new(), 0);
        read_files(&store, keys, true, false, &mut unreadable, &mut vanished, |_, _| read += 1).await.unwrap();
        assert_eq!(vanished, ["year=2026/gone.parquet"]);
        assert_eq!(unreadable.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["year=2026/bad.parquet"]);
        assert_eq!(read, 0);
    }

    fn row(offset: i64, id_hash: u32) -> LakeRow {
        LakeRow { partition: 0, offset, id_hash, content: 7, in_its_folder: true }
    }

    /// A book whose valid records all have content fingerprint 7.
    fn valid_at(b: &mut PartitionBook, offset: i64, id_hash: u32) {
        let i = (offset - b.log_start) as usize;
        b.flags[i] |= VALID;
        b.id_hash[i] = id_hash;
        b.content[i] = 7;
    }

    #[test]
    fn book_counts_missing_duplicated_unexpected_and_retention() {
        let mut b = PartitionBook::new(2, 8);
        // offsets 2..8: valid 2,3,4,5; invalid 6 (in the DLQ), 7 (not).
        for (i, off) in (2..6).enumerate() {
            valid_at(&mut b, off, i as u32 + 10);
        }
        b.flags[4] |= INVALID;
        b.dead_letter(6);
        b.flags[5] |= INVALID;
        b.found(&row(2, 10), LAKE_SHIFT);
        b.found(&row(3, 11), LAKE_SHIFT);
        b.found(&row(3, 11), LAKE_SHIFT); // duplicate
        b.found(&row(4, 99), LAKE_SHIFT); // wrong id: unexpected, and offset 4 stays missing
        b.found(&row(6, 0), LAKE_SHIFT); // an invalid record in the lake
        b.found(&row(9, 0), LAKE_SHIFT); // past the end
        b.found(&row(0, 0), LAKE_SHIFT); // before the log start, twice
        b.found(&row(0, 0), LAKE_SHIFT);
        b.found(&row(1, 0), LAKE_SHIFT);
        for off in [2, 3, 4] {
            b.found(&row(off, off as u32 + 8), RAW_SHIFT);
        }
        let c = b.counts(true);
        assert_eq!(
            c,
            Counts {
                records: 6,
                valid: 4,
                invalid: 2,
                in_lake: 2,
                in_dlq: 1,
                missing: 3,    // 4 and 5 not in the table, 7 not in the DLQ
                duplicated: 2, // offset 3, and offset 0 before the log start
                unexpected: 3,
                before_log_start: 2,
                raw_missing: Some(1),
                raw_duplicated: Some(0),
                ..Counts::default()
            }
        );
    }

    #[test]
    fn rows_with_other_content_or_in_another_folder_are_counted_and_dlq_records_checked() {
        let mut b = PartitionBook::new(0, 4);
        for off in 0..3 {
            valid_at(&mut b, off, 1);
        }
        b.flags[3] |= INVALID;
        b.found(&row(0, 1), LAKE_SHIFT);
        b.found(&LakeRow { content: 8, ..row(1, 1) }, LAKE_SHIFT); // another amount, say
        b.found(&LakeRow { content: 8, ..row(1, 1) }, RAW_SHIFT);
        b.found(&LakeRow { in_its_folder: false, ..row(2, 1) }, LAKE_SHIFT);
        b.dead_letter(3);
        b.dead_letter(3); // sent twice
        b.dead_letter(0); // a valid record in the DLQ
        b.dead_letter(40); // past the end the audit read: produced since, not judged
        let c = b.counts(false);
        assert_eq!((c.altered, c.misplaced, c.dlq_duplicated, c.dlq_unexpected), (2, 1, 1, 1), "{c:?}");
        assert_eq!((c.in_lake, c.missing, c.duplicated, c.unexpected, c.in_dlq), (3, 0, 0, 0, 1), "{c:?}");
    }

    #[test]
    fn a_valid_record_the_audit_cannot_read_alters_every_row_of_it() {
        let mut b = PartitionBook::new(0, 1);
        b.source(0, Some("id"), Some(br#"{"amount":"1.234"}"#));
        b.found(&LakeRow { id_hash: id_hash("id"), ..row(0, 0) }, LAKE_SHIFT);
        assert_eq!(b.counts(false).altered, 1);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut b = PartitionBook::new(0, 1);
        b.flags[0] |= VALID;
        for _ in 0..10 {
            b.found(&row(0, 0), LAKE_SHIFT);
        }
        let c = b.counts(false);
        assert_eq!((c.in_lake, c.duplicated, c.raw_missing), (1, 1, None));
    }

    #[test]
    fn source_content_is_read_without_the_validator() {
        let json = br#"{"transaction_id":"6F1C9A2E-3B4D-4E5F-8A9B-0C1D2E3F4A5B","amount":"12.5","event_time":"2026-01-01T01:00:00+01:00","transaction_type":"DEBIT"}"#;
        let c = SourceContent::read(json).unwrap();
        assert_eq!(
            c,
            SourceContent {
                id: "6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
                cents: 1250,
                event_time_us: 1_767_225_600_000_000,
                transaction_type: "DEBIT".into(),
            }
        );
        let number = br#"{"transaction_id":"6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b","amount":7,"event_time":"2026-01-01T00:00:00Z","transaction_type":"DEBIT"}"#;
        assert_eq!(SourceContent::read(number).unwrap().cents, 700);
        assert_eq!(utc_day(c.event_time_us).as_deref(), Some("2026-01-01"));
    }

    #[test]
    fn decimal_cents_takes_at_most_two_decimals() {
        assert_eq!(decimal_cents("0.01"), Some(1));
        assert_eq!(decimal_cents("1000000000.00"), Some(100_000_000_000));
        assert_eq!(decimal_cents("3"), Some(300));
        for bad in ["", ".5", "1.", "1.234", "-1", "1e3", "1,5", " 1"] {
            assert_eq!(decimal_cents(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_folder_comes_from_the_key_segments() {
        assert_eq!(
            key_folder("year=2026/month=11/day=27/transaction_type=REFUND/transactions+0+1-2.parquet"),
            Some(("2026-11-27".into(), "REFUND".into()))
        );
        assert_eq!(key_folder("year=2026/month=11/transactions+0+1-2.parquet"), None);
    }
}

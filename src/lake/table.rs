//! The table bucket (`tb-transactions`, design §3): Hive layout, names derived from the source,
//! and the bookkeeping the partitioner and compactor keep beside it.
//!
//! ```text
//! year=YYYY/month=MM/day=DD/transaction_type=T/<topic>+<p>+<first:020>-<last:020>.parquet
//! _trstream/watermarks/<topic>/partition=<p>.json            partitioner watermark (I2)
//! _trstream/compactions/<topic>/partition=<p>/<id>.json      compaction intents (I6)
//! ```
//!
//! A table file's name is the raw file's it came from, so re-partitioning a raw file overwrites
//! and never adds. A merged file is named by the offset range of its inputs, which within one
//! Hive partition and one Kafka partition never overlap: the range names it uniquely and a re-run
//! of the same merge writes the same key. Bookkeeping lives under `_trstream/`, which a reader's
//! `year=*/**/*.parquet` glob never matches.

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{RecordBatch, UInt32Array};
use chrono::Datelike;
use serde::{Deserialize, Serialize};

use crate::lake::keys::RawFileName;

/// Prefix of the bookkeeping objects.
pub const META_DIR: &str = "_trstream";

const COL_TRANSACTION_TYPE: usize = 3;
const COL_EVENT_TIME: usize = 12;

/// One Hive partition of the table: a UTC day and a transaction type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HivePartition {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub transaction_type: String,
}

impl HivePartition {
    /// The partition of a row: `event_time` (µs since the epoch) taken in UTC.
    pub fn of(event_time_us: i64, transaction_type: &str) -> HivePartition {
        let t = chrono::DateTime::from_timestamp_micros(event_time_us).unwrap_or_default();
        HivePartition { year: t.year(), month: t.month(), day: t.day(), transaction_type: transaction_type.to_string() }
    }

    /// `year=YYYY/month=MM/day=DD/transaction_type=T/`
    pub fn dir(&self) -> String {
        format!(
            "year={:04}/month={:02}/day={:02}/transaction_type={}/",
            self.year, self.month, self.day, self.transaction_type
        )
    }

    /// The key of a table file in this partition.
    pub fn file_key(&self, name: &RawFileName) -> String {
        format!("{}{}", self.dir(), name.file_name())
    }

    /// Parses a table file's key into its partition and source name; `None` for anything else
    /// (bookkeeping, foreign files).
    pub fn parse_key(key: &str) -> Option<(HivePartition, RawFileName)> {
        let mut parts = key.split('/');
        let mut field = |name: &str| parts.next()?.strip_prefix(name)?.strip_prefix('=').map(str::to_string);
        let year = field("year")?.parse().ok()?;
        let month = field("month")?.parse().ok()?;
        let day = field("day")?.parse().ok()?;
        let transaction_type = field("transaction_type")?;
        let file = parts.next()?;
        if parts.next().is_some() || transaction_type.is_empty() {
            return None;
        }
        Some((HivePartition { year, month, day, transaction_type }, RawFileName::parse(file)?))
    }
}

/// `_trstream/watermarks/<topic>/partition=<p>.json`
pub fn watermark_key(topic: &str, partition: i32) -> String {
    format!("{META_DIR}/watermarks/{topic}/partition={partition}.json")
}

/// `_trstream/compactions/<topic>/partition=<p>/`
pub fn intents_prefix(topic: &str, partition: i32) -> String {
    format!("{META_DIR}/compactions/{topic}/partition={partition}/")
}

/// The intent of the merge `plan`: `<intents prefix><YYYY-MM-DD>.<type>.<first>-<last>.json`,
/// unique per output file and short enough for file-system-backed stores (s3s-fs keeps a
/// side file whose name embeds the key in base64, within the 255-byte name limit).
pub fn intent_key(topic: &str, hive: &HivePartition, output: &RawFileName) -> String {
    format!(
        "{}{:04}-{:02}-{:02}.{}.{:020}-{:020}.json",
        intents_prefix(topic, output.partition),
        hive.year,
        hive.month,
        hive.day,
        hive.transaction_type,
        output.first_offset,
        output.last_offset
    )
}

/// The partitioner's durable progress for one Kafka partition: every raw file whose last offset
/// is at or below `last_offset` is in the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub topic: String,
    pub partition: i32,
    pub last_offset: i64,
    /// The raw file that moved the watermark here (for operators).
    pub raw_file: String,
    pub updated_at: String,
}

/// Written before a merged file, deleted after its inputs are (I6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionIntent {
    pub output: String,
    pub inputs: Vec<String>,
    pub created_at: String,
}

/// Splits a raw batch by Hive partition. Rows keep their order inside each part (offset order).
pub fn split(batch: &RecordBatch) -> Result<Vec<(HivePartition, RecordBatch)>, arrow_schema::ArrowError> {
    let types = batch.column(COL_TRANSACTION_TYPE).as_string::<i32>();
    let times = batch.column(COL_EVENT_TIME).as_primitive::<TimestampMicrosecondType>();
    let mut groups: BTreeMap<HivePartition, Vec<u32>> = BTreeMap::new();
    // Rows of one flush mostly share a day: remember the last day's bounds to skip the calendar.
    let mut day: Option<(i64, i64, i32, u32, u32)> = None;
    const DAY_US: i64 = 86_400_000_000;
    for row in 0..batch.num_rows() {
        let t = times.value(row);
        let (y, m, d) = match day {
            Some((lo, hi, y, m, d)) if (lo..hi).contains(&t) => (y, m, d),
            _ => {
                let h = HivePartition::of(t, "");
                let lo = t.div_euclid(DAY_US) * DAY_US;
                day = Some((lo, lo + DAY_US, h.year, h.month, h.day));
                (h.year, h.month, h.day)
            }
        };
        let key = HivePartition { year: y, month: m, day: d, transaction_type: types.value(row).to_string() };
        groups.entry(key).or_default().push(row as u32);
    }
    groups
        .into_iter()
        .map(|(h, rows)| {
            let part = arrow_select::take::take_record_batch(batch, &UInt32Array::from(rows))?;
            Ok((h, part))
        })
        .collect()
}

/// A table file as listed: its source name, key and size in bytes.
pub type TableFile = (RawFileName, String, u64);

/// One merge: consecutive small files of one Hive partition and one Kafka partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    pub hive: HivePartition,
    /// Inputs in offset order: (name, key, size).
    pub inputs: Vec<TableFile>,
}

impl MergePlan {
    /// The merged file's name: the offset range its inputs cover.
    pub fn output_name(&self) -> RawFileName {
        let first = &self.inputs[0].0;
        let last = &self.inputs[self.inputs.len() - 1].0;
        RawFileName { last_offset: last.last_offset, ..first.clone() }
    }

    pub fn output_key(&self) -> String {
        self.hive.file_key(&self.output_name())
    }

    pub fn partition(&self) -> i32 {
        self.inputs[0].0.partition
    }

    pub fn input_bytes(&self) -> u64 {
        self.inputs.iter().map(|i| i.2).sum()
    }
}

/// Plans the merges of one (Hive partition, Kafka partition) group.
///
/// `files` are the group's files with their sizes, all at or below the partitioner's watermark.
/// Once at least `min_files` of them are smaller than `small_bytes`, each run of consecutive
/// small files (in offset order, never reaching over a large file, so merged ranges never
/// overlap another file's) is cut into merges whose inputs add up to at most `target_bytes`.
/// A merge has at least two inputs.
pub fn plan_merges(
    hive: &HivePartition,
    mut files: Vec<TableFile>,
    small_bytes: u64,
    target_bytes: u64,
    min_files: usize,
) -> Vec<MergePlan> {
    files.sort_by_key(|f| f.0.first_offset);
    if files.iter().filter(|f| f.2 < small_bytes).count() < min_files {
        return Vec::new();
    }
    let mut plans = Vec::new();
    let mut current: Vec<TableFile> = Vec::new();
    let mut size = 0u64;
    let mut close = |current: &mut Vec<_>, size: &mut u64| {
        if current.len() >= 2 {
            plans.push(MergePlan { hive: hive.clone(), inputs: std::mem::take(current) });
        } else {
            current.clear();
        }
        *size = 0;
    };
    for f in files {
        if f.2 >= small_bytes {
            close(&mut current, &mut size);
            continue;
        }
        if !current.is_empty() && size + f.2 > target_bytes {
            close(&mut current, &mut size);
        }
        size += f.2;
        current.push(f);
    }
    close(&mut current, &mut size);
    plans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::parquet::{RowBuffer, schema};
    use crate::record::Transaction;
    use std::borrow::Cow;

    fn name(first: i64, last: i64) -> RawFileName {
        RawFileName { topic: "transactions".into(), partition: 2, first_offset: first, last_offset: last }
    }

    #[test]
    fn hive_keys_round_trip_and_bookkeeping_stays_outside_the_glob() {
        // 2026-03-05T23:59:59.999999Z, then the next microsecond.
        let t = 1_772_755_199_999_999;
        let h = HivePartition::of(t, "DEBIT");
        assert_eq!(h.dir(), "year=2026/month=03/day=05/transaction_type=DEBIT/");
        assert_eq!(HivePartition::of(t + 1, "DEBIT").day, 6);
        let key = h.file_key(&name(0, 9));
        assert_eq!(HivePartition::parse_key(&key), Some((h.clone(), name(0, 9))));
        for k in [
            watermark_key("transactions", 2),
            intent_key("transactions", &h, &name(0, 9)),
            "year=2026/month=03/day=05/notes.txt".to_string(),
            format!("year=2026/month=03/day=05/x/transaction_type=DEBIT/{}", name(0, 9).file_name()),
        ] {
            assert_eq!(HivePartition::parse_key(&k), None, "{k}");
        }
        assert!(watermark_key("transactions", 2).starts_with("_trstream/"));
        let intent = intent_key("transactions", &h, &name(0, 9));
        assert!(intent.starts_with(&intents_prefix("transactions", 2)), "{intent}");
        assert!(intent.len() < 120, "{intent}");
    }

    fn tx(ttype: &'static str, event_time_us: i64, i: i64) -> Transaction<'static> {
        Transaction {
            transaction_id: Cow::Owned(format!("00000000-0000-4000-8000-{i:012}")),
            user_id: Cow::Borrowed("u"),
            account_id: Cow::Borrowed("a"),
            transaction_type: ttype,
            amount_cents: 100 + i,
            currency: Cow::Borrowed("EUR"),
            merchant_id: None,
            merchant_category: None,
            country: Cow::Borrowed("FR"),
            city: None,
            channel: "POS",
            status: "APPROVED",
            event_time_us,
        }
    }

    #[test]
    fn split_groups_by_utc_day_and_type_keeping_offset_order() {
        let day = 86_400_000_000i64;
        let base = 1_772_668_800_000_000; // 2026-03-05T00:00:00Z
        let mut buf = RowBuffer::new();
        let plan = [("DEBIT", 0), ("CREDIT", 0), ("DEBIT", day), ("DEBIT", 5), ("CREDIT", -1), ("DEBIT", day + 7)];
        for (i, (t, dt)) in plan.iter().enumerate() {
            buf.push(&tx(t, base + dt, i as i64), 2, 100 + i as i64, 0);
        }
        let parts = split(&buf.finish()).unwrap();
        let summary: Vec<(String, Vec<i64>)> = parts
            .iter()
            .map(|(h, b)| {
                let offs = b.column(14).as_primitive::<arrow_array::types::Int64Type>().values().to_vec();
                (format!("{}-{}-{}", h.month, h.day, h.transaction_type), offs)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("3-4-CREDIT".to_string(), vec![104]),
                ("3-5-CREDIT".to_string(), vec![101]),
                ("3-5-DEBIT".to_string(), vec![100, 103]),
                ("3-6-DEBIT".to_string(), vec![102, 105]),
            ]
        );
        assert!(parts.iter().all(|(_, b)| b.schema() == schema()));
    }

    #[test]
    fn merges_take_consecutive_small_files_up_to_the_target() {
        let h = HivePartition::of(0, "DEBIT");
        let f = |first: i64, size: u64| (name(first, first + 9), format!("k{first}"), size);
        let files = vec![f(30, 10), f(0, 10), f(10, 10), f(20, 100), f(40, 10), f(50, 10), f(60, 10), f(70, 1)];
        // Too few small files: nothing.
        assert!(plan_merges(&h, files.clone(), 50, 25, 8).is_empty());
        let plans = plan_merges(&h, files, 50, 25, 4);
        let firsts: Vec<Vec<i64>> = plans.iter().map(|p| p.inputs.iter().map(|i| i.0.first_offset).collect()).collect();
        // [0,10] stops at the large file 20; 30+40 fit 25 bytes, 50 starts a new merge with 60+70.
        assert_eq!(firsts, vec![vec![0, 10], vec![30, 40], vec![50, 60, 70]]);
        assert_eq!(plans[2].output_name(), name(50, 79));
        assert_eq!(plans[0].output_key(), format!("{}{}", h.dir(), name(0, 19).file_name()));
    }
}

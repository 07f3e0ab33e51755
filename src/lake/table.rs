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
/// `kafka_offset` in [`parquet::schema`](crate::lake::parquet::schema).
pub const COL_KAFKA_OFFSET: usize = 14;

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

impl Watermark {
    /// Where the next listing of raw files starts (a first offset): the first offset of the raw
    /// file that moved the watermark here. A file that lands late, or a second writer's file,
    /// can straddle the watermark while starting before it (I9); one that starts at or after
    /// this floor is found. An unreadable `raw_file` lists the partition from the start.
    pub fn listing_floor(&self) -> i64 {
        RawFileName::parse(&self.raw_file).map_or(0, |n| n.first_offset.min(self.last_offset + 1))
    }
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

/// The part of one raw file that the partitioner still has to put in the table: its rows from
/// offset `from` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSlice {
    pub file: RawFileName,
    pub from: i64,
}

impl RawSlice {
    /// The name of the table files made from this slice: the offset range it contributes. A
    /// whole file keeps its raw name, so a re-run overwrites the same keys.
    pub fn output_name(&self) -> RawFileName {
        RawFileName { first_offset: self.from, ..self.file.clone() }
    }

    pub fn is_whole(&self) -> bool {
        self.from == self.file.first_offset
    }
}

/// What the partitioner does with the raw files listed past `watermark`, in order (I9).
///
/// The partitioner works by offsets, not by file boundaries: files are taken by first offset
/// (then last), one that ends at or below the watermark so far is skipped, and one that
/// straddles it contributes only its rows above it; the watermark then moves to its last offset.
/// Overlapping files (the same records at the same offsets, written by two owners or by a PUT
/// that landed late) therefore put each offset in the table once.
pub fn slices_after(watermark: Option<i64>, files: impl IntoIterator<Item = RawFileName>) -> Vec<RawSlice> {
    let mut files: Vec<RawFileName> = files.into_iter().collect();
    files.sort_by_key(|f| (f.first_offset, f.last_offset));
    files.dedup();
    let mut done = watermark;
    let mut slices = Vec::new();
    for file in files {
        if done.is_some_and(|w| file.last_offset <= w) {
            continue;
        }
        let from = done.map_or(file.first_offset, |w| file.first_offset.max(w + 1));
        done = Some(file.last_offset);
        slices.push(RawSlice { file, from });
    }
    slices
}

/// The `kafka_offset` column of a lake batch.
pub fn offsets(batch: &RecordBatch) -> &[i64] {
    batch.column(COL_KAFKA_OFFSET).as_primitive::<arrow_array::types::Int64Type>().values()
}

/// `batch` (rows of one Kafka partition, possibly from overlapping files) in offset order with
/// each offset once: the first row of each offset is kept (a stable sort), the rest dropped.
pub fn keep_each_offset_once(batch: &RecordBatch) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let offs = offsets(batch);
    if offs.windows(2).all(|w| w[0] < w[1]) {
        return Ok(batch.clone());
    }
    let mut rows: Vec<u32> = (0..batch.num_rows() as u32).collect();
    rows.sort_by_key(|&r| offs[r as usize]);
    rows.dedup_by_key(|r| offs[*r as usize]);
    arrow_select::take::take_record_batch(batch, &UInt32Array::from(rows))
}

/// A table file as listed: its source name, key and size in bytes.
pub type TableFile = (RawFileName, String, u64);

/// One merge: consecutive small files of one Hive partition and one Kafka partition, or
/// (`repair`) a set of overlapping files, merged keeping each offset once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    pub hive: HivePartition,
    /// Inputs by first offset: (name, key, size).
    pub inputs: Vec<TableFile>,
    /// The inputs overlap: the merge keeps each (partition, offset) once.
    pub repair: bool,
}

impl MergePlan {
    /// The merged file's name: the offset range its inputs cover. It is never one of theirs:
    /// [`plan_group`] turns a cluster that one file covers whole into a [`TablePlan::DropRedundant`].
    pub fn output_name(&self) -> RawFileName {
        let first = &self.inputs[0].0;
        let last = self.inputs.iter().map(|i| i.0.last_offset).max().expect("a merge has inputs");
        RawFileName { last_offset: last, ..first.clone() }
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

/// What the compactor does with one (Hive partition, Kafka partition) group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TablePlan {
    Merge(MergePlan),
    /// `keep`'s range covers each of `redundant`'s: once their rows are checked to be in `keep`,
    /// they are deleted (a merge would have to write its output over `keep`, one of its inputs).
    DropRedundant {
        hive: HivePartition,
        keep: TableFile,
        redundant: Vec<TableFile>,
    },
}

impl TablePlan {
    pub fn partition(&self) -> i32 {
        match self {
            TablePlan::Merge(m) => m.partition(),
            TablePlan::DropRedundant { keep, .. } => keep.0.partition,
        }
    }
}

/// Plans one (Hive partition, Kafka partition) group (I6, I9).
///
/// Files whose offset ranges overlap (a late PUT, a second writer, a watermark that moved back)
/// are repaired first, and nothing else of the group is merged in that pass: a cluster of
/// overlapping files that one of them covers whole drops the others (their rows are in it), any
/// other cluster is merged keeping each offset once, under a name none of them has. Without
/// overlaps, small files are merged by [`plan_merges`]. So no plan's output is one of its
/// inputs, and no plain merge has overlapping inputs.
pub fn plan_group(
    hive: &HivePartition,
    mut files: Vec<TableFile>,
    small_bytes: u64,
    target_bytes: u64,
    min_files: usize,
) -> Vec<TablePlan> {
    files.sort_by(|a, b| (a.0.first_offset, a.0.last_offset, &a.1).cmp(&(b.0.first_offset, b.0.last_offset, &b.1)));
    files.dedup_by(|a, b| a.1 == b.1);
    let mut clusters: Vec<Vec<TableFile>> = Vec::new();
    let mut end = i64::MIN;
    for f in files.iter().cloned() {
        match clusters.last_mut() {
            Some(c) if f.0.first_offset <= end => c.push(f),
            _ => clusters.push(vec![f]),
        }
        end = end.max(clusters.last().expect("just pushed").last().expect("non-empty").0.last_offset);
    }
    let repairs: Vec<TablePlan> = clusters
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|cluster| {
            let first = cluster[0].0.first_offset;
            let last = cluster.iter().map(|f| f.0.last_offset).max().expect("non-empty");
            match cluster.iter().position(|f| f.0.first_offset == first && f.0.last_offset == last) {
                Some(i) => {
                    let mut redundant = cluster;
                    let keep = redundant.remove(i);
                    TablePlan::DropRedundant { hive: hive.clone(), keep, redundant }
                }
                None => TablePlan::Merge(MergePlan { hive: hive.clone(), inputs: cluster, repair: true }),
            }
        })
        .collect();
    if !repairs.is_empty() {
        return repairs;
    }
    plan_merges(hive, files, small_bytes, target_bytes, min_files).into_iter().map(TablePlan::Merge).collect()
}

impl TablePlan {
    /// A repair of overlapping files (I9), as opposed to a merge of small ones.
    pub fn is_repair(&self) -> bool {
        match self {
            TablePlan::DropRedundant { .. } => true,
            TablePlan::Merge(m) => m.repair,
        }
    }
}

/// Plans the merges of one (Hive partition, Kafka partition) group whose files do not overlap.
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
            plans.push(MergePlan { hive: hive.clone(), inputs: std::mem::take(current), repair: false });
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
    use proptest::prelude::*;
    use std::borrow::Cow;
    use std::collections::BTreeSet;

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

    /// A table or raw file holds the rows of every offset of its range that belong to it: in
    /// the model, offset `o` of the group's Hive partition is there unless `o % 5 == 3` (another
    /// day or type, or dead-lettered).
    fn model_rows(first: i64, last: i64) -> BTreeSet<i64> {
        (first..=last).filter(|o| o % 5 != 3).collect()
    }

    fn table_file(first: i64, last: i64, size: u64) -> TableFile {
        let n = name(first, last);
        let key = HivePartition::of(0, "DEBIT").file_key(&n);
        (n, key, size)
    }

    /// Random offset ranges within 0..200, overlapping often.
    fn ranges(max_files: usize) -> impl Strategy<Value = Vec<(i64, i64)>> {
        proptest::collection::vec((0i64..200, 0i64..40), 1..max_files)
            .prop_map(|v| v.into_iter().map(|(a, len)| (a, a + len)).collect())
    }

    proptest! {
        /// I9 for the compactor: whatever set of (overlapping) files a group holds, no plan writes
        /// over one of its inputs, no plain merge has overlapping inputs, no output overlaps a
        /// file outside its plan, and applying the plans pass after pass ends with files that do
        /// not overlap, holding every offset exactly once.
        #[test]
        fn compaction_plans_never_overwrite_an_input_and_end_with_each_offset_once(
            files in ranges(12),
            sizes in proptest::collection::vec(1u64..60, 12),
            min_files in 1usize..4,
        ) {
            let hive = HivePartition::of(0, "DEBIT");
            // The group: key → rows. Files of one key are one object.
            let mut group: BTreeMap<String, (TableFile, BTreeSet<i64>)> = BTreeMap::new();
            for (i, (a, b)) in files.iter().enumerate() {
                let f = table_file(*a, *b, sizes[i]);
                group.insert(f.1.clone(), (f, model_rows(*a, *b)));
            }
            let expected: BTreeSet<i64> = group.values().flat_map(|(_, r)| r.iter().copied()).collect();
            for _pass in 0..50 {
                let listed: Vec<TableFile> = group.values().map(|(f, _)| f.clone()).collect();
                let plans = plan_group(&hive, listed.clone(), 50, 120, min_files);
                if plans.is_empty() {
                    break;
                }
                let mut used = BTreeSet::new();
                for plan in plans {
                    match plan {
                        TablePlan::Merge(m) => {
                            let out = m.output_key();
                            prop_assert!(m.inputs.len() >= 2);
                            prop_assert!(m.inputs.iter().all(|i| i.1 != out), "output {} is an input", out);
                            prop_assert!(m.inputs.iter().all(|i| used.insert(i.1.clone())), "an input in two plans");
                            if !m.repair {
                                for w in m.inputs.windows(2) {
                                    prop_assert!(w[0].0.last_offset < w[1].0.first_offset, "plain merge of overlapping inputs");
                                }
                            }
                            let o = m.output_name();
                            for other in listed.iter().filter(|f| !m.inputs.contains(f)) {
                                prop_assert!(other.0.last_offset < o.first_offset || other.0.first_offset > o.last_offset,
                                    "output {} overlaps {}", o, other.0);
                            }
                            let mut rows = BTreeSet::new();
                            for i in &m.inputs {
                                rows.extend(group.remove(&i.1).expect("input listed").1);
                            }
                            let size = m.input_bytes();
                            group.insert(out, ((o, m.output_key(), size), rows));
                        }
                        TablePlan::DropRedundant { keep, redundant, .. } => {
                            prop_assert!(redundant.iter().all(|r| r.1 != keep.1));
                            let kept = group[&keep.1].1.clone();
                            for r in &redundant {
                                prop_assert!(used.insert(r.1.clone()));
                                let rows = group.remove(&r.1).expect("listed").1;
                                prop_assert!(rows.is_subset(&kept), "dropping {} loses rows", r.0);
                            }
                        }
                    }
                }
            }
            let mut seen = BTreeSet::new();
            let mut last_end = i64::MIN;
            for (f, rows) in group.values() {
                prop_assert!(f.0.first_offset > last_end, "files still overlap at {}", f.0);
                last_end = f.0.last_offset;
                for o in rows {
                    prop_assert!(seen.insert(*o), "offset {} twice", o);
                }
            }
            prop_assert_eq!(seen, expected);
        }

        /// I9 for the partitioner, all files listed at once: whatever the overlaps, every offset
        /// above the watermark that some file holds goes to the table exactly once, and nothing
        /// at or below it.
        #[test]
        fn partitioner_slices_put_each_offset_above_the_watermark_once(
            files in ranges(10),
            watermark in proptest::option::of(0i64..150),
        ) {
            let names: Vec<RawFileName> = files.iter().map(|(a, b)| name(*a, *b)).collect();
            let mut table = Vec::new();
            let mut w = watermark;
            for slice in slices_after(watermark, names.clone()) {
                let out = slice.output_name();
                prop_assert!(w.is_none_or(|w| out.first_offset > w), "slice {} not above {:?}", out, w);
                prop_assert!(out.first_offset >= slice.file.first_offset && out.last_offset == slice.file.last_offset);
                table.extend(model_rows(out.first_offset, out.last_offset));
                w = Some(out.last_offset);
            }
            let expected: BTreeSet<i64> = names
                .iter()
                .flat_map(|n| model_rows(n.first_offset, n.last_offset))
                .filter(|o| watermark.is_none_or(|w| *o > w))
                .collect();
            let unique: BTreeSet<i64> = table.iter().copied().collect();
            prop_assert_eq!(unique.len(), table.len(), "an offset twice");
            prop_assert_eq!(unique, expected);
        }

        /// The partitioner with files landing in any order between its listings (late PUTs, a
        /// second writer): each listing starts at the watermark's floor, so an offset never goes
        /// to the table twice, and every offset of a file that was there by a listing (and starts
        /// at or after the floor then) goes in.
        #[test]
        fn partitioner_listings_between_late_files_never_double_an_offset(
            files in ranges(10),
            landing in proptest::collection::vec(0usize..4, 10),
        ) {
            let names: Vec<RawFileName> = files.iter().map(|(a, b)| name(*a, *b)).collect();
            let mut landed: Vec<RawFileName> = Vec::new();
            let mut table = Vec::new();
            let (mut w, mut floor): (Option<i64>, i64) = (None, 0);
            let mut owed = BTreeSet::new();
            for round in 0..4 {
                for (i, n) in names.iter().enumerate() {
                    if landing[i] == round {
                        landed.push(n.clone());
                    }
                }
                let listed: Vec<RawFileName> = landed.iter().filter(|n| n.first_offset >= floor).cloned().collect();
                for n in &listed {
                    owed.extend(model_rows(n.first_offset, n.last_offset).into_iter().filter(|o| w.is_none_or(|w| *o > w)));
                }
                for slice in slices_after(w, listed) {
                    let out = slice.output_name();
                    table.extend(model_rows(out.first_offset, out.last_offset));
                    w = Some(out.last_offset);
                    floor = Watermark {
                        topic: "transactions".into(),
                        partition: 2,
                        last_offset: out.last_offset,
                        raw_file: slice.file.key("transactions"),
                        updated_at: String::new(),
                    }.listing_floor();
                }
            }
            let unique: BTreeSet<i64> = table.iter().copied().collect();
            prop_assert_eq!(unique.len(), table.len(), "an offset twice");
            prop_assert!(owed.is_subset(&unique), "offsets lost: {:?}", owed.difference(&unique).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_straddling_file_contributes_only_its_rows_above_the_watermark() {
        // [0-49] is done, [50-99] goes whole, [60-70] is covered, [90-120] straddles 99.
        let slices = slices_after(Some(49), vec![name(90, 120), name(0, 49), name(50, 99), name(60, 70)]);
        let out: Vec<(i64, i64)> =
            slices.iter().map(|s| (s.output_name().first_offset, s.output_name().last_offset)).collect();
        assert_eq!(out, vec![(50, 99), (100, 120)]);
        assert!(slices[0].is_whole() && !slices[1].is_whole());
    }

    #[test]
    fn overlapping_table_files_are_repaired_before_anything_is_merged() {
        let h = HivePartition::of(0, "DEBIT");
        // [0-99] covers [50-99] whole: drop it. [200-260] and [230-300] overlap: merge to [200-300].
        let files = vec![
            table_file(0, 99, 5),
            table_file(50, 99, 5),
            table_file(200, 260, 5),
            table_file(230, 300, 5),
            table_file(400, 410, 5),
        ];
        let plans = plan_group(&h, files, 50, 1000, 2);
        assert_eq!(plans.len(), 2, "{plans:?}");
        match &plans[0] {
            TablePlan::DropRedundant { keep, redundant, .. } => {
                assert_eq!(keep.0, name(0, 99));
                assert_eq!(redundant.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), vec![name(50, 99)]);
            }
            other => panic!("{other:?}"),
        }
        match &plans[1] {
            TablePlan::Merge(m) => {
                assert!(m.repair);
                assert_eq!(m.output_name(), name(200, 300));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merging_overlapping_rows_keeps_each_offset_once_in_offset_order() {
        let mut buf = RowBuffer::new();
        for (i, off) in [10i64, 11, 12, 11, 12, 13, 9].iter().enumerate() {
            buf.push(&tx("DEBIT", 0, i as i64), 2, *off, 0);
        }
        let merged = keep_each_offset_once(&buf.finish()).unwrap();
        assert_eq!(offsets(&merged), &[9, 10, 11, 12, 13]);
        // The first row of each offset is kept.
        let ids = merged.column(0).as_string::<i32>();
        assert_eq!(ids.value(2), "00000000-0000-4000-8000-000000000001");
    }
}

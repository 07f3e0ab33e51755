//! The Partitioner actor: raw files → the Hive-partitioned table (design §3).
//!
//! Each raw file a worker commits is handed over here; its rows are split by UTC day of
//! `event_time` and `transaction_type`, each part is written to
//! `year=/month=/day=/transaction_type=/<raw file name>`, then the Kafka partition's watermark
//! (`_trstream/watermarks/…`) moves to the raw file's last offset. The order makes a crash at any
//! step harmless: outputs are named after their source, so re-running a raw file overwrites the
//! same keys with the same rows, and the watermark only moves once they are all written (I2).
//!
//! Files are processed strictly in offset order per partition. A hand-over is only a hint: on
//! start, on every assignment, after any gap in the hand-overs and every
//! `partitioner.scan_interval`, `raw-data` is listed past the watermark, so a file handed over
//! while this actor was down (or never handed over: adopted after a crash) is never skipped.
//!
//! Only partitions this instance owns are touched (I5); a revoke waits for [`PartitionerMsg::Released`],
//! which is answered between two batches of work, so the next owner is the only writer. A batch
//! is at most one file (or listing) of each of up to four partitions, run concurrently, so a
//! release never waits for more than about one file's time.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::context::PipelineCtx;
use crate::faults::{FaultPoint, Write, WriteKind};
use crate::lake::keys::{self, RawFileName};
use crate::lake::parquet;
use crate::lake::table::{self, RawSlice, Watermark};
use crate::lake::{CondPut, Precondition, WorkError, quarantine};
use crate::metrics as m;

pub struct Partitioner;

pub enum PartitionerMsg {
    /// A worker committed this raw file (a hint: the listing is the truth).
    FileCommitted(RawFileName),
    /// Partitions now owned by this instance.
    Assigned(Vec<i32>),
    /// Partitions no longer owned: forget them; the reply means no work on them is in flight.
    Released(Vec<i32>, RpcReplyPort<()>),
    /// Periodic listing of every owned partition.
    Scan,
    /// Do one unit of work (a listing or a file).
    Step,
    /// Process everything there is now, then reply with the number of raw files processed.
    CatchUp(RpcReplyPort<Result<u64, String>>),
}

/// A partition's progress: everything up to `last` is in the table; listings start at raw files
/// whose first offset is at least `floor` ([`Watermark::listing_floor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub last: i64,
    pub floor: i64,
}

impl From<&Watermark> for Mark {
    fn from(w: &Watermark) -> Self {
        Mark { last: w.last_offset, floor: w.listing_floor() }
    }
}

#[derive(Default)]
struct PartState {
    /// The watermark as last read or written; `None` until read, `Some(None)`: none yet.
    watermark: Option<Option<Mark>>,
    /// The watermark object's ETag as last read or written: its next write is conditional on it
    /// where the store honours that (I9), so a second writer's watermark is never overwritten
    /// unseen.
    etag: Option<String>,
    queue: VecDeque<RawSlice>,
    needs_scan: bool,
    /// The last scan stopped at `partitioner.max_files_per_scan`: scan again once the queue is
    /// done.
    listing_cut: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl PartState {
    fn fresh() -> Self {
        PartState { needs_scan: true, ..Default::default() }
    }

    fn has_work(&self) -> bool {
        self.needs_scan || !self.queue.is_empty()
    }

    /// The last offset known to be covered, by the watermark or by a queued file.
    fn known_end(&self) -> Option<i64> {
        self.queue.back().map(|s| s.file.last_offset).or(self.watermark.flatten().map(|m| m.last))
    }
}

pub struct PartitionerState {
    ctx: Arc<PipelineCtx>,
    parts: BTreeMap<i32, PartState>,
    step_queued: bool,
    /// Round-robin position, so one busy partition does not starve the others.
    cursor: i32,
}

/// Units of work run at once, each of a different partition: their decoding and encoding run
/// on blocking threads in parallel and their uploads overlap. A release waits for one batch.
const CONCURRENT_UNITS: usize = 4;

enum Unit {
    Scan(i32),
    File(i32, RawSlice),
}

impl Unit {
    fn partition(&self) -> i32 {
        match self {
            Unit::Scan(p) | Unit::File(p, _) => *p,
        }
    }
}

/// What a unit found or did, applied to the actor's state once it is back.
enum Done {
    Scanned(Scan),
    /// The slice, partitioned; the watermark's new ETag.
    File(RawSlice, Option<String>),
    /// The slice's raw file was gone: list again.
    Gone,
}

impl Actor for Partitioner {
    type Msg = PartitionerMsg;
    type State = PartitionerState;
    type Arguments = Arc<PipelineCtx>;

    async fn pre_start(
        &self,
        myself: ActorRef<PartitionerMsg>,
        ctx: Arc<PipelineCtx>,
    ) -> Result<PartitionerState, ActorProcessingErr> {
        let parts = ctx.owned_partitions().into_iter().map(|p| (p, PartState::fresh())).collect();
        myself.send_after(ctx.config.partitioner.scan_interval, || PartitionerMsg::Scan);
        let mut state = PartitionerState { ctx, parts, step_queued: false, cursor: -1 };
        state.schedule(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<PartitionerMsg>,
        msg: PartitionerMsg,
        state: &mut PartitionerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionerMsg::FileCommitted(name) => {
                if name.topic == state.ctx.config.lake_topic()
                    && let Some(ps) = state.parts.get_mut(&name.partition)
                {
                    match ps.known_end() {
                        _ if ps.watermark.is_none() || ps.needs_scan => ps.needs_scan = true,
                        // Behind a cut listing: the listing after it finds the file. A scan per
                        // hand-over instead would take the turns of the files (a backlog that
                        // grows while records flow).
                        _ if ps.listing_cut => {}
                        Some(end) if name.last_offset <= end => {} // already covered
                        // A queue as long as a listing's: the next listing finds the rest (I4).
                        Some(_) if ps.queue.len() >= state.ctx.config.partitioner.max_files_per_scan => {
                            ps.listing_cut = true
                        }
                        Some(end) if name.first_offset == end + 1 => {
                            ps.queue.push_back(RawSlice { from: name.first_offset, file: name })
                        }
                        None if name.first_offset == 0 => ps.queue.push_back(RawSlice { from: 0, file: name }),
                        // A gap: a file may have been committed while this actor was down, or
                        // the gap holds only dead-lettered records. The listing tells.
                        _ => ps.needs_scan = true,
                    }
                    state.report_lag();
                    state.schedule(&myself);
                }
            }
            PartitionerMsg::Assigned(parts) => {
                for p in parts {
                    state.parts.insert(p, PartState::fresh());
                }
                state.schedule(&myself);
            }
            PartitionerMsg::Released(parts, reply) => {
                for p in &parts {
                    state.parts.remove(p);
                }
                state.report_lag();
                let _ = reply.send(());
            }
            PartitionerMsg::Scan => {
                state.sync_ownership();
                for ps in state.parts.values_mut() {
                    ps.needs_scan = true;
                }
                myself.send_after(state.ctx.config.partitioner.scan_interval, || PartitionerMsg::Scan);
                state.schedule(&myself);
            }
            PartitionerMsg::Step => {
                state.step_queued = false;
                let units = state.next_units();
                state.run(units).await?;
                state.schedule(&myself);
            }
            PartitionerMsg::CatchUp(reply) => {
                state.sync_ownership();
                for ps in state.parts.values_mut() {
                    ps.needs_scan = true;
                    ps.retry_at = None;
                }
                let mut files = 0u64;
                let mut result = Ok(());
                loop {
                    let units = state.next_units();
                    if units.is_empty() {
                        break;
                    }
                    files += units.iter().filter(|u| matches!(u, Unit::File(..))).count() as u64;
                    if let Err(e) = state.run(units).await {
                        result = Err(e);
                        break;
                    }
                    if state.parts.values().any(|ps| ps.retry_at.is_some()) {
                        result = Err("S3 is failing".into());
                        break;
                    }
                }
                let _ = reply.send(result.as_ref().map(|_| files).map_err(|e| e.to_string()));
                result?;
            }
        }
        Ok(())
    }
}

impl PartitionerState {
    /// Queues one `Step` if there is work that is not waiting on a retry; otherwise a delayed
    /// one for the earliest retry.
    fn schedule(&mut self, myself: &ActorRef<PartitionerMsg>) {
        if self.step_queued {
            return;
        }
        let now = Instant::now();
        let ready = self.parts.values().any(|ps| ps.has_work() && ps.retry_at.is_none_or(|t| t <= now));
        if ready {
            self.step_queued = true;
            let _ = myself.cast(PartitionerMsg::Step);
        } else if let Some(t) = self.parts.values().filter(|ps| ps.has_work()).filter_map(|ps| ps.retry_at).min() {
            self.step_queued = true;
            myself.send_after(t.saturating_duration_since(now), || PartitionerMsg::Step);
        }
    }

    /// Adds owned partitions this actor missed (an assignment while it was restarting) and drops
    /// the ones no longer owned.
    fn sync_ownership(&mut self) {
        let owned = self.ctx.owned_partitions();
        self.parts.retain(|p, _| owned.contains(p));
        for p in owned {
            self.parts.entry(p).or_insert_with(PartState::fresh);
        }
    }

    /// The next units of work, of distinct partitions, round robin from the last one served.
    fn next_units(&mut self) -> Vec<Unit> {
        let now = Instant::now();
        let mut ready: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, ps)| ps.has_work() && ps.retry_at.is_none_or(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        let split = ready.iter().position(|&p| p > self.cursor).unwrap_or(0);
        ready.rotate_left(split);
        ready.truncate(CONCURRENT_UNITS);
        if let Some(&last) = ready.last() {
            self.cursor = last;
        }
        ready
            .into_iter()
            .map(|p| {
                let ps = &self.parts[&p];
                if ps.needs_scan { Unit::Scan(p) } else { Unit::File(p, ps.queue[0].clone()) }
            })
            .collect()
    }

    /// Runs `units` concurrently and waits for all of them, so that between two messages
    /// nothing is in flight. A retryable store error backs its partition off; anything else
    /// fails the actor once the others have finished (its supervisor restarts it, and it
    /// resumes at the watermarks).
    async fn run(&mut self, units: Vec<Unit>) -> Result<(), ActorProcessingErr> {
        let mut tasks = tokio::task::JoinSet::new();
        for unit in units {
            let p = unit.partition();
            if !self.ctx.owns(p) {
                self.parts.remove(&p);
                continue;
            }
            let ctx = self.ctx.clone();
            let known = self.parts.get(&p).and_then(|ps| ps.watermark.map(|w| (w, ps.etag.clone())));
            // The watermark's write is conditional on what was last seen of it, where the store
            // honours that: created if there was none, replaced only if unchanged.
            let pre = match self.parts.get(&p).map(|ps| (ps.watermark, ps.etag.clone())) {
                _ if !self.ctx.conditional_writes.load(Ordering::Relaxed) => None,
                Some((Some(None), _)) => Some(Precondition::Absent),
                Some((Some(Some(_)), Some(etag))) => Some(Precondition::Matches(etag)),
                _ => None,
            };
            tasks.spawn(async move {
                let res = match unit {
                    Unit::Scan(p) => list_after_watermark(&ctx, p, known).await.map(Done::Scanned),
                    Unit::File(p, slice) => match partition_file(&ctx, p, &slice, pre).await {
                        Ok(Some(etag)) => Ok(Done::File(slice, etag)),
                        Ok(None) => Ok(Done::Gone),
                        Err(e) => Err(e),
                    },
                };
                (p, res)
            });
        }
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let (p, res) = joined.map_err(|e| format!("partitioner task failed: {e}"))?;
            if let Err(e) = self.apply(p, res) {
                failure.get_or_insert(e);
            }
        }
        self.report_lag();
        failure.map_or(Ok(()), Err)
    }

    fn apply(&mut self, p: i32, res: Result<Done, WorkError>) -> Result<(), ActorProcessingErr> {
        match res {
            Ok(done) => {
                if let Some(ps) = self.parts.get_mut(&p) {
                    ps.retry_at = None;
                    ps.backoff = Duration::ZERO;
                    match done {
                        Done::Scanned(Scan { watermark, etag, queue, cut }) => {
                            ps.watermark = Some(watermark);
                            ps.etag = etag;
                            ps.queue = queue;
                            ps.needs_scan = false;
                            ps.listing_cut = cut;
                        }
                        Done::Gone => ps.needs_scan = true,
                        Done::File(slice, etag) => {
                            let mark = Mark { last: slice.file.last_offset, floor: slice.file.first_offset };
                            ps.watermark = Some(Some(mark));
                            ps.etag = etag;
                            if ps.queue.front() == Some(&slice) {
                                ps.queue.pop_front();
                            }
                            if ps.queue.is_empty() && ps.listing_cut {
                                ps.listing_cut = false;
                                ps.needs_scan = true;
                            }
                        }
                    }
                }
                self.ctx.health.s3_ok.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(WorkError::Fenced(f)) => {
                // Another instance claimed the partition (I9): its table is theirs now.
                metrics::counter!(m::ZOMBIE_WRITES_REFUSED, "kind" => "table").increment(1);
                self.ctx.stats.zombie_writes_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = p, error = %f, "partitioner lets go of a partition claimed by another instance");
                // Only here: the ingest side stops the partition itself, and a claim this instance
                // writes again on a new assignment must find the partition still owned.
                self.parts.remove(&p);
                Ok(())
            }
            Err(err) => {
                if let WorkError::Refused(why) = &err {
                    metrics::counter!(m::ZOMBIE_WRITES_REFUSED, "kind" => "watermark").increment(1);
                    self.ctx.stats.zombie_writes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = p, reason = %why, "watermark write refused; reading it again");
                }
                let e = err.retryable()?;
                metrics::counter!(m::PARTITIONER_ERRORS).increment(1);
                self.ctx.health.s3_ok.store(false, Ordering::Relaxed);
                if let Some(ps) = self.parts.get_mut(&p) {
                    // A request that failed may still have been applied (the store died after
                    // writing the watermark, before answering): read it again, and list again.
                    // Trusting the one in memory would partition a covered file a second time,
                    // after the compactor may have merged its outputs away: duplicates.
                    *ps = PartState { backoff: ps.backoff, ..PartState::fresh() };
                    ps.backoff = self.ctx.config.upload.next_backoff(ps.backoff);
                    ps.retry_at = Some(Instant::now() + ps.backoff);
                    tracing::warn!(partition = p, error = %e, retry_in = ?ps.backoff, "partitioner will retry");
                }
                Ok(())
            }
        }
    }

    fn report_lag(&self) {
        let lag: usize = self.parts.values().map(|ps| ps.queue.len()).sum();
        metrics::gauge!(m::PARTITIONER_LAG_FILES).set(lag as f64);
    }
}

/// What a listing found: the watermark (with its ETag) and the slices left to partition.
struct Scan {
    watermark: Option<Mark>,
    etag: Option<String>,
    queue: VecDeque<RawSlice>,
    /// The listing stopped at `partitioner.max_files_per_scan`: more files follow the queue's
    /// last. A backlog of days (a table store down while ingestion went on) is listed that many
    /// files at a time, the next listing once these are done, not held whole for every partition
    /// at once (I4).
    cut: bool,
}

/// Reads the watermark (restoring `known` if it moved back, I9), then lists the raw files of `p` from its floor and
/// returns what is left to partition: whole files past the watermark, and the part above it of
/// one that straddles it (I9).
async fn list_after_watermark(
    ctx: &PipelineCtx,
    p: i32,
    known: Option<(Option<Mark>, Option<String>)>,
) -> Result<Scan, WorkError> {
    let topic = &ctx.config.lake_topic();
    let conditional = ctx.conditional_writes.load(Ordering::Relaxed);
    let in_memory = known.as_ref().and_then(|k| k.0);
    let (mut watermark, mut etag) = match known {
        // Where writes are conditional, the next one is refused if it moved.
        Some(w) if conditional => w,
        _ => read_watermark_mark(ctx, topic, p, true).await?,
    };
    if let Some(mine) = in_memory
        && !conditional
        && watermark.is_none_or(|w| w.last < mine.last)
    {
        // Moved back behind this partitioner's back: a late write of its own, or a zombie's,
        // on a store that ignores If-Match (Garage; elsewhere the next write is refused and the
        // partitioner reads it again). Put this partitioner's back, or it would stay back at
        // rest, the files above it partitioned again by the next owner and its overlaps left
        // unrepaired (the compactor takes only files at or below the watermark).
        tracing::warn!(partition = p, stored = ?watermark.map(|w| w.last), mine = mine.last, "the watermark moved back; restoring it");
        ctx.check_fence(p).await?;
        let raw = RawFileName { topic: topic.clone(), partition: p, first_offset: mine.floor, last_offset: mine.last };
        let wm = Watermark {
            topic: topic.clone(),
            partition: p,
            last_offset: mine.last,
            raw_file: raw.key(&ctx.config.s3.raw_prefix),
            updated_at: chrono::Utc::now().to_rfc3339(),
        };
        let body = bytes::Bytes::from(serde_json::to_vec_pretty(&wm).expect("a watermark serializes"));
        ctx.table.put(&table::watermark_key(topic, p), body, "application/json").await?;
        (watermark, etag) = (Some(mine), None);
    }
    let raw_prefix = &ctx.config.s3.raw_prefix;
    let floor = watermark.map_or(0, |w| w.floor);
    let marker = keys::start_after_for(raw_prefix, topic, p, floor);
    let (mut files, mut cut) = (Vec::new(), false);
    ctx.store
        .list_paged(&keys::partition_prefix(raw_prefix, p), Some(&marker), |page| {
            // Files wholly at or below the watermark are done: not queued, nor counted.
            let names = page.iter().filter_map(|o| RawFileName::parse(&o.key));
            let ahead = |n: &RawFileName| watermark.is_none_or(|w| n.last_offset > w.last);
            for n in names.filter(|n| &n.topic == topic && n.partition == p && ahead(n)) {
                if files.len() == ctx.config.partitioner.max_files_per_scan {
                    cut = true;
                    return ControlFlow::Break(());
                }
                files.push(n);
            }
            ControlFlow::Continue(())
        })
        .await?;
    Ok(Scan { watermark, etag, queue: table::slices_after(watermark.map(|w| w.last), files).into(), cut })
}

/// Partitions one slice of a raw file: its outputs, then the watermark (under `pre`, when
/// given). `Ok(Some(etag))`: done, the new watermark's ETag; `Ok(None)`: the raw file is gone
/// (the partition must be listed again).
async fn partition_file(
    ctx: &Arc<PipelineCtx>,
    p: i32,
    slice: &RawSlice,
    pre: Option<Precondition>,
) -> Result<Option<Option<String>>, WorkError> {
    // I9: nothing of a partition another instance has claimed is written.
    ctx.check_fence(p).await?;
    let started = Instant::now();
    let name = &slice.file;
    let raw_key = name.key(&ctx.config.s3.raw_prefix);
    let Some(body) = ctx.store.get_opt(&raw_key).await? else {
        // Listed or handed over, now gone: raw retention outside trstream, or a recovery that
        // quarantined it (an uncommitted file that did not decode).
        tracing::warn!(partition = p, key = %raw_key, "raw file vanished before it was partitioned; rescanning");
        return Ok(None);
    };
    let Some(mut batch) = decode_raw(ctx, name, body).await? else { return Ok(None) };
    let (level, rg) = (ctx.config.parquet.zstd_level, ctx.config.parquet.row_group_rows);
    let (src, out, from) = (name.clone(), slice.output_name(), slice.from);
    type Output = (table::HivePartition, String, usize, Vec<u8>);
    let outputs = tokio::task::spawn_blocking(move || -> Result<Vec<Output>, String> {
        if from > src.first_offset {
            // A straddling file: only its rows above the watermark are still to go.
            let keep = arrow_array::BooleanArray::from_iter(table::offsets(&batch).iter().map(|&o| Some(o >= from)));
            batch = arrow_select::filter::filter_record_batch(&batch, &keep)
                .map_err(|e| format!("slicing {src} from offset {from}: {e}"))?;
        }
        let parts = table::split(&batch).map_err(|e| format!("splitting {src}: {e}"))?;
        parts
            .into_iter()
            .map(|(hive, part)| {
                let mut meta = parquet::source_metadata(&out, part.num_rows());
                meta.push(::parquet::file::metadata::KeyValue::new("trstream.source.raw_file".into(), src.file_name()));
                let bytes = parquet::encode_with(&part, meta, level, rg)
                    .map_err(|e| format!("encoding {}: {e}", hive.file_key(&out)))?;
                Ok((hive.clone(), hive.file_key(&out), part.num_rows(), bytes))
            })
            .collect()
    })
    .await
    .map_err(|e| WorkError::Other(format!("partitioner task failed: {e}")))?
    .map_err(WorkError::Other)?;

    // I9: the check above may be older than the work since (a stall while decoding or
    // encoding): checked again right before the first write, and again before the watermark.
    ctx.check_fence(p).await?;
    let files = outputs.len();
    let rows: usize = outputs.iter().map(|o| o.2).sum();
    let hives: Vec<_> = outputs.iter().map(|o| o.0.clone()).collect();
    // The outputs are independent objects: PUT them concurrently (one per Hive partition,
    // a handful per file). The watermark waits for all of them. A failed PUT may still land
    // later: the compactor is told to leave those Hive partitions alone for a while.
    let out_name = slice.output_name();
    let mut outputs = outputs.into_iter();
    if let Some((hive, key, _, bytes)) = outputs.next() {
        put_output(ctx, p, hive, &out_name, key, bytes.into()).await?;
        ctx.faults.check(FaultPoint::PartitionerAfterFirstOutput)?;
    }
    let mut puts = tokio::task::JoinSet::new();
    for (hive, key, _, bytes) in outputs {
        let (ctx, out_name) = (ctx.clone(), out_name.clone());
        puts.spawn(async move { put_output(&ctx, p, hive, &out_name, key, bytes.into()).await });
    }
    while let Some(res) = puts.join_next().await {
        res.map_err(|e| WorkError::Other(format!("partitioner upload task failed: {e}")))??;
    }
    ctx.faults.check(FaultPoint::PartitionerBeforeWatermark)?;
    ctx.check_fence(p).await?;
    let wm = Watermark {
        topic: name.topic.clone(),
        partition: p,
        last_offset: name.last_offset,
        raw_file: raw_key,
        updated_at: chrono::Utc::now().to_rfc3339(),
    };
    let body = serde_json::to_vec_pretty(&wm).expect("a watermark serializes");
    let wm_key = table::watermark_key(&name.topic, p);
    let body = bytes::Bytes::from(body);
    let how = match &pre {
        Some(pre) => Write::Conditional("application/json", pre),
        None => Write::Plain("application/json"),
    };
    ctx.faults.late_write(WriteKind::Watermark, &ctx.table, &wm_key, &body, how)?;
    let new_etag = if let Some(pre) = pre {
        match ctx.table.put_conditional(&wm_key, body, "application/json", &pre).await? {
            CondPut::Written(etag) => etag,
            CondPut::Refused => {
                return Err(WorkError::Refused(format!(
                    "the watermark {wm_key} changed since it was read (another writer's?)"
                )));
            }
        }
    } else {
        ctx.table.put(&wm_key, body, "application/json").await?;
        None
    };
    ctx.faults.check(FaultPoint::PartitionerAfterWatermark)?;
    ctx.touch(p, hives);
    ctx.stats.partitioned_files.fetch_add(1, Ordering::Relaxed);
    ctx.stats.partitioned_rows.fetch_add(rows as u64, Ordering::Relaxed);
    ctx.stats.table_files_written.fetch_add(files as u64, Ordering::Relaxed);
    metrics::counter!(m::PARTITIONER_FILES).increment(1);
    metrics::counter!(m::PARTITIONER_ROWS).increment(rows as u64);
    metrics::counter!(m::PARTITIONER_OUTPUT_FILES).increment(files as u64);
    tracing::debug!(partition = p, file = %name, from, rows, outputs = files, elapsed = ?started.elapsed(), "partitioned");
    Ok(Some(new_etag))
}

/// Decodes the raw file `name` for the table. One that cannot be read as what its name says is
/// read once more (a transfer that went wrong reads right the second time), then quarantined
/// (I10): `Ok(None)`, and the partition is listed again without it. Its rows do not reach the
/// table; its records are still in Kafka while retention keeps them (supervision.md, "Poison
/// objects").
pub(crate) async fn decode_raw(
    ctx: &PipelineCtx,
    name: &RawFileName,
    body: bytes::Bytes,
) -> Result<Option<arrow_array::RecordBatch>, WorkError> {
    let (key, p, last) = (&name.key(&ctx.config.s3.raw_prefix), name.partition, name.last_offset);
    let file = name.clone();
    let decode = move |b| parquet::decode_raw(b, &file).map_err(|e| e.to_string());
    let (again, why) = match quarantine::decode_twice(&ctx.store, key, body, decode).await? {
        quarantine::Reread::Decodes(batch) => return Ok(Some(batch)),
        quarantine::Reread::Gone => return Ok(None),
        quarantine::Reread::Poison { body, why } => (body, why),
    };
    // Only a file the partition's commit has passed: one uploaded and not committed yet may be
    // about to be adopted by a recovery (its offsets then committed without being read again),
    // and a file quarantined before that is simply written again from the log. Until then, wait.
    if ctx.stats.committed().get(&p).is_none_or(|&next| next <= last) {
        return Err(WorkError::Store(crate::lake::StoreError::Retryable {
            op: "decode",
            target: key.to_string(),
            detail: format!("{why}; quarantined once this instance has committed past offset {last}"),
        }));
    }
    ctx.check_fence(p).await?;
    quarantine::quarantine(ctx, &ctx.store, key, again, quarantine::Kind::Raw, &why).await?;
    Ok(None)
}

/// Writes table file `name` of `hive` again from raw-data (I10): the rows of its Kafka
/// partition's raw files with offsets in its range whose Hive partition is `hive`, each offset
/// once, in offset order: what the file held, as long as raw-data still holds it. Used after the
/// file was quarantined (unreadable). Returns the rows written.
pub(crate) async fn rebuild_table_file(
    ctx: &Arc<PipelineCtx>,
    hive: &table::HivePartition,
    name: &RawFileName,
) -> Result<usize, WorkError> {
    let p = name.partition;
    let raw_prefix = &ctx.config.s3.raw_prefix;
    // Raw files are listed in first-offset order, a page at a time, keeping only those that
    // overlap the range: the listing starts at the partition's first file (a file straddling the
    // range's start) and stops at the first that starts past it.
    let mut sources: Vec<RawFileName> = Vec::new();
    ctx.store
        .list_paged(&keys::partition_prefix(raw_prefix, p), None, |page| {
            let names = page.iter().filter_map(|o| RawFileName::parse(&o.key));
            let mut past = false;
            for f in names.filter(|f| f.topic == name.topic && f.partition == p) {
                past |= f.first_offset > name.last_offset;
                if f.first_offset <= name.last_offset && name.first_offset <= f.last_offset {
                    sources.push(f);
                }
            }
            if past { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .await?;
    // One raw file at a time, keeping only the rows of the file's range and Hive partition: a
    // merged file of a sparse Hive partition can span much of the partition's history (I4).
    let mut parts = Vec::new();
    for f in &sources {
        let key = f.key(raw_prefix);
        let Some(body) = ctx.store.get_opt(&key).await? else { continue };
        let Some(batch) = decode_raw(ctx, f, body).await? else { continue };
        let (want, range) = (hive.clone(), name.first_offset..=name.last_offset);
        let part = tokio::task::spawn_blocking(move || -> Result<Option<arrow_array::RecordBatch>, String> {
            let keep =
                arrow_array::BooleanArray::from_iter(table::offsets(&batch).iter().map(|o| Some(range.contains(o))));
            let batch = arrow_select::filter::filter_record_batch(&batch, &keep).map_err(|e| e.to_string())?;
            Ok(table::split(&batch).map_err(|e| e.to_string())?.into_iter().find(|(h, _)| *h == want).map(|(_, b)| b))
        })
        .await
        .map_err(|e| WorkError::Other(format!("rebuild task failed: {e}")))?
        .map_err(|e| WorkError::Other(format!("rebuilding {}: {e}", hive.file_key(name))))?;
        parts.extend(part);
    }
    let (level, rg) = (ctx.config.parquet.zstd_level, ctx.config.parquet.row_group_rows);
    let out = name.clone();
    let rebuilt = tokio::task::spawn_blocking(move || -> Result<Option<(usize, Vec<u8>)>, String> {
        if parts.is_empty() {
            return Ok(None);
        }
        let part = parquet::concat_union(&parts).map_err(|e| e.to_string())?;
        let part = table::keep_each_offset_once(&part).map_err(|e| e.to_string())?;
        let mut meta = parquet::source_metadata(&out, part.num_rows());
        meta.push(::parquet::file::metadata::KeyValue::new("trstream.rebuilt_from_raw".into(), "true".to_string()));
        let bytes = parquet::encode_with(&part, meta, level, rg).map_err(|e| e.to_string())?;
        Ok(Some((part.num_rows(), bytes)))
    })
    .await
    .map_err(|e| WorkError::Other(format!("rebuild task failed: {e}")))?
    .map_err(|e| WorkError::Other(format!("rebuilding {}: {e}", hive.file_key(name))))?;
    let key = hive.file_key(name);
    let Some((rows, bytes)) = rebuilt else {
        tracing::error!(
            partition = p,
            key,
            sources = sources.len(),
            "a quarantined table file cannot be rebuilt: raw-data no longer holds its rows (retention?); trstream audit reports them missing"
        );
        return Ok(0);
    };
    ctx.check_fence(p).await?;
    ctx.table.put(&key, bytes.into(), "application/vnd.apache.parquet").await?;
    ctx.stats.table_files_rebuilt.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::TABLE_FILES_REBUILT).increment(1);
    tracing::warn!(partition = p, key, rows, sources = sources.len(), "rebuilt a quarantined table file from raw-data");
    Ok(rows)
}

/// One table file of a slice. A failed PUT may still land later: the compactor is told to
/// leave its Hive partition alone for a while.
async fn put_output(
    ctx: &PipelineCtx,
    p: i32,
    hive: table::HivePartition,
    name: &RawFileName,
    key: String,
    bytes: bytes::Bytes,
) -> Result<(), WorkError> {
    const PARQUET: &str = "application/vnd.apache.parquet";
    // I9: each output checked right before its PUT (the ones after the first wait for it).
    ctx.check_fence(p).await?;
    let put = match ctx.faults.late_write(WriteKind::Table, &ctx.table, &key, &bytes, Write::Plain(PARQUET)) {
        Ok(()) => ctx.table.put(&key, bytes, PARQUET).await,
        Err(e) => Err(e),
    };
    put.inspect_err(|_| ctx.table_write_failed(p, hive, name))?;
    Ok(())
}

/// The partitioner's watermark of `partition` (`None`: nothing partitioned yet).
/// A watermark that is not one is taken as absent (nothing is done with the files it would
/// cover) and left for the partitioner to quarantine: one writer of the key, so a quarantine
/// never deletes the new watermark the partitioner wrote meanwhile.
pub async fn read_watermark(ctx: &PipelineCtx, topic: &str, partition: i32) -> Result<Option<i64>, WorkError> {
    Ok(read_watermark_mark(ctx, topic, partition, false).await?.0.map(|m| m.last))
}

/// The watermark of `partition` with its listing floor, and the object's ETag. One that is not a
/// watermark of this partition is quarantined (I10) and taken as absent: the partition is then
/// partitioned again from its first raw file, under the same names, and what the compactor had
/// merged meanwhile overlaps the new slices until its repair (I9). Slow, never wrong.
async fn read_watermark_mark(
    ctx: &PipelineCtx,
    topic: &str,
    partition: i32,
    quarantine_bad: bool,
) -> Result<(Option<Mark>, Option<String>), WorkError> {
    let key = table::watermark_key(topic, partition);
    let Some((body, etag)) = ctx.table.get_with_etag(&key).await? else { return Ok((None, None)) };
    let why = match serde_json::from_slice::<Watermark>(&body) {
        Ok(w) if w.partition == partition && w.topic == topic && w.last_offset >= 0 => {
            return Ok((Some(Mark::from(&w)), etag));
        }
        Ok(w) => format!(
            "a watermark of {}/{} at offset {} found where {topic}/{partition}'s belongs",
            w.topic, w.partition, w.last_offset
        ),
        Err(e) => format!("not a trstream watermark: {e}"),
    };
    if !quarantine_bad {
        return Ok((None, None));
    }
    ctx.check_fence(partition).await?;
    quarantine::quarantine(ctx, &ctx.table, &key, body, quarantine::Kind::Watermark, &why).await?;
    tracing::warn!(
        partition,
        "the partition is partitioned again from its first raw file; overlaps with merged files are repaired by the compactor"
    );
    Ok((None, None))
}

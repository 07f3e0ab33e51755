//! The Compactor actor: merges small files of the table (design §3), crash-safe (I6).
//!
//! Every `compactor.interval` it lists the table, keeps the files of the Kafka partitions this
//! instance owns (I5) that the partitioner has finished with (last offset at or below the
//! partition's watermark), and plans merges per (Hive partition, Kafka partition) with
//! [`table::plan_merges`]. The whole table is listed once per assignment (and after any failed
//! pass); after that a pass lists only the Hive partitions the partitioner wrote to since the
//! last one, so a table that grows for months costs a pass no more than the new data does.
//! One merge is:
//!
//! 1. write the intent (`_trstream/compactions/<topic>/partition=<p>/…`: output and inputs);
//! 2. read the inputs in offset order, write the merged file (one PUT: it appears whole or not);
//! 3. delete the inputs;
//! 4. delete the intent.
//!
//! Recovery, on start and whenever a partition is assigned, before any new merge of it: an intent
//! whose output exists is completed (its remaining inputs deleted), one whose output does not
//! exist is rolled back (nothing was deleted yet). Either way every row is in the table exactly
//! once. Merges run one per message, so a revoke waits for at most one merge.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::context::PipelineCtx;
use crate::faults::{FaultPoint, Write, WriteKind};
use crate::lake::parquet;
use crate::lake::table::{self, CompactionIntent, MergePlan, TableFile, TablePlan};
use crate::lake::{CondPut, HivePartition, Precondition, WorkError, quarantine};
use crate::metrics as m;
use crate::table::partitioner::{read_watermark, rebuild_table_file};

/// The `table` label of the lake gauges.
const TABLE: &str = "tb-transactions";

const PARQUET: &str = "application/vnd.apache.parquet";

/// A streamed merge uploads its output in parts of at least this many bytes (S3 takes parts of
/// 5 MiB and more, but for the last).
const PART_BYTES: usize = 8 << 20;

/// Past this many Hive partitions to look at, one listing of the whole table is cheaper.
const FULL_LISTING_ABOVE: usize = 64;

/// The whole table is listed at least this often, so that an overlap in a Hive partition the
/// partitioner no longer touches (a table file written late, I9) is repaired within this time.
const FULL_LISTING_EVERY: Duration = Duration::from_secs(600);

pub struct Compactor;

pub enum CompactorMsg {
    /// Time for a pass.
    Tick,
    /// Do one unit of work (recover one partition's intents, or one merge).
    Continue,
    /// Partitions now owned: recover their intents before merging anything of theirs.
    Assigned(Vec<i32>),
    /// Partitions no longer owned: forget them; the reply means no work on them is in flight.
    Released(Vec<i32>, RpcReplyPort<()>),
}

/// Files, small files and bytes of one (Hive partition, Kafka partition) group.
#[derive(Debug, Default, Clone, Copy)]
struct FileCounts {
    files: u64,
    small: u64,
    bytes: u64,
}

pub struct CompactorState {
    ctx: Arc<PipelineCtx>,
    to_recover: BTreeSet<i32>,
    plans: VecDeque<TablePlan>,
    /// Owned partitions whose files have not been listed since they were assigned.
    full_listing: BTreeSet<i32>,
    /// Per (Hive partition, Kafka partition), for the lake gauges.
    counts: BTreeMap<(HivePartition, i32), FileCounts>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_full_listing: Instant,
}

/// A compaction pass's listing, planned as it goes. The keys of one Hive partition are
/// contiguous in a listing (they share its directory as a prefix), so the files of one
/// directory are held at a time: its groups are planned when the listing leaves it.
struct Planner<'a> {
    topic: &'a str,
    owned: &'a BTreeSet<i32>,
    /// The partitions' watermarks: only files at or below them are merged.
    watermarks: &'a BTreeMap<i32, i64>,
    /// Offset ranges per group whose table writes failed lately and may still land.
    watched: &'a BTreeMap<(HivePartition, i32), Vec<(i64, i64)>>,
    cfg: &'a crate::config::CompactorConfig,
    counts: &'a mut BTreeMap<(HivePartition, i32), FileCounts>,
    plans: &'a mut VecDeque<TablePlan>,
    /// The directory being listed, and its files to plan, per Kafka partition.
    hive: Option<HivePartition>,
    groups: BTreeMap<i32, Vec<TableFile>>,
    /// The listing stopped at a directory, [`MAX_PLANNED_MERGES`] reached.
    cut: bool,
}

/// Merges planned at most by one pass (I4): after a long compactor outage nearly every file is
/// one to merge, and plans naming them all would grow with the table. The listing stops at the
/// next directory once this many are planned, and the next pass lists everything again: the
/// directories merged meanwhile plan nothing, so each pass gets further (no resume marker, which
/// every reason to list from the start, an assignment or a failed pass, would have to reset).
const MAX_PLANNED_MERGES: usize = 1000;

impl Planner<'_> {
    fn take(&mut self, page: Vec<crate::lake::ObjectInfo>) -> ControlFlow<()> {
        for o in page {
            let Some((hive, name)) = HivePartition::parse_key(&o.key) else { continue };
            if name.topic != self.topic || !self.owned.contains(&name.partition) {
                continue;
            }
            // Only keys of the layout this version writes (`month=01`, not `month=1`): their
            // directory's files are contiguous in the listing, and a merge writes back there.
            if !o.key.starts_with(&hive.dir()) {
                continue;
            }
            if self.hive.as_ref() != Some(&hive) {
                self.plan();
                if self.plans.len() >= MAX_PLANNED_MERGES {
                    self.cut = true;
                    return ControlFlow::Break(());
                }
                self.hive = Some(hive.clone());
            }
            let count = self.counts.entry((hive, name.partition)).or_default();
            count.files += 1;
            count.small += u64::from(o.size < self.cfg.small_file_bytes);
            count.bytes += o.size;
            if self.watermarks.get(&name.partition).is_some_and(|&w| name.last_offset <= w) {
                self.groups.entry(name.partition).or_default().push((name, o.key, o.size));
            }
        }
        ControlFlow::Continue(())
    }

    /// Plans the merges of the directory listed so far.
    fn plan(&mut self) {
        let Some(hive) = self.hive.take() else { return };
        let cfg = self.cfg;
        for (p, group) in std::mem::take(&mut self.groups) {
            let plans = table::plan_group(&hive, group, cfg.small_file_bytes, cfg.target_file_bytes, cfg.min_files);
            let ranges = self.watched.get(&(hive.clone(), p)).map_or(&[][..], Vec::as_slice);
            let overlaps_watched = |f: &TableFile| {
                ranges.iter().any(|&(first, last)| f.0.first_offset <= last && first <= f.0.last_offset)
            };
            self.plans.extend(plans.into_iter().filter(|plan| match plan {
                TablePlan::Merge(m) if !m.repair => !m.inputs.iter().any(overlaps_watched),
                _ => true,
            }));
        }
    }
}

impl Actor for Compactor {
    type Msg = CompactorMsg;
    type State = CompactorState;
    type Arguments = Arc<PipelineCtx>;

    async fn pre_start(
        &self,
        myself: ActorRef<CompactorMsg>,
        ctx: Arc<PipelineCtx>,
    ) -> Result<CompactorState, ActorProcessingErr> {
        let to_recover: BTreeSet<i32> = ctx.owned_partitions().into_iter().collect();
        myself.send_after(ctx.config.compactor.interval, || CompactorMsg::Tick);
        let _ = myself.cast(CompactorMsg::Continue);
        Ok(CompactorState {
            ctx,
            full_listing: to_recover.clone(),
            to_recover,
            plans: VecDeque::new(),
            counts: BTreeMap::new(),
            retry_at: None,
            backoff: Duration::ZERO,
            last_full_listing: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<CompactorMsg>,
        msg: CompactorMsg,
        state: &mut CompactorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CompactorMsg::Assigned(parts) => {
                state.full_listing.extend(parts.iter().copied());
                state.to_recover.extend(parts);
                let _ = myself.cast(CompactorMsg::Continue);
            }
            CompactorMsg::Released(parts, reply) => {
                for p in &parts {
                    state.to_recover.remove(p);
                    state.full_listing.remove(p);
                }
                state.plans.retain(|plan| !parts.contains(&plan.partition()));
                state.counts.retain(|(_, p), _| !parts.contains(p));
                state.set_gauges();
                let _ = reply.send(());
            }
            CompactorMsg::Tick => {
                myself.send_after(state.ctx.config.compactor.interval, || CompactorMsg::Tick);
                if state.retry_at.is_some_and(|t| t <= Instant::now()) {
                    state.retry_at = None;
                }
                if state.plans.is_empty() && state.retry_at.is_none() {
                    let res = state.plan_pass().await;
                    if res.is_err() {
                        // The touched Hive partitions taken for this pass are forgotten: list all.
                        state.full_listing.extend(state.ctx.owned_partitions());
                    }
                    state.outcome(res)?;
                }
                let _ = myself.cast(CompactorMsg::Continue);
            }
            CompactorMsg::Continue => {
                if state.retry_at.is_some_and(|t| t > Instant::now()) {
                    return Ok(());
                }
                state.retry_at = None;
                let res = if let Some(&p) = state.to_recover.iter().next() {
                    state.recover(p).await.map(|()| {
                        state.to_recover.remove(&p);
                    })
                } else if let Some(plan) = state.plans.pop_front() {
                    let res = match &plan {
                        TablePlan::Merge(m) => state.merge(m).await,
                        TablePlan::DropRedundant { hive, keep, redundant } => {
                            state.drop_redundant(hive, keep, redundant).await
                        }
                    };
                    if res.is_err() {
                        // The merge stopped somewhere between its intent and its last delete.
                        // Retrying the plan would overwrite the intent with one whose inputs are
                        // partly gone, then abandon it: the merged file and the inputs not yet
                        // deleted would both stay, the same rows twice. Recover the partition
                        // from its intents first (complete or roll back), then plan afresh.
                        let p = plan.partition();
                        state.to_recover.insert(p);
                        state.full_listing.insert(p);
                        state.plans.retain(|other| other.partition() != p);
                    }
                    res
                } else {
                    return Ok(());
                };
                state.outcome(res)?;
                match state.retry_at {
                    Some(t) => {
                        myself.send_after(t.saturating_duration_since(Instant::now()), || CompactorMsg::Continue)
                    }
                    None => {
                        let _ = myself.cast(CompactorMsg::Continue);
                        return Ok(());
                    }
                };
            }
        }
        Ok(())
    }
}

impl CompactorState {
    /// A retryable store error backs off; anything else fails the actor (it is restarted and
    /// recovers its intents first).
    fn outcome(&mut self, res: Result<(), WorkError>) -> Result<(), ActorProcessingErr> {
        let err = match res {
            Ok(()) => {
                self.backoff = Duration::ZERO;
                return Ok(());
            }
            Err(WorkError::Fenced(f)) => {
                // Another instance claimed the partition (I9): its table is theirs now.
                let p = f.partition;
                metrics::counter!(m::ZOMBIE_WRITES_REFUSED, "kind" => "table").increment(1);
                self.ctx.stats.zombie_writes_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = p, error = %f, "compactor lets go of a partition claimed by another instance");
                self.to_recover.remove(&p);
                self.full_listing.remove(&p);
                self.plans.retain(|plan| plan.partition() != p);
                return Ok(());
            }
            Err(err) => err,
        };
        if let WorkError::Refused(why) = &err {
            metrics::counter!(m::ZOMBIE_WRITES_REFUSED, "kind" => "intent").increment(1);
            self.ctx.stats.zombie_writes_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reason = %why, "intent write refused; recovering the partition's intents first");
        }
        let e = err.retryable()?;
        metrics::counter!(m::COMPACTION_ERRORS).increment(1);
        self.backoff = self.ctx.config.upload.next_backoff(self.backoff);
        self.retry_at = Some(Instant::now() + self.backoff);
        tracing::warn!(error = %e, retry_in = ?self.backoff, "compactor will retry");
        Ok(())
    }

    /// Lists the table (all of it, or the Hive partitions touched since the last pass) and plans
    /// the merges of owned, partitioned files.
    async fn plan_pass(&mut self) -> Result<(), WorkError> {
        let cfg = &self.ctx.config.compactor;
        let topic = self.ctx.config.lake_topic();
        let owned: BTreeSet<i32> =
            self.ctx.owned_partitions().into_iter().filter(|p| !self.to_recover.contains(p)).collect();
        if owned.is_empty() {
            return Ok(());
        }
        self.ctx.stats.compaction_passes.fetch_add(1, Ordering::Relaxed);
        let mut touched = self.ctx.take_touched(owned.iter().copied());
        // Hive partitions where a table write failed lately: it may still land (a late write,
        // I9). Listed every pass, so what lands is repaired at the next one; the files whose
        // offsets it covers are not merged meanwhile: an input deleted by a merge would come
        // back if its late copy landed afterwards, and a late merged file would land beside a
        // merge of its own inputs.
        let watched = self.ctx.watched_for_late_writes(&owned, cfg.late_write_window);
        touched.extend(watched.keys().map(|(h, _)| h.clone()));
        let full = owned.iter().any(|p| self.full_listing.contains(p))
            || touched.len() > FULL_LISTING_ABOVE
            || self.last_full_listing.elapsed() >= FULL_LISTING_EVERY;
        if !full && touched.is_empty() {
            return Ok(());
        }
        let mut watermarks = BTreeMap::new();
        for &p in &owned {
            if let Some(w) = read_watermark(&self.ctx, &topic, p).await? {
                watermarks.insert(p, w);
            }
        }
        let ctx = self.ctx.clone();
        let mut planner = Planner {
            topic: &topic,
            owned: &owned,
            watermarks: &watermarks,
            watched: &watched,
            cfg,
            counts: &mut self.counts,
            plans: &mut self.plans,
            hive: None,
            groups: BTreeMap::new(),
            cut: false,
        };
        // Paged, each Hive partition planned as the listing leaves it (I4): a full listing of a
        // year's table is never held whole.
        if full {
            ctx.stats.compaction_full_listings.fetch_add(1, Ordering::Relaxed);
            self.last_full_listing = Instant::now();
            planner.counts.retain(|(_, p), _| !owned.contains(p));
            for p in &owned {
                self.full_listing.remove(p);
            }
            ctx.table.list_paged("year=", None, |page| planner.take(page)).await?;
        } else {
            planner.counts.retain(|(h, p), _| !(touched.contains(h) && owned.contains(p)));
            for hive in &touched {
                ctx.table.list_paged(&hive.dir(), None, |page| planner.take(page)).await?;
                if planner.cut {
                    break;
                }
            }
        }
        planner.plan();
        if planner.cut {
            // The next pass lists everything again, and the touched directories this one may
            // not have reached stay touched for the pass after that chain.
            self.full_listing.extend(owned.iter().copied());
            for &p in &owned {
                self.ctx.touch(p, touched.iter().cloned());
            }
        }
        self.set_gauges();
        if !self.plans.is_empty() {
            tracing::debug!(merges = self.plans.len(), full, touched = touched.len(), "compaction pass planned");
        }
        Ok(())
    }

    /// The lake gauges, from the counts of this instance's partitions.
    fn set_gauges(&self) {
        let total = self.counts.values().fold(FileCounts::default(), |a, c| FileCounts {
            files: a.files + c.files,
            small: a.small + c.small,
            bytes: a.bytes + c.bytes,
        });
        metrics::gauge!(m::LAKE_FILES, "table" => TABLE).set(total.files as f64);
        metrics::gauge!(m::LAKE_SMALL_FILES, "table" => TABLE).set(total.small as f64);
        metrics::gauge!(m::LAKE_BYTES, "table" => TABLE).set(total.bytes as f64);
    }

    async fn merge(&mut self, plan: &MergePlan) -> Result<(), WorkError> {
        let p = plan.partition();
        if !self.ctx.owns(p) || self.to_recover.contains(&p) {
            return Ok(());
        }
        // I9: nothing of a partition another instance has claimed is written.
        self.ctx.check_fence(p).await?;
        let started = Instant::now();
        let topic = &self.ctx.config.lake_topic();
        let output_key = plan.output_key();
        let intent_key = table::intent_key(topic, &plan.hive, &plan.output_name());
        let intent = CompactionIntent {
            output: output_key.clone(),
            inputs: plan.inputs.iter().map(|i| i.1.clone()).collect(),
            created_at: chrono::Utc::now().to_rfc3339(),
        };
        let body = bytes::Bytes::from(serde_json::to_vec_pretty(&intent).expect("an intent serializes"));
        if self.ctx.conditional_writes.load(Ordering::Relaxed) {
            // An intent of this name exists: another writer's merge, or one of ours interrupted.
            // Recover the partition's intents before planning again (the caller does).
            let pre = Precondition::Absent;
            let how = Write::Conditional("application/json", &pre);
            self.ctx.faults.late_write(WriteKind::Intent, &self.ctx.table, &intent_key, &body, how)?;
            if self.ctx.table.put_conditional(&intent_key, body, "application/json", &pre).await? == CondPut::Refused {
                return Err(WorkError::Refused(format!("the intent {intent_key} exists already")));
            }
        } else {
            let how = Write::Plain("application/json");
            self.ctx.faults.late_write(WriteKind::Intent, &self.ctx.table, &intent_key, &body, how)?;
            self.ctx.table.put(&intent_key, body, "application/json").await?;
        }
        self.ctx.faults.check(FaultPoint::CompactorAfterIntent)?;

        let written = if plan.repair {
            self.merge_in_memory(plan, &output_key).await?
        } else {
            self.merge_streaming(plan, &output_key).await?
        };
        let Some((rows, after)) = written else {
            // An input was gone (a stale listing) or poisoned (quarantined and rebuilt): plan again.
            self.ctx.table.delete(&intent_key).await?;
            self.ctx.touch(p, [plan.hive.clone()]);
            return Ok(());
        };
        let inputs = plan.inputs.len();
        self.ctx.faults.check(FaultPoint::CompactorAfterOutput)?;
        self.ctx.check_fence(p).await?;

        for (i, (_, key, _)) in plan.inputs.iter().enumerate() {
            if *key == output_key {
                // plan_group never plans this; a merge never deletes its own output (I9).
                continue;
            }
            self.ctx.check_fence(p).await?;
            self.ctx.table.delete(key).await?;
            if i == 0 {
                self.ctx.faults.check(FaultPoint::CompactorMidDeletes)?;
            }
        }
        self.ctx.table.delete(&intent_key).await?;
        if plan.repair {
            // As after a drop of covered files: list this Hive partition again next pass.
            self.ctx.touch(p, [plan.hive.clone()]);
        }

        let before = plan.input_bytes();
        if let Some(count) = self.counts.get_mut(&(plan.hive.clone(), p)) {
            let small_bytes = self.ctx.config.compactor.small_file_bytes;
            count.files = count.files.saturating_sub(inputs as u64 - 1);
            count.small = count.small.saturating_sub(inputs as u64) + u64::from(after < small_bytes);
            count.bytes = count.bytes.saturating_sub(before) + after;
        }
        self.set_gauges();
        let s = &self.ctx.stats;
        s.compactions.fetch_add(1, Ordering::Relaxed);
        s.compacted_files.fetch_add(inputs as u64, Ordering::Relaxed);
        s.compaction_bytes_before.fetch_add(before, Ordering::Relaxed);
        s.compaction_bytes_after.fetch_add(after, Ordering::Relaxed);
        metrics::counter!(m::COMPACTIONS).increment(1);
        metrics::counter!(m::COMPACTION_INPUT_FILES).increment(inputs as u64);
        metrics::counter!(m::COMPACTION_INPUT_BYTES).increment(before);
        metrics::counter!(m::COMPACTION_OUTPUT_BYTES).increment(after);
        tracing::debug!(partition = p, output = %output_key, inputs, rows, before, after, elapsed = ?started.elapsed(), "merged");
        Ok(())
    }

    /// Deletes files whose range `keep` covers, once their rows are checked to be in it (I9): the
    /// repair of overlapping table files when one covers the others. A file holding a row that
    /// `keep` lacks (at an offset, or another transaction at the same offset) is left in place
    /// and reported: its rows are not the ones `keep` holds, so neither copy is deleted.
    async fn drop_redundant(
        &mut self,
        hive: &HivePartition,
        keep: &TableFile,
        redundant: &[TableFile],
    ) -> Result<(), WorkError> {
        let p = keep.0.partition;
        if !self.ctx.owns(p) || self.to_recover.contains(&p) {
            return Ok(());
        }
        self.ctx.check_fence(p).await?;
        let Some(kept) = self.ctx.table.get_opt(&keep.1).await? else {
            tracing::warn!(key = %keep.1, "table file to keep is gone; replanning");
            return Ok(());
        };
        let mut bodies = Vec::new();
        for r in redundant {
            if let Some(b) = self.ctx.table.get_opt(&r.1).await? {
                bodies.push((r.1.clone(), b));
            }
        }
        let decoded = tokio::task::spawn_blocking({
            let kept = kept.clone();
            move || parquet::decode(kept)
        })
        .await
        .map_err(|e| WorkError::Other(format!("compactor task failed: {e}")))?;
        let kept = match decoded {
            Ok(k) => k,
            Err(e) => {
                self.poisoned_table_file(hive, &keep.0, &keep.1, kept, e.to_string()).await?;
                self.ctx.touch(p, [hive.clone()]);
                return Ok(());
            }
        };
        // Per file: its rows, all in `keep`; or why not.
        type Verdicts = Vec<(String, Result<usize, String>)>;
        let checked = tokio::task::spawn_blocking(move || -> Result<Verdicts, String> {
            // Compared canonical: a file of a version that stored ids as sent (upper case,
            // braced) holds the same transactions as the canonical one that covers it.
            let ids = |b: &arrow_array::RecordBatch| -> std::collections::HashMap<i64, String> {
                use arrow_array::cast::AsArray;
                let col = b.column(0).as_string::<i32>();
                let canonical = |id: &str| {
                    uuid::Uuid::parse_str(id).map_or_else(|_| id.to_string(), |u| u.hyphenated().to_string())
                };
                table::offsets(b).iter().enumerate().map(|(i, &o)| (o, canonical(col.value(i)))).collect()
            };
            let have = ids(&kept);
            Ok(bodies
                .into_iter()
                .map(|(key, body)| {
                    let verdict = parquet::decode(body).map_err(|e| format!("not readable: {e}")).and_then(|b| {
                        match ids(&b).into_iter().find(|(o, id)| have.get(o) != Some(id)) {
                            None => Ok(b.num_rows()),
                            Some((o, id)) => Err(format!("offset {o} ({id}) is not in the covering file")),
                        }
                    });
                    (key, verdict)
                })
                .collect())
        })
        .await
        .map_err(|e| WorkError::Other(format!("compactor task failed: {e}")))?
        .map_err(WorkError::Other)?;
        self.ctx.check_fence(p).await?;
        for (key, verdict) in checked {
            match verdict {
                Ok(rows) => {
                    self.ctx.check_fence(p).await?;
                    self.ctx.table.delete(&key).await?;
                    self.ctx.stats.overlaps_repaired.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::TABLE_OVERLAPS_REPAIRED).increment(1);
                    tracing::info!(partition = p, hive = %hive.dir(), key = %key, covered_by = %keep.1, rows, "deleted a table file whose rows another holds");
                }
                Err(why) => {
                    metrics::counter!(m::TABLE_OVERLAPS_UNRESOLVED).increment(1);
                    tracing::error!(partition = p, key = %key, covered_by = %keep.1, reason = %why, "overlapping table files hold different rows; left in place, check the topic's history (trstream audit)");
                }
            }
        }
        // The group's files changed: the next pass lists this Hive partition again, to merge
        // what the repair left (between full listings it lists only touched Hive partitions).
        self.ctx.touch(p, [hive.clone()]);
        Ok(())
    }

    /// The repair of overlapping inputs (I9): all of them read, each offset kept once, written
    /// in one PUT. Overlap clusters are a few files (a late write, a zombie's), so holding them
    /// is bounded in practice; plain merges stream ([`CompactorState::merge_streaming`]).
    /// `None`: an input was gone or poisoned.
    async fn merge_in_memory(&self, plan: &MergePlan, output_key: &str) -> Result<Option<(usize, u64)>, WorkError> {
        let p = plan.partition();
        let mut bodies = Vec::with_capacity(plan.inputs.len());
        for (_, key, _) in &plan.inputs {
            match self.ctx.table.get_opt(key).await? {
                Some(b) => bodies.push(b),
                None => {
                    // The listing is stale (an earlier merge's recovery took it): drop the plan.
                    tracing::warn!(key = %key, "compaction input is gone; abandoning this merge");
                    return Ok(None);
                }
            }
        }
        // Decoded one by one: an input that cannot be read is quarantined and rebuilt (I10).
        let decoded = tokio::task::spawn_blocking(move || {
            bodies.into_iter().map(|b| (b.clone(), parquet::decode(b))).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| WorkError::Other(format!("compactor task failed: {e}")))?;
        let mut batches = Vec::with_capacity(decoded.len());
        let mut poisoned = false;
        for ((body, res), (name, key, _)) in decoded.into_iter().zip(&plan.inputs) {
            match res {
                Ok(b) => batches.push(b),
                Err(e) => {
                    self.poisoned_table_file(&plan.hive, name, key, body, e.to_string()).await?;
                    poisoned = true;
                }
            }
        }
        if poisoned {
            return Ok(None);
        }
        let (level, rg) = (self.ctx.config.parquet.zstd_level, self.ctx.config.parquet.row_group_rows);
        let (name, inputs) = (plan.output_name(), plan.inputs.len());
        let merged = tokio::task::spawn_blocking(move || -> Result<(usize, Vec<u8>), String> {
            // Under the union of the inputs' schemas: files of older and newer versions merge.
            let batch =
                parquet::concat_union(&batches).map_err(|e| format!("concatenating the inputs of {name}: {e}"))?;
            // Overlapping inputs (I9): each offset once, in offset order.
            let batch = table::keep_each_offset_once(&batch).map_err(|e| format!("deduplicating {name}: {e}"))?;
            let mut meta = parquet::source_metadata(&name, batch.num_rows());
            meta.push(::parquet::file::metadata::KeyValue::new("trstream.compacted_from".into(), inputs.to_string()));
            let bytes = parquet::encode_with(&batch, meta, level, rg).map_err(|e| format!("encoding {name}: {e}"))?;
            Ok((batch.num_rows(), bytes))
        })
        .await
        .map_err(|e| WorkError::Other(format!("compactor task failed: {e}")))?
        .map_err(WorkError::Other)?;
        let (rows, bytes) = merged;
        let after = bytes.len() as u64;
        // I9: checked again after the reads and the merge, which a stall may have held up past
        // the lease, and again before the deletes.
        self.ctx.check_fence(p).await?;
        let bytes = bytes::Bytes::from(bytes);
        let put = match self.ctx.faults.late_write(
            WriteKind::Merged,
            &self.ctx.table,
            output_key,
            &bytes,
            Write::Plain(PARQUET),
        ) {
            Ok(()) => self.ctx.table.put(output_key, bytes, PARQUET).await,
            Err(e) => Err(e),
        };
        if let Err(e) = put {
            // It may land later, beside its inputs: the Hive partition is watched for that.
            self.ctx.table_write_failed(p, plan.hive.clone(), &plan.output_name());
            return Err(e.into());
        }
        Ok(Some((rows, after)))
    }

    /// A plain merge (I4), streamed: the inputs' footers give the union of their schemas, then
    /// each input is read whole (one at a time: they are small files), decoded a batch at a
    /// time and written into the output, whose bytes go to the store as parts of a multipart
    /// upload as they are encoded. The peak is one input, one row group being encoded and one
    /// part, whatever `compactor.target_file_bytes`; one `s3.request_timeout` bounds a part, not
    /// the whole output. The object appears whole at the end, or not at all. `None`: an input was
    /// gone or poisoned.
    async fn merge_streaming(&self, plan: &MergePlan, output_key: &str) -> Result<Option<(usize, u64)>, WorkError> {
        let p = plan.partition();
        let mut schemas = Vec::with_capacity(plan.inputs.len());
        for (name, key, size) in &plan.inputs {
            match self.ctx.table.parquet_schema(key, *size).await? {
                Some(Ok(schema)) => schemas.push(schema),
                Some(Err(why)) => {
                    if let Some(body) = self.ctx.table.get_opt(key).await? {
                        self.poisoned_table_file(&plan.hive, name, key, body, why).await?;
                    }
                    return Ok(None);
                }
                None => {
                    tracing::warn!(key = %key, "compaction input is gone; abandoning this merge");
                    return Ok(None);
                }
            }
        }
        // An input with a known column of another type is poison (like one that does not
        // decode): quarantined and rebuilt, then planned again.
        for ((name, key, _), schema) in plan.inputs.iter().zip(&schemas) {
            if let Err(why) = parquet::union_schema([schema])
                && let Some(body) = self.ctx.table.get_opt(key).await?
            {
                self.poisoned_table_file(&plan.hive, name, key, body, why.to_string()).await?;
                return Ok(None);
            }
        }
        let union = match parquet::union_schema(&schemas) {
            Ok(u) => u,
            Err(e) => {
                // Two inputs disagree on a column's type: neither is poison on its own; merge
                // nothing of this group until an operator looks (the audit still reads both).
                tracing::error!(partition = p, hive = %plan.hive.dir(), error = %e, "compaction inputs of incompatible schemas; not merged");
                return Ok(None);
            }
        };
        let (level, rg) = (self.ctx.config.parquet.zstd_level, self.ctx.config.parquet.row_group_rows);
        let backoff = self.ctx.config.upload.retry_initial_backoff;
        let mut writer = parquet::StreamWriter::new(union, level, rg)
            .map_err(|e| WorkError::Other(format!("starting the output of {output_key}: {e}")))?;
        let mut upload = self.ctx.table.start_multipart(output_key, PARQUET).await?;
        let mut pending: Vec<u8> = Vec::new();
        for (name, key, _) in &plan.inputs {
            let body = match self.ctx.table.get_opt(key).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    tracing::warn!(key = %key, "compaction input is gone; abandoning this merge");
                    upload.abort().await;
                    return Ok(None);
                }
                Err(e) => {
                    upload.abort().await;
                    return Err(e.into());
                }
            };
            let (w, res) = tokio::task::spawn_blocking({
                let body = body.clone();
                move || {
                    let res = writer.append_file(body);
                    (writer, res)
                }
            })
            .await
            .map_err(|e| WorkError::Other(format!("compactor task failed: {e}")))?;
            writer = w;
            if let Err(e) = res {
                upload.abort().await;
                self.poisoned_table_file(&plan.hive, name, key, body, e.to_string()).await?;
                return Ok(None);
            }
            pending.extend(writer.take_bytes());
            if pending.len() >= PART_BYTES
                && let Err(e) = upload.part(std::mem::take(&mut pending).into(), backoff).await
            {
                upload.abort().await;
                return Err(e.into());
            }
        }
        let mut meta = parquet::source_metadata(&plan.output_name(), writer.rows());
        meta.push(::parquet::file::metadata::KeyValue::new(
            "trstream.compacted_from".into(),
            plan.inputs.len().to_string(),
        ));
        let rows = writer.rows();
        let tail = match tokio::task::spawn_blocking(move || writer.finish(meta)).await {
            Ok(Ok(tail)) => tail,
            Ok(Err(e)) => {
                upload.abort().await;
                return Err(WorkError::Other(format!("finishing {output_key}: {e}")));
            }
            Err(e) => {
                upload.abort().await;
                return Err(WorkError::Other(format!("compactor task failed: {e}")));
            }
        };
        pending.extend(tail);
        // I9: checked again after the reads and the merge, which a stall may have held up past
        // the lease, and again before the deletes.
        let last = async {
            upload.part(std::mem::take(&mut pending).into(), backoff).await?;
            self.ctx.check_fence(p).await.map_err(WorkError::from)?;
            Ok::<_, WorkError>(())
        }
        .await;
        if let Err(e) = last {
            upload.abort().await;
            return Err(e);
        }
        let after = upload.bytes();
        if let Err(e) = upload.complete().await {
            // It may land later (the store may complete it after the client gave up): watched.
            self.ctx.table_write_failed(p, plan.hive.clone(), &plan.output_name());
            return Err(e.into());
        }
        if self.ctx.faults.late_writes_possible(WriteKind::Merged) {
            // The test hook of late writes needs the bytes: taken back and landed later.
            let bytes = self.ctx.table.get(output_key).await?;
            if let Err(e) = self.ctx.faults.late_write(
                WriteKind::Merged,
                &self.ctx.table,
                output_key,
                &bytes,
                Write::Plain(PARQUET),
            ) {
                self.ctx.table.delete(output_key).await?;
                self.ctx.table_write_failed(p, plan.hive.clone(), &plan.output_name());
                return Err(e.into());
            }
        }
        Ok(Some((rows, after)))
    }

    /// A table file that did not decode: read once more (a transfer gone wrong reads right the
    /// second time), then quarantined and rebuilt from raw-data (I10).
    async fn poisoned_table_file(
        &self,
        hive: &HivePartition,
        name: &crate::lake::RawFileName,
        key: &str,
        body: bytes::Bytes,
        why: String,
    ) -> Result<(), WorkError> {
        let p = name.partition;
        let (again, why) = match quarantine::read_again(&self.ctx.table, key, &why, |b| {
            parquet::decode(b).map(drop).map_err(|e| e.to_string())
        })
        .await?
        {
            quarantine::Reread::Decodes(()) | quarantine::Reread::Gone => return Ok(()),
            quarantine::Reread::Poison { body, why } => (body, why),
        };
        self.ctx.check_fence(p).await?;
        let body = if again.is_empty() { body } else { again };
        // Copied aside first; the rebuild then writes over the same key, so the rows are never
        // absent from the table in between (a failure on the way leaves the poison in place, to
        // be found again). Only a rebuild with no rows at all deletes it.
        quarantine::set_aside(&self.ctx, &self.ctx.table, key, body, quarantine::Kind::Table, &why).await?;
        if rebuild_table_file(&self.ctx, hive, name).await? == 0 {
            self.ctx.check_fence(p).await?;
            self.ctx.table.delete(key).await?;
        }
        Ok(())
    }

    /// Completes or rolls back every intent of partition `p` (I6).
    async fn recover(&mut self, p: i32) -> Result<(), WorkError> {
        if !self.ctx.owns(p) {
            return Ok(());
        }
        self.ctx.check_fence(p).await?;
        let topic = &self.ctx.config.lake_topic();
        for key in self.ctx.table.list_keys(&table::intents_prefix(topic, p), None).await? {
            let Some(body) = self.ctx.table.get_opt(&key).await? else { continue };
            let intent: CompactionIntent = match serde_json::from_slice(&body) {
                Ok(i) => i,
                Err(e) => {
                    // Dropped aside (I10): if its merged file was written, it overlaps its inputs,
                    // which the repair of overlapping files resolves (I9); if not, nothing was
                    // deleted.
                    self.ctx.check_fence(p).await?;
                    let why = format!("not a compaction intent: {e}");
                    quarantine::quarantine(&self.ctx, &self.ctx.table, &key, body, quarantine::Kind::Intent, &why)
                        .await?;
                    continue;
                }
            };
            let outcome = if intent.inputs.contains(&intent.output) {
                // Never planned by this version; completing it would delete its own output and
                // rolling it back is always safe (an input is only deleted once the output exists).
                "rolled_back"
            } else if self.ctx.table.exists(&intent.output).await? {
                for input in &intent.inputs {
                    self.ctx.table.delete(input).await?;
                }
                "completed"
            } else {
                // Its merged file may still land (a late write, or the PUT of an owner that
                // stalled mid-merge): watched, so that it is repaired if it does.
                if let Some((hive, name)) = HivePartition::parse_key(&intent.output) {
                    self.ctx.table_write_failed(p, hive, &name);
                }
                "rolled_back"
            };
            self.ctx.table.delete(&key).await?;
            self.ctx.stats.intents_recovered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::COMPACTION_RECOVERED, "outcome" => outcome).increment(1);
            tracing::info!(partition = p, intent = %key, outcome, "recovered an interrupted compaction");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::{ObjectInfo, RawFileName};

    /// Two small files of Kafka partition 0 in each of `dirs` Hive partitions, listed in key order
    /// (as a store lists them), with two keys of an unpadded layout (another tool's) among them:
    /// not this version's, never merged.
    fn listing(dirs: usize) -> (Vec<ObjectInfo>, Vec<String>) {
        let mut keys = Vec::new();
        let mut hives = Vec::new();
        for i in 0..dirs {
            let hive = HivePartition {
                year: 2026,
                month: 1 + (i / 112) as u32,
                day: 1 + (i / 4 % 28) as u32,
                transaction_type: ["CARD", "REFUND", "TRANSFER", "WITHDRAWAL"][i % 4].into(),
            };
            for f in 0..2 {
                let first = (i * 10 + f * 5) as i64;
                let name = RawFileName { topic: "t".into(), partition: 0, first_offset: first, last_offset: first + 4 };
                keys.push(hive.file_key(&name));
            }
            hives.push(hive.dir());
        }
        for first in [1, 6] {
            let name = RawFileName { topic: "t".into(), partition: 0, first_offset: first, last_offset: first + 4 };
            keys.push(format!("year=2026/month=1/day=01/transaction_type=CARD/{}", name.file_name()));
        }
        keys.sort();
        (keys.into_iter().map(|key| ObjectInfo { key, size: 100 }).collect(), hives)
    }

    /// Feeds `objects` to a planner a page of 1,000 at a time, as `list_paged` would; returns
    /// the plans and whether the listing stopped.
    fn plan_listing(objects: &[ObjectInfo]) -> (VecDeque<TablePlan>, bool) {
        let cfg = crate::config::CompactorConfig { min_files: 2, ..Default::default() };
        let (owned, watermarks, watched) = (BTreeSet::from([0]), BTreeMap::from([(0, i64::MAX)]), BTreeMap::new());
        let (mut counts, mut plans) = (BTreeMap::new(), VecDeque::new());
        let mut planner = Planner {
            topic: "t",
            owned: &owned,
            watermarks: &watermarks,
            watched: &watched,
            cfg: &cfg,
            counts: &mut counts,
            plans: &mut plans,
            hive: None,
            groups: BTreeMap::new(),
            cut: false,
        };
        for page in objects.chunks(1000) {
            if planner.take(page.to_vec()).is_break() {
                break;
            }
        }
        planner.plan();
        let cut = planner.cut;
        (plans, cut)
    }

    #[test]
    fn a_pass_plans_a_bounded_number_of_merges_and_the_next_goes_on_from_there() {
        let (objects, dirs) = listing(1_300);
        let (first, cut) = plan_listing(&objects);
        assert_eq!(first.len(), MAX_PLANNED_MERGES, "one pass plans at most this many merges");
        assert!(cut, "the listing stopped");
        // The first pass's merges done: each of its directories holds one file, planning nothing.
        let dir_of = |key: &str| key[..=key.rfind('/').unwrap()].to_string();
        let merged: BTreeSet<String> = first
            .iter()
            .map(|plan| match plan {
                TablePlan::Merge(m) => m.hive.dir(),
                other => panic!("only merges here: {other:?}"),
            })
            .collect();
        let mut kept = BTreeSet::new();
        let after: Vec<ObjectInfo> = objects
            .iter()
            .filter(|o| !merged.contains(&dir_of(&o.key)) || kept.insert(dir_of(&o.key)))
            .cloned()
            .collect();
        let (second, again) = plan_listing(&after);
        assert!(!again, "the second pass lists to the end");
        let mut planned: Vec<String> = first
            .iter()
            .chain(&second)
            .map(|plan| match plan {
                TablePlan::Merge(m) => {
                    assert_eq!(m.inputs.len(), 2, "a whole directory's group, never part of one");
                    assert!(m.inputs.iter().all(|(_, key, _)| key.starts_with(&m.hive.dir())), "{:?}", m.inputs);
                    m.hive.dir()
                }
                other => panic!("only merges here: {other:?}"),
            })
            .collect();
        planned.sort();
        let mut all = dirs.clone();
        all.sort();
        assert_eq!(planned, all, "every directory planned once across the two passes");
    }
}

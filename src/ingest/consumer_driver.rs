//! ConsumerDriver: the one thread that polls the rdkafka consumer, routes records to the
//! PartitionWorker of their partition, and runs the rebalance protocol.
//!
//! It lives on a dedicated OS thread because librdkafka runs rebalance callbacks inside `poll`,
//! and a revoke must block until the revoked workers have drained (flushed, uploaded, committed)
//! before the partitions are given up. Being the only caller of `poll`, `seek`, `pause` and
//! `resume`, it also holds the invariants that need ordering against fetched data:
//! - I2: on assign, the recovery scan runs before the partition's first fetch, and the assign
//!   starts the partition right after the highest file already uploaded;
//! - I3: when a worker dies, its partition is paused and no record is routed to it until it has
//!   been sought back to the committed offset (librdkafka drops pre-seek records) and the scan
//!   has run again;
//! - I4: a partition whose budget is over its cap, or any partition while the total is over the
//!   total cap, is paused; it resumes once its worker has committed enough to fall below half.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorRef};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::context::{ClaimOutcome, PartitionBudget, PipelineCtx, kafka_base_config};
use crate::faults::Kind;
use crate::ingest::partition_worker::{PartitionWorker, PartitionWorkerArgs, PartitionWorkerMsg, RecordChunk, Redo};
use crate::ingest::txn::FlushTxn;
use crate::ingest::{Consumer, dlq, incarnation};
use crate::lake::{FenceError, RawFileName, quarantine};
use crate::metrics as m;

/// Records routed per poll round before the batches are handed to workers.
const MAX_BATCH: usize = 4096;

/// Commands from the IngestSupervisor.
pub enum DriverCmd {
    /// A worker died: recover its partition (seek back, rescan, respawn).
    WorkerDied { partition: i32, worker: ActorId },
    /// A worker found its partition claimed by another instance (I9): stop it for good here.
    Fenced { partition: i32, worker: ActorId },
    /// A worker saw its partition's offsets go back (the topic was re-created): stop it.
    Stopped { partition: i32, worker: ActorId, reason: String },
    /// Graceful shutdown: drain every worker within the deadline, then leave the group.
    Shutdown { deadline: Instant },
    /// Stop now without committing anything more (the supervisor itself is going away).
    Abort,
}

enum Slot {
    Ready {
        worker: ActorRef<PartitionWorkerMsg>,
        budget: Arc<PartitionBudget>,
        paused: bool,
        /// An early flush was requested and has not yet brought the budget down.
        flush_asked: bool,
    },
    /// Paused, waiting for the recovery scan and a new worker. `attempt` identifies the scan in
    /// flight, if any, so a late result for a slot since revoked or replaced is discarded.
    /// `claim`: the partition was just assigned and its claim is still to be written (the scan
    /// at assignment failed); otherwise the recovery only checks that the claim still holds.
    Recovering { next_try: Instant, backoff: Duration, attempt: Option<u64>, claim: bool },
    /// Another instance claimed the partition (I9): paused, nothing routed, nothing written,
    /// until the group revokes it (the rebalance that gave it to the other instance reaches
    /// this one) or assigns it here again.
    Fenced,
    /// The partition's log is not the one the lake and the group's offsets were made from (a
    /// re-created topic, another cluster): paused, nothing routed, written or committed, until
    /// it is revoked; an assignment checks again.
    Stopped,
}

/// The result of a recovery run off the driver thread.
struct RecoveryDone {
    partition: i32,
    attempt: u64,
    result: Result<Recovered, RecoveryFailure>,
}

/// Why a recovery did not make its partition ready.
enum RecoveryFailure {
    /// Worth trying again (the store or the broker is away).
    Failed(String),
    /// The partition is another instance's now (I9): do not try again.
    Fenced(String),
    /// The log is another incarnation's than the lake's (`incarnation::check`): do not try again.
    Stopped(String),
}

impl std::fmt::Display for RecoveryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryFailure::Failed(e) | RecoveryFailure::Fenced(e) | RecoveryFailure::Stopped(e) => f.write_str(e),
        }
    }
}

impl From<String> for RecoveryFailure {
    fn from(e: String) -> Self {
        RecoveryFailure::Failed(e)
    }
}

#[derive(Default)]
struct DriverState {
    slots: HashMap<i32, Slot>,
    pending: HashMap<i32, RecordChunk>,
}

/// A partition made ready by the recovery scan.
struct Recovered {
    /// Where to read from (`None`: nothing committed nor uploaded; the reset policy decides).
    start: Option<i64>,
    worker: ActorRef<PartitionWorkerMsg>,
    budget: Arc<PartitionBudget>,
}

/// The consumer's context: the driver's state, reachable from rebalance callbacks.
pub struct DriverContext {
    ctx: Arc<PipelineCtx>,
    rt: tokio::runtime::Handle,
    supervisor: ActorCell,
    consumer: OnceLock<Weak<Consumer>>,
    state: Mutex<DriverState>,
    recoveries: Mutex<(std::sync::mpsc::Sender<RecoveryDone>, Option<Receiver<RecoveryDone>>)>,
    attempts: std::sync::atomic::AtomicU64,
    /// Partitions whose consumer lag this instance last reported.
    lag_reported: Mutex<BTreeSet<i32>>,
}

impl ClientContext for DriverContext {
    /// librdkafka's statistics, every `kafka.lag_interval`: the consumer lag of each owned
    /// partition, as the log end (high watermark) minus the committed offset.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let owned: BTreeSet<i32> = self.state.lock().unwrap().slots.keys().copied().collect();
        let topic = statistics.topics.get(self.topic());
        let mut reported = self.lag_reported.lock().unwrap();
        for &p in &owned {
            let Some(part) = topic.and_then(|t| t.partitions.get(&p)) else { continue };
            if part.hi_offset < 0 {
                continue; // not fetched yet
            }
            // Nothing committed yet: everything from the log start is behind.
            let committed = if part.committed_offset >= 0 { part.committed_offset } else { part.lo_offset.max(0) };
            let lag = (part.hi_offset - committed).max(0);
            metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
            reported.insert(p);
        }
        let given_up: Vec<i32> = reported.iter().copied().filter(|p| !owned.contains(p)).collect();
        drop(reported);
        self.clear_lag(&given_up);
    }
}

impl ConsumerContext for DriverContext {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(base, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = base.assignment_lost();
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.on_revoke(&parts, lost);
                if let Err(e) = base.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment without committing");
                let parts: Vec<i32> = self.state.lock().unwrap().slots.keys().copied().collect();
                self.on_revoke(&parts, true);
                let _ = base.unassign();
            }
        }
    }
}

impl DriverContext {
    pub fn new(ctx: Arc<PipelineCtx>, rt: tokio::runtime::Handle, supervisor: ActorCell) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        DriverContext {
            ctx,
            rt,
            supervisor,
            consumer: OnceLock::new(),
            state: Mutex::new(DriverState::default()),
            recoveries: Mutex::new((tx, Some(rx))),
            attempts: std::sync::atomic::AtomicU64::new(0),
            lag_reported: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn set_consumer(&self, consumer: &Arc<Consumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn topic(&self) -> &str {
        &self.ctx.config.kafka.topic
    }

    /// True on a tokio worker thread, where blocking on the runtime would panic. Rebalance
    /// callbacks only run there if the consumer is dropped outside the driver thread.
    fn in_runtime() -> bool {
        tokio::runtime::Handle::try_current().is_ok()
    }

    fn on_assign(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?parts, "partitions assigned");
        // At-least-once: one request for the whole assignment. Exactly-once: each recovery reads
        // its own, after starting the partition's transactional producer (see `recovery`).
        let committed =
            if self.ctx.config.kafka.exactly_once { Ok(HashMap::new()) } else { self.committed(base, &parts) };
        // The scans run concurrently, so a slow store costs one request timeout, not one per
        // partition, before the assignment is handed back to librdkafka.
        let results: Vec<(i32, Result<Recovered, RecoveryFailure>)> = match (&committed, self.consumer()) {
            (Ok(committed), Some(consumer)) => self.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for &p in &parts {
                    let read = committed.get(&p).copied();
                    let job = self.recovery(p, read, consumer.clone(), true);
                    set.spawn(async move { (p, job.await) });
                }
                let mut out = Vec::new();
                while let Some(r) = set.join_next().await {
                    out.extend(r.ok());
                }
                out
            }),
            (Err(e), _) => parts.iter().map(|&p| (p, Err(e.clone().into()))).collect(),
            (_, None) => parts.iter().map(|&p| (p, Err("consumer is gone".to_string().into()))).collect(),
        };
        let mut not_ready: Vec<i32> = parts.clone();
        let mut stopped = Vec::new();
        for (p, result) in results {
            match result {
                Ok(Recovered { start, worker, budget }) => {
                    let _ = worker.cast(PartitionWorkerMsg::Start);
                    let slot = Slot::Ready { worker, budget, paused: false, flush_asked: false };
                    self.state.lock().unwrap().slots.insert(p, slot);
                    not_ready.retain(|x| *x != p);
                    if let Some(offset) = start {
                        let _ = tpl.set_partition_offset(self.topic(), p, Offset::Offset(offset));
                    }
                }
                Err(RecoveryFailure::Stopped(e)) => {
                    self.state.lock().unwrap().slots.insert(p, Slot::Stopped);
                    stopped.push((p, e));
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "recovery scan failed at assignment; partition paused until it succeeds");
                }
            }
        }
        for (p, e) in stopped {
            stop_partition(self, p, e);
        }
        for &p in &not_ready {
            if matches!(self.state.lock().unwrap().slots.get(&p), Some(Slot::Stopped)) {
                continue;
            }
            let slot = Slot::Recovering {
                next_try: Instant::now(),
                backoff: Duration::from_millis(200),
                attempt: None,
                claim: true,
            };
            self.state.lock().unwrap().slots.insert(p, slot);
        }
        // The partitioner and compactor take the partitions on once their claims are written
        // (I9): their fence checks pass from the start.
        self.ctx.assign_partitions(&parts);
        if let Err(e) = base.assign(tpl) {
            tracing::error!(error = %e, "assign failed");
        }
        // librdkafka keeps a partition's pause across a revoke and a new assign: a partition
        // paused here before (its worker had died, or it was over its memory cap) and assigned
        // again would stay paused for good. The ready ones are read from their start now.
        let ready: Vec<i32> = parts.iter().copied().filter(|p| !not_ready.contains(p)).collect();
        if !ready.is_empty()
            && let Err(e) = base.resume(&self.tpl(&ready))
        {
            tracing::warn!(error = %e, ?ready, "resume of assigned partitions failed");
        }
        if !not_ready.is_empty() {
            // Before any poll returns a record of theirs: the start offset is not known yet.
            let _ = base.pause(&self.tpl(&not_ready));
        }
        self.ctx.health.consuming.store(true, Ordering::Relaxed);
        metrics::gauge!(m::PARTITIONS_ASSIGNED).set(self.state.lock().unwrap().slots.len() as f64);
    }

    /// A partition given up is its new owner's to report: its lag here drops to 0, so that the
    /// sum over replicas counts each partition once.
    fn clear_lag(&self, parts: &[i32]) {
        let mut reported = self.lag_reported.lock().unwrap();
        for p in parts {
            if reported.remove(p) {
                metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(0.0);
            }
        }
    }

    fn on_revoke(&self, parts: &[i32], lost: bool) {
        tracing::info!(?parts, lost, "partitions revoked");
        self.clear_lag(parts);
        self.ctx.health.clear_stopped(parts);
        // The drains and the table actors' last units write what they write only if the claim
        // still holds in the store now (I9).
        self.ctx.expire_leases(parts);
        let workers = take_workers(self, Some(parts), !lost);
        if Self::in_runtime() {
            // Cannot wait here (the consumer is being dropped on the runtime): let go at once.
            self.ctx.disown(parts);
            kill_all(self, workers);
        } else if lost {
            // Someone else may own the partitions now: commit nothing more.
            kill_all(self, workers);
            self.rt.block_on(self.ctx.release_partitions(parts));
        } else {
            // The partitioner and compactor let go while the workers drain, both before the
            // revoke returns, so the next owner is the only writer (I5). The drains run
            // concurrently: a revoke must finish within the session timeout, not one per partition.
            let (ctx, owned) = (self.ctx.clone(), parts.to_vec());
            let release = self.rt.spawn(async move { ctx.release_partitions(&owned).await });
            drain_all(self, workers, self.ctx.config.shutdown.drain_timeout);
            let _ = self.rt.block_on(release);
        }
        metrics::gauge!(m::PARTITIONS_ASSIGNED).set(self.state.lock().unwrap().slots.len() as f64);
    }

    fn tpl(&self, parts: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &p in parts {
            tpl.add_partition(self.topic(), p);
        }
        tpl
    }

    /// Committed next-offsets of `parts` (`None` inside: nothing committed yet).
    fn committed(&self, base: &BaseConsumer<Self>, parts: &[i32]) -> Result<HashMap<i32, Option<i64>>, String> {
        let tpl = base
            .committed_offsets(self.tpl(parts), self.ctx.config.kafka.request_timeout)
            .map_err(|e| format!("fetching committed offsets failed: {e}"))?;
        Ok(tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
            .collect())
    }

    fn consumer(&self) -> Option<Arc<Consumer>> {
        self.consumer.get().and_then(Weak::upgrade)
    }

    /// The recovery scan of I2 and the spawn of a fresh worker, as a future that does not borrow
    /// the driver (it runs on the runtime, concurrently or off the driver thread). Resolves to
    /// the offset the partition must be read from (`None`: nothing committed and nothing uploaded;
    /// the reset policy decides) and the new worker.
    fn recovery(
        &self,
        p: i32,
        committed: Option<Option<i64>>,
        consumer: Arc<Consumer>,
        claim: bool,
    ) -> impl std::future::Future<Output = Result<Recovered, RecoveryFailure>> + Send + 'static {
        recovery(self.ctx.clone(), self.supervisor.clone(), p, committed, consumer, claim)
    }
}

/// See [`DriverContext::recovery`]. `committed` is the partition's committed offset if the caller
/// has read it already (`Some(None)`: nothing committed); otherwise the recovery reads it.
async fn recovery(
    ctx: Arc<PipelineCtx>,
    supervisor: ActorCell,
    p: i32,
    committed: Option<Option<i64>>,
    consumer: Arc<Consumer>,
    claim: bool,
) -> Result<Recovered, RecoveryFailure> {
    let cfg = &ctx.config;
    // I9: an assignment claims the partition (every earlier owner's next write is refused); a
    // recovery after a worker died only checks that the claim still holds, so that an instance
    // that lost the partition while it stalled never takes it back.
    // The log as the broker has it now (issue 11, part 3): the claim records its topic id.
    let (c, topic, timeout) = (consumer.clone(), cfg.kafka.topic.clone(), cfg.kafka.request_timeout);
    let now = tokio::task::spawn_blocking(move || incarnation::log_now(&c, &topic, p, timeout))
        .await
        .map_err(|e| format!("log-end task failed: {e}"))??;
    let stopped =
        |recorded| RecoveryFailure::Stopped(incarnation::other_topic_id(&cfg.kafka.topic, p, recorded, now).0);
    let fence = if claim {
        match ctx.claim(p, now.topic_id).await {
            Ok(ClaimOutcome::Claimed(_)) => Ok(()),
            // The partition's last owner read it under another topic id.
            Ok(ClaimOutcome::OtherIncarnation(recorded)) => return Err(stopped(recorded)),
            Err(e) => Err(FenceError::from(e)),
        }
    } else {
        // This instance claimed it under another topic id: re-created while it ran.
        if let (Some(Some(mine)), Some(id)) = (ctx.claimed_topic_id(p), now.topic_id)
            && mine != id
        {
            return Err(stopped(mine));
        }
        ctx.check_fence(p).await
    };
    match fence {
        Ok(()) => {}
        Err(e @ (FenceError::Fenced(_) | FenceError::Unclaimed(_))) => {
            return Err(RecoveryFailure::Fenced(format!("recovery of partition {p}: {e}")));
        }
        Err(FenceError::Store(e)) => {
            ctx.health.s3_ok.store(false, Ordering::Relaxed);
            return Err(RecoveryFailure::Failed(format!("claim of partition {p}: {e}")));
        }
    }
    // Exactly-once (issue 11, part 4): the partition's transactional producer starts before the
    // committed offset is read, and the offset is read only then. Starting it aborts the
    // transaction an earlier owner left open and fences that owner, so the offset read after it
    // is final; read before it, `read_committed` would wait until the broker timed that
    // transaction out.
    let (txn, committed) = if cfg.kafka.exactly_once {
        let (c, ctx2) = (consumer.clone(), ctx.clone());
        let started = tokio::task::spawn_blocking(move || {
            let txn = FlushTxn::start(&kafka_base_config(&ctx2.config), &ctx2.dlq, &ctx2.config, p)
                .map_err(|e| e.to_string())?;
            let committed = committed_offset(&c, &ctx2.config.kafka.topic, p, ctx2.config.kafka.request_timeout)
                .map_err(|e| format!("fetching the committed offset of partition {p}: {e}"))?;
            Ok::<_, String>((txn, committed))
        })
        .await
        .map_err(|e| format!("transactional producer task failed: {e}"))??;
        (Some(Arc::new(started.0)), started.1)
    } else if let Some(committed) = committed {
        (None, committed)
    } else {
        let (c, topic, timeout) = (consumer.clone(), cfg.kafka.topic.clone(), cfg.kafka.request_timeout);
        let committed = tokio::task::spawn_blocking(move || committed_offset(&c, &topic, p, timeout))
            .await
            .map_err(|e| format!("committed-offset task failed: {e}"))?
            .map_err(|e| format!("fetching the committed offset of partition {p}: {e}"))?;
        (None, committed)
    };
    // The group's commit, as this instance knows it, from now on: the partitioner quarantines a
    // raw file only once the commit has passed it, and a partition that receives nothing after
    // a restart would otherwise never tell it so.
    if let Some(c) = committed {
        ctx.stats.commit_read(p, c);
    }
    let latest: Option<(RawFileName, u64)> =
        ctx.store.latest_raw_file(&cfg.s3.raw_prefix, &cfg.lake_topic(), p, committed).await.map_err(|e| {
            ctx.health.s3_ok.store(false, Ordering::Relaxed);
            format!("recovery scan of partition {p}: {e}")
        })?;
    // The lake's offsets and the group's must be of this log (issue 11, part 3).
    let recorded_id = match &latest {
        Some((f, size)) => {
            let key = f.key(&cfg.s3.raw_prefix);
            match ctx.store.parquet_footer_value(&key, *size, incarnation::META_TOPIC_ID).await {
                Ok(id) => id.and_then(|s| uuid::Uuid::parse_str(&s).ok()),
                Err(e) if e.is_retryable() => {
                    ctx.health.s3_ok.store(false, Ordering::Relaxed);
                    return Err(format!("reading the topic id of {key}: {e}").into());
                }
                Err(e) => {
                    // Unreadable: the decode below (of a file to adopt) or the partitioner (of a
                    // committed one) judges it; the log-end check still applies.
                    tracing::warn!(partition = p, file = %key, error = %e, "cannot read the topic id a raw file records");
                    None
                }
            }
        }
        None => None,
    };
    ctx.health.s3_ok.store(true, Ordering::Relaxed);
    let found = latest.as_ref().map(|(f, _)| (f, recorded_id));
    if incarnation::check(&cfg.kafka.topic, p, now, committed, found).is_err() {
        // The log end was read before the commit and the scan: a stall in between (another
        // owner committing meanwhile) makes a live log look shorter than its commit. The log
        // end only grows within one log, so a reading taken after them decides.
        let (c, topic, timeout) = (consumer.clone(), cfg.kafka.topic.clone(), cfg.kafka.request_timeout);
        let again = tokio::task::spawn_blocking(move || incarnation::log_now(&c, &topic, p, timeout))
            .await
            .map_err(|e| format!("log-end task failed: {e}"))??;
        incarnation::check(&cfg.kafka.topic, p, again, committed, found).map_err(|e| RecoveryFailure::Stopped(e.0))?;
    }
    // A raw file past the commit is adopted: its offsets are committed on the promise that its
    // rows reach the table. One that does not decode, in its footer or in any page, never is: it
    // is moved aside (I10) and the recovery runs again without it, so its records are read again
    // from the log and written anew. (After the log check: a lake of another log is not touched.)
    // Files whose last offset is at or past the commit were uploaded but not committed: adopt.
    let adopted = latest.filter(|(f, _)| committed.is_none_or(|c| f.last_offset >= c));
    if let Some((f, _)) = &adopted {
        quarantine_if_undecodable(&ctx, f).await?;
    }
    ctx.faults.recovery_gate(p).await;
    // An adopted file that lists its dead letters had them in a transaction that never committed:
    // they are sent again, its offsets read again from the commit (or the file's first offset).
    let redo = match &adopted {
        Some((f, size)) => dead_letters_of(&ctx, f, *size).await?.map(|dead| Redo::new(f.clone(), dead)),
        None => None,
    };
    let adopted = adopted.map(|(f, _)| f);
    let start = match (&adopted, &redo) {
        (Some(f), Some(_)) => Some(committed.map_or(f.first_offset, |c| c.max(f.first_offset))),
        (Some(f), None) => Some(f.last_offset + 1),
        (None, _) => committed,
    };
    let budget = Arc::new(PartitionBudget::new(ctx.clone()));
    let name = format!("{}/partition-{}-{p}", ctx.instance, cfg.kafka.topic);
    let args = PartitionWorkerArgs {
        partition: p,
        start_offset: start,
        topic_id: now.topic_id,
        adopted,
        redo,
        txn,
        ctx: ctx.clone(),
        consumer,
        budget: budget.clone(),
    };
    let (worker, _) = Actor::spawn_linked(Some(name), PartitionWorker, args, supervisor)
        .await
        .map_err(|e| RecoveryFailure::Failed(format!("spawning the worker of partition {p}: {e}")))?;
    tracing::info!(partition = p, start_offset = ?start, ?committed, "partition ready");
    Ok(Recovered { start, worker, budget })
}

/// Reads the raw file `key` whole and decodes it; one that does not decode (twice) is
/// quarantined and the recovery fails, to run again without it. A file gone meanwhile fails the
/// recovery too: the scan that listed it is stale (another instance may have moved it aside), and
/// adopting what is not there would commit offsets whose rows exist nowhere.
async fn quarantine_if_undecodable(ctx: &Arc<PipelineCtx>, f: &RawFileName) -> Result<(), RecoveryFailure> {
    let (key, p) = (&f.key(&ctx.config.s3.raw_prefix), f.partition);
    let gone = || {
        RecoveryFailure::Failed(format!("raw file {key} vanished during the recovery of partition {p}; scanning again"))
    };
    // Held until the decoded file is dropped: a few files at a time in memory (I4).
    let _permit = ctx.recovery_decodes.acquire().await.map_err(|e| format!("recovery of partition {p}: {e}"))?;
    let body = ctx.store.get_opt(key).await.map_err(|e| {
        ctx.health.s3_ok.store(false, Ordering::Relaxed);
        format!("reading {key}: {e}")
    })?;
    let Some(body) = body else { return Err(gone()) };
    let name = f.clone();
    let decode = move |b| crate::lake::parquet::decode_raw(b, &name).map(drop).map_err(|e| e.to_string());
    let (body, why) = match quarantine::decode_twice(&ctx.store, key, body, decode).await {
        Ok(quarantine::Reread::Decodes(())) => return Ok(()),
        Ok(quarantine::Reread::Poison { body, why }) => (body, why),
        Ok(quarantine::Reread::Gone) => return Err(gone()),
        Err(e) => {
            ctx.health.s3_ok.store(false, Ordering::Relaxed);
            return Err(format!("reading {key} again: {e}").into());
        }
    };
    // The fence again (I9): the reads took a while, and a new owner may have adopted the file.
    match ctx.check_fence(p).await {
        Ok(()) => {}
        Err(e @ (FenceError::Fenced(_) | FenceError::Unclaimed(_))) => {
            return Err(RecoveryFailure::Fenced(format!("recovery of partition {p}: {e}")));
        }
        Err(FenceError::Store(e)) => return Err(format!("fence check of partition {p}: {e}").into()),
    }
    let why = format!("uploaded, not committed, and not readable: {why}");
    quarantine::quarantine(ctx, &ctx.store, key, body, quarantine::Kind::Raw, &why)
        .await
        .map_err(|e| format!("quarantining {key}: {e}"))?;
    Err(format!("quarantined the unreadable raw file {key}; scanning partition {p} again").into())
}

/// The dead letters an adopted file's footer lists ([`crate::ingest::dlq::META_DEAD_LETTERS`]);
/// `None` for a file without the entry (its dead letters were acknowledged before its upload).
async fn dead_letters_of(
    ctx: &PipelineCtx,
    f: &RawFileName,
    size: u64,
) -> Result<Option<std::collections::BTreeMap<i64, crate::record::Rejection>>, RecoveryFailure> {
    let key = f.key(&ctx.config.s3.raw_prefix);
    match ctx.store.parquet_footer_value(&key, size, dlq::META_DEAD_LETTERS).await {
        Ok(None) => Ok(None),
        Ok(Some(v)) => match dlq::parse_dead_letter_notes(&v) {
            Ok(dead) => Ok(Some(dead)),
            Err(e) => {
                // Not a reason to stall the partition for ever: its rows are adopted as they are.
                tracing::error!(partition = f.partition, file = %key, error = %e,
                    "cannot read the dead letters an adopted file lists; they are not sent again");
                Ok(None)
            }
        },
        Err(e) if e.is_retryable() => {
            ctx.health.s3_ok.store(false, Ordering::Relaxed);
            Err(format!("reading the dead letters {key} lists: {e}").into())
        }
        Err(e) => {
            tracing::error!(partition = f.partition, file = %key, error = %e,
                "cannot read the footer of an adopted file; its dead letters are not sent again");
            Ok(None)
        }
    }
}

/// The committed next offset of partition `p` (`None`: nothing committed). Blocking.
fn committed_offset(consumer: &Consumer, topic: &str, p: i32, timeout: Duration) -> Result<Option<i64>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    consumer
        .committed_offsets(tpl, timeout)
        .map(|t| t.elements().first().and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
        .map_err(|e| e.to_string())
}

/// The driver loop; returns when shut down or aborted (`None`), or with the reason when the
/// consumer met a fatal error (librdkafka's word for one it cannot go on after: a static member
/// fenced by another with its `group.instance.id`, say), which no restart mends.
pub fn run(consumer: Arc<Consumer>, cmds: Receiver<DriverCmd>) -> Option<String> {
    let dc = consumer.context();
    let recoveries = dc.recoveries.lock().unwrap().1.take().expect("the driver loop runs once per consumer");
    let mut last_gauge = Instant::now();
    let mut pressure_since: Option<Instant> = None;
    let mut holding = false;
    loop {
        // Commands first: a dead worker's partition must stop being routed to at once.
        loop {
            match cmds.try_recv() {
                Ok(DriverCmd::WorkerDied { partition, worker }) => on_worker_died(&consumer, partition, worker),
                Ok(DriverCmd::Fenced { partition, worker }) => on_worker_fenced(&consumer, partition, worker),
                Ok(DriverCmd::Stopped { partition, worker, reason }) => {
                    on_worker_stopped(&consumer, partition, worker, reason)
                }
                Ok(DriverCmd::Shutdown { deadline }) => {
                    shutdown(&consumer, deadline);
                    return None;
                }
                Ok(DriverCmd::Abort) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    abort(&consumer);
                    return None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
            }
        }
        while let Ok(done) = recoveries.try_recv() {
            on_recovery_done(&consumer, done);
        }

        let mut routed = 0;
        let mut timeout = Duration::from_millis(100);
        if holding {
            // Over the total cap: flushes are under way; librdkafka's prefetch bound holds
            // memory meanwhile. Not polling is cheaper than pause/resume, whose resume waits up to
            // a second for librdkafka's broker thread to fetch again.
            std::thread::sleep(Duration::from_millis(2));
            routed = MAX_BATCH;
        }
        // Bytes polled this round, not yet counted in a budget: the round ends at the record that
        // crosses the total cap, not up to MAX_BATCH records later (I4). The first poll of a
        // round always happens: it also serves rebalances and statistics.
        let (cap, mut polled) = (dc.ctx.config.memory.total_max_buffered_bytes, 0);
        while routed < MAX_BATCH {
            if routed > 0 && dc.ctx.total_buffered.load(Ordering::Relaxed) + polled > cap {
                break;
            }
            match consumer.poll(timeout) {
                Some(Ok(msg)) => {
                    routed += 1;
                    polled += msg.payload_len()
                        + msg.key_len()
                        + std::mem::size_of::<crate::ingest::partition_worker::ChunkEntry>();
                    let mut st = dc.state.lock().unwrap();
                    if matches!(st.slots.get(&msg.partition()), Some(Slot::Ready { .. })) {
                        st.pending.entry(msg.partition()).or_default().push(
                            msg.offset(),
                            crate::record::broker_time_us(msg.timestamp().to_millis()),
                            msg.key(),
                            msg.payload(),
                        );
                    }
                }
                Some(Err(e)) => {
                    if let Some((code, why)) = consumer.client().fatal_error() {
                        let reason = format!("the Kafka consumer hit a fatal error ({code:?}): {why}");
                        tracing::error!("{reason}; nothing more is read or committed");
                        abort(&consumer);
                        // librdkafka's destroy of a client in a fatal state can block for good:
                        // not on this thread, which must report the failure.
                        std::thread::spawn(move || drop(consumer));
                        return Some(reason);
                    }
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        // Polled records not yet handed over are lost with the driver: the restarted ingest
        // subtree reads them again from the committed offsets.
        dc.ctx.faults.maybe_panic(Kind::ConsumerDriver, "routing");
        if dc.ctx.faults.take_fatal_consumer_error() {
            raise_fatal_error(&consumer);
        }
        dispatch(dc);
        holding = back_pressure(&consumer, &mut pressure_since);
        retry_recoveries(&consumer);
        if last_gauge.elapsed() >= Duration::from_secs(1) {
            last_gauge = Instant::now();
            let total = dc.ctx.total_buffered.load(Ordering::Relaxed);
            metrics::gauge!(m::BUFFERED_BYTES).set(total as f64);
            metrics::gauge!(m::BUFFERED_RECORDS).set(dc.ctx.total_buffered_records.load(Ordering::Relaxed) as f64);
        }
    }
}

fn dispatch(dc: &DriverContext) {
    let mut st = dc.state.lock().unwrap();
    let st = &mut *st;
    for (p, chunk) in st.pending.drain() {
        if let Some(Slot::Ready { worker, budget, .. }) = st.slots.get(&p) {
            hand_over(worker, budget, chunk);
        }
    }
    let total = dc.ctx.total_buffered.load(Ordering::Relaxed) as u64;
    dc.ctx.stats.max_buffered_bytes.fetch_max(total, Ordering::Relaxed);
    dc.ctx.stats.buffered_bytes.store(total, Ordering::Relaxed);
}

/// How long the total may stay over its cap, with polling held, before partitions are paused.
const HOLD_BEFORE_PAUSE: Duration = Duration::from_secs(1);

/// I4: bound memory, and never wait on `max_age` for it. Returns whether to hold off polling.
///
/// - A partition whose budget passes `partition_max_buffered_bytes` is paused.
/// - When the total passes `total_max_buffered_bytes`, the largest buffers are asked to flush
///   early (trigger `memory`) until what remains is under half the cap, and polling is held
///   (librdkafka's prefetch, `kafka.fetch_queue_kbytes`, is bounded on its own). Otherwise many
///   partitions each below its own flush size could sit at the cap until `flush.max_age`.
/// - If the total stays over the cap for [`HOLD_BEFORE_PAUSE`] (flushes cannot complete: S3 is
///   down), every partition is paused, so polling — and rebalances — go on.
/// - A paused partition resumes once it and the total are under half their caps.
fn back_pressure(consumer: &Consumer, pressure_since: &mut Option<Instant>) -> bool {
    let dc = consumer.context();
    let mem = &dc.ctx.config.memory;
    let total = dc.ctx.total_buffered.load(Ordering::Relaxed);
    let over_total = total > mem.total_max_buffered_bytes;
    if !over_total {
        *pressure_since = None;
    } else if pressure_since.is_none() {
        *pressure_since = Some(Instant::now());
    }
    let sustained = pressure_since.is_some_and(|t| t.elapsed() >= HOLD_BEFORE_PAUSE);
    let total_low = total <= mem.total_max_buffered_bytes / 2;
    let part_low = mem.partition_max_buffered_bytes / 2;
    let mut st = dc.state.lock().unwrap();
    let mut to_pause = Vec::new();
    let mut to_resume = Vec::new();
    let mut paused_count = 0;
    let mut asked_bytes = 0;
    let mut candidates: Vec<(usize, &ActorRef<PartitionWorkerMsg>, &mut bool)> = Vec::new();
    for (p, slot) in st.slots.iter_mut() {
        if let Slot::Ready { budget, paused, worker, flush_asked } = slot {
            let b = budget.buffered();
            if *flush_asked && b <= part_low.min(mem.total_max_buffered_bytes / 8) {
                *flush_asked = false;
            }
            if !*paused && (b > mem.partition_max_buffered_bytes || (over_total && sustained)) {
                *paused = true;
                to_pause.push(*p);
            } else if *paused && b <= part_low && total_low {
                *paused = false;
                to_resume.push(*p);
            }
            paused_count += usize::from(*paused);
            if *flush_asked {
                asked_bytes += b;
            } else if b > 0 {
                candidates.push((b, worker, flush_asked));
            }
        }
    }
    if (over_total || paused_count > 0) && !total_low {
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut remaining = total.saturating_sub(asked_bytes);
        for (b, worker, asked) in candidates {
            if remaining <= mem.total_max_buffered_bytes / 2 {
                break;
            }
            *asked = true;
            remaining = remaining.saturating_sub(b);
            let _ = worker.cast(PartitionWorkerMsg::FlushNow);
        }
    }
    drop(st);
    if !to_pause.is_empty() {
        tracing::debug!(partitions = ?to_pause, total, "pausing for back-pressure");
        dc.ctx.stats.pauses.fetch_add(to_pause.len() as u64, Ordering::Relaxed);
        if let Err(e) = consumer.pause(&dc.tpl(&to_pause)) {
            tracing::warn!(error = %e, "pause failed");
        }
    }
    if !to_resume.is_empty() {
        tracing::debug!(partitions = ?to_resume, total, "resuming");
        if let Err(e) = consumer.resume(&dc.tpl(&to_resume)) {
            tracing::warn!(error = %e, "resume failed");
        }
    }
    metrics::gauge!(m::PARTITIONS_PAUSED).set(paused_count as f64);
    over_total && !sustained
}

fn on_worker_died(consumer: &Consumer, p: i32, id: ActorId) {
    let dc = consumer.context();
    let mut st = dc.state.lock().unwrap();
    let matches = matches!(st.slots.get(&p), Some(Slot::Ready { worker, .. }) if worker.get_id() == id);
    if !matches {
        return; // already revoked or replaced
    }
    if let Some(Slot::Ready { budget, .. }) = st.slots.remove(&p) {
        budget.release_all();
    }
    st.pending.remove(&p);
    st.slots.insert(
        p,
        Slot::Recovering { next_try: Instant::now(), backoff: Duration::from_millis(100), attempt: None, claim: false },
    );
    drop(st);
    // Stop fetching at once; records already fetched are dropped by the routing above.
    if let Err(e) = consumer.pause(&dc.tpl(&[p])) {
        tracing::warn!(partition = p, error = %e, "pause of a failed partition failed");
    }
    tracing::warn!(partition = p, "partition worker died; seeking back to the committed offset");
}

/// A worker of `p` was refused a write because another instance claimed `p` (I9): the partition
/// stays paused and unrouted, and the partitioner and compactor let go of it, until the group's
/// rebalance reaches this instance.
fn on_worker_fenced(consumer: &Consumer, p: i32, id: ActorId) {
    if park_worker(consumer, p, id, Slot::Fenced) {
        fence_partition(consumer.context(), p, "its worker was refused a write");
    }
}

/// A worker's partition went back in its offsets: stopped like a failed incarnation check.
fn on_worker_stopped(consumer: &Consumer, p: i32, id: ActorId, reason: String) {
    if park_worker(consumer, p, id, Slot::Stopped) {
        stop_partition(consumer.context(), p, reason);
    }
}

/// Puts `p` in `parked` (Fenced or Stopped) if worker `id` is still its current one: its budget
/// released, what was fetched for it dropped, the partition paused. False for a stale report.
fn park_worker(consumer: &Consumer, p: i32, id: ActorId, parked: Slot) -> bool {
    let dc = consumer.context();
    let mut st = dc.state.lock().unwrap();
    if !matches!(st.slots.get(&p), Some(Slot::Ready { worker, .. }) if worker.get_id() == id) {
        return false;
    }
    if let Some(Slot::Ready { budget, .. }) = st.slots.remove(&p) {
        budget.release_all();
    }
    st.pending.remove(&p);
    st.slots.insert(p, parked);
    drop(st);
    if let Err(e) = consumer.pause(&dc.tpl(&[p])) {
        tracing::warn!(partition = p, error = %e, "pause of a fenced or stopped partition failed");
    }
    true
}

/// Reports a partition stopped because its log is not the lake's (`incarnation::check`): an
/// error in the log, `/readyz` and a metric. Its slot is `Stopped` already.
fn stop_partition(dc: &DriverContext, p: i32, reason: String) {
    metrics::counter!(m::PARTITIONS_STOPPED_TOTAL).increment(1);
    tracing::error!(partition = p, "{reason}");
    dc.ctx.health.set_stopped(p, reason);
}

fn fence_partition(dc: &DriverContext, p: i32, why: &str) {
    dc.ctx.disown(&[p]);
    dc.ctx.stats.fenced_partitions.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::PARTITIONS_FENCED).increment(1);
    tracing::error!(
        partition = p,
        reason = why,
        "another instance claimed this partition while this one held it (a stall past the session timeout?): nothing more is written for it here until it is assigned again"
    );
}

/// Starts a recovery, off this thread, for each `Recovering` partition that is due and has none
/// in flight: a store that hangs must not stall polling, nor the partitions that are fine.
fn retry_recoveries(consumer: &Arc<Consumer>) {
    let dc = consumer.context();
    let mut st = dc.state.lock().unwrap();
    for (&p, slot) in st.slots.iter_mut() {
        let Slot::Recovering { next_try, attempt, claim, .. } = slot else { continue };
        let claim = *claim;
        if attempt.is_some() || *next_try > Instant::now() {
            continue;
        }
        let id = dc.attempts.fetch_add(1, Ordering::Relaxed);
        *attempt = Some(id);
        let tx = dc.recoveries.lock().unwrap().0.clone();
        let (ctx, supervisor, consumer) = (dc.ctx.clone(), dc.supervisor.clone(), consumer.clone());
        dc.rt.spawn(async move {
            // A claim retried after its assignment was revoked would fence the new owner.
            // (The driver discards this attempt's result too; this keeps it from writing.)
            let result = if claim && !ctx.owns(p) {
                Err(format!("partition {p} was revoked before its claim could be retried").into())
            } else {
                recovery(ctx, supervisor, p, None, consumer, claim).await
            };
            let _ = tx.send(RecoveryDone { partition: p, attempt: id, result });
        });
    }
}

/// Installs a finished recovery: seek to the start (I3), mark ready, resume. A result for a slot
/// revoked or replaced meanwhile is discarded, and its worker stopped.
fn on_recovery_done(consumer: &Consumer, done: RecoveryDone) {
    let dc = consumer.context();
    let RecoveryDone { partition: p, attempt, result } = done;
    let current = matches!(dc.state.lock().unwrap().slots.get(&p), Some(Slot::Recovering { attempt: Some(a), .. }) if *a == attempt);
    if !current {
        // Revoked or replaced meanwhile: the worker was never started, so it committed nothing.
        dc.ctx.stats.stale_recoveries.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(r) => {
                r.worker.kill();
                tracing::info!(
                    partition = p,
                    "a recovery finished after its partition was revoked; its worker is stopped unstarted"
                );
            }
            Err(e) => tracing::info!(partition = p, error = %e, "a recovery failed after its partition was revoked"),
        }
        return;
    }
    let result = result.and_then(|Recovered { start, worker, budget }| {
        let target = match start {
            Some(o) => Offset::Offset(o),
            None if dc.ctx.config.kafka.auto_offset_reset == "latest" => Offset::End,
            None => Offset::Beginning,
        };
        match consumer.seek(dc.topic(), p, target, dc.ctx.config.kafka.request_timeout) {
            Ok(()) => Ok((worker, budget)),
            Err(e) => {
                worker.kill();
                Err(format!("seek of partition {p} to {target:?} failed: {e}").into())
            }
        }
    });
    let mut st = dc.state.lock().unwrap();
    let (backoff, claim) = match st.slots.get(&p) {
        Some(Slot::Recovering { backoff, claim, .. }) => (*backoff, *claim),
        _ => (Duration::from_millis(100), false),
    };
    match result {
        Ok((worker, budget)) => {
            let _ = worker.cast(PartitionWorkerMsg::Start);
            st.slots.insert(p, Slot::Ready { worker, budget, paused: false, flush_asked: false });
            drop(st);
            if let Err(e) = consumer.resume(&dc.tpl(&[p])) {
                tracing::warn!(partition = p, error = %e, "resume after recovery failed");
            }
        }
        Err(RecoveryFailure::Fenced(e)) => {
            st.slots.insert(p, Slot::Fenced);
            drop(st);
            fence_partition(dc, p, &e);
        }
        Err(RecoveryFailure::Stopped(e)) => {
            st.slots.insert(p, Slot::Stopped);
            drop(st);
            stop_partition(dc, p, e);
        }
        Err(RecoveryFailure::Failed(e)) => {
            tracing::warn!(partition = p, error = %e, retry_in = ?backoff, "partition recovery failed");
            let next = (backoff * 2).min(Duration::from_secs(10));
            let slot = Slot::Recovering { next_try: Instant::now() + backoff, backoff: next, attempt: None, claim };
            st.slots.insert(p, slot);
        }
    }
}

/// Routes a chunk to its worker, counting its bytes in the partition's budget (I4) until the
/// worker commits them. Every path that gives a worker records goes through here, so what a
/// worker releases was always acquired.
fn hand_over(worker: &ActorRef<PartitionWorkerMsg>, budget: &PartitionBudget, chunk: RecordChunk) {
    if chunk.is_empty() {
        return;
    }
    budget.acquire(chunk.accounted_bytes(), chunk.entries.len());
    let _ = worker.cast(PartitionWorkerMsg::Records(chunk));
}

type Workers = Vec<(i32, ActorRef<PartitionWorkerMsg>, Arc<PartitionBudget>)>;

/// Takes the workers of `parts` (all of them for `None`) out of the slots, with what was fetched
/// for them: handed over when `deliver`, dropped otherwise (nothing more may be committed).
fn take_workers(dc: &DriverContext, parts: Option<&[i32]>, deliver: bool) -> Workers {
    let mut st = dc.state.lock().unwrap();
    let list: Vec<i32> = parts.map_or_else(|| st.slots.keys().copied().collect(), <[i32]>::to_vec);
    let mut workers = Vec::with_capacity(list.len());
    for p in list {
        let pending = st.pending.remove(&p);
        let Some(Slot::Ready { worker, budget, .. }) = st.slots.remove(&p) else { continue };
        if let Some(chunk) = pending.filter(|_| deliver) {
            hand_over(&worker, &budget, chunk);
        }
        workers.push((p, worker, budget));
    }
    if parts.is_none() {
        // Partitions still recovering have no worker to drain; they go too.
        st.slots.clear();
        st.pending.clear();
    }
    workers
}

/// Drains `workers` concurrently (flush, DLQ acks, upload, commit) within `timeout`, stops the
/// drained ones and kills the rest: what they did not commit is re-read by the next owner, and
/// the recovery scan adopts what they uploaded.
fn drain_all(dc: &DriverContext, workers: Workers, timeout: Duration) {
    let started = Instant::now();
    dc.rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (p, worker, budget) in workers {
            set.spawn(async move {
                let res = ractor::call_t!(worker, PartitionWorkerMsg::Drain, timeout.as_millis() as u64);
                match res.map_err(|e| e.to_string()).and_then(|r| r) {
                    Ok(committed) => {
                        tracing::info!(partition = p, ?committed, elapsed = ?started.elapsed(), "partition drained");
                        let _ = worker.stop_and_wait(Some("drained".into()), Some(Duration::from_secs(5))).await;
                    }
                    Err(why) => {
                        tracing::warn!(partition = p, error = %why, "drain did not complete; uncommitted records will be re-read");
                        let _ = worker.kill_and_wait(Some(Duration::from_secs(5))).await;
                    }
                }
                budget.release_all();
            });
        }
        while set.join_next().await.is_some() {}
    });
}

/// Kills `workers` without a drain: nothing more is committed.
fn kill_all(dc: &DriverContext, workers: Workers) {
    for (_, w, _) in &workers {
        w.kill();
    }
    if DriverContext::in_runtime() {
        // Cannot wait here; the budgets are released as the workers are forgotten.
        for (_, _, b) in workers {
            b.release_all();
        }
        return;
    }
    dc.rt.block_on(async {
        for (_, w, b) in workers {
            let _ = w.kill_and_wait(Some(Duration::from_secs(5))).await;
            b.release_all();
        }
    });
}

/// I7: hand over what was fetched, drain every worker (flush, upload, commit), leave the group.
fn shutdown(consumer: &Arc<Consumer>, deadline: Instant) {
    let dc = consumer.context();
    tracing::info!("draining partitions for shutdown");
    let workers = take_workers(dc, None, true);
    let parts: Vec<i32> = workers.iter().map(|(p, _, _)| *p).collect();
    // Stop fetching so the drain has a fixed end.
    let _ = consumer.pause(&dc.tpl(&parts));
    drain_all(dc, workers, deadline.saturating_duration_since(Instant::now()));
    dc.rt.block_on(dc.ctx.settle_lake(deadline.saturating_duration_since(Instant::now())));
    dc.ctx.abandon();
    leave_group(consumer);
}

fn abort(consumer: &Arc<Consumer>) {
    let dc = consumer.context();
    dc.ctx.abandon();
    let workers = take_workers(dc, None, false);
    kill_all(dc, workers);
    leave_group(consumer);
}

/// Unsubscribes so the group rebalances at once instead of after the session timeout.
fn leave_group(consumer: &Arc<Consumer>) {
    consumer.unsubscribe();
    // Serve the resulting revoke callback (nothing is assigned any more, so it only unassigns).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && !consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let dc = consumer.context();
    dc.ctx.health.consuming.store(false, Ordering::Relaxed);
    let reported: Vec<i32> = dc.lag_reported.lock().unwrap().iter().copied().collect();
    dc.clear_lag(&reported);
}

/// Makes librdkafka raise a fatal error on `consumer`, as a fenced static member would get
/// (the test hook [`crate::faults::Faults::fatal_consumer_error`]).
fn raise_fatal_error(consumer: &Consumer) {
    let reason = c"injected fault: a fatal consumer error";
    // SAFETY: the client pointer is valid while `consumer` lives, and librdkafka copies the
    // reason before returning.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            consumer.client().native_ptr(),
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR__FENCED,
            reason.as_ptr(),
        );
    }
}

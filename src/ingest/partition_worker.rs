//! PartitionWorker: one actor per assigned Kafka partition. It validates, buffers, dead-letters,
//! flushes to Parquet, uploads, and only then commits.
//!
//! The order inside a flush is the whole of I1: (1) the Parquet file is uploaded under its
//! deterministic name with a conditional create, (2) the window's dead letters and the offset
//! `last + 1` are committed in one Kafka transaction (`kafka.exactly_once`, [`crate::ingest::txn`];
//! the file's footer lists the dead letters). A crash anywhere before (2) leaves the offsets
//! uncommitted, so the records are read again; the recovery scan (I2) then finds the file of
//! step (1) and adopts it instead of writing it twice, and the worker sends its dead letters again
//! in the transaction that commits past it ([`Redo`]). Without `kafka.exactly_once` every DLQ
//! write of the flush is acknowledged before the upload and the offset is committed by the
//! consumer after it: the DLQ is then at-least-once. Memory (I4) is accounted in `buffered`,
//! shared with the consumer driver, which pauses the partition when it grows past its cap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};

use crate::context::{PartitionBudget, PipelineCtx};
use crate::faults::{Kind, Moment, Write, WriteKind};
use crate::ingest::Consumer;
use crate::ingest::dlq::{self, DeadLetter};
use crate::ingest::incarnation::WentBack;
use crate::ingest::txn::{FlushTxn, TxnError};
use crate::lake::{FenceError, Fenced, PutOutcome, RawFileName, parquet};
use crate::metrics as m;
use crate::record::Rejection;

/// Consumed records handed over by the driver: one buffer for a whole batch, so a batch costs
/// one allocation, not one per record.
#[derive(Debug, Default)]
pub struct RecordChunk {
    pub data: Vec<u8>,
    pub entries: Vec<ChunkEntry>,
}

#[derive(Debug, Clone, Copy)]
pub struct ChunkEntry {
    pub offset: i64,
    /// The record's timestamp (the producer's or the broker's, as the topic says), microseconds
    /// since the epoch; `None` when it has none ([`crate::record::broker_time_us`]).
    pub timestamp_us: Option<i64>,
    pub key: Option<(u32, u32)>,
    pub payload: Option<(u32, u32)>,
}

impl RecordChunk {
    pub fn push(&mut self, offset: i64, timestamp_us: Option<i64>, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut put = |b: &[u8]| {
            let start = self.data.len() as u32;
            self.data.extend_from_slice(b);
            (start, b.len() as u32)
        };
        let key = key.map(&mut put);
        let payload = payload.map(&mut put);
        self.entries.push(ChunkEntry { offset, timestamp_us, key, payload });
    }

    /// Bytes this chunk holds, as counted against the memory caps.
    pub fn accounted_bytes(&self) -> usize {
        self.data.len() + self.entries.len() * std::mem::size_of::<ChunkEntry>()
    }

    /// One entry's share of [`RecordChunk::accounted_bytes`]: the shares add up to the whole,
    /// so a flush in the middle of a chunk releases exactly what its window held.
    pub fn entry_bytes(e: &ChunkEntry) -> usize {
        let len = |r: Option<(u32, u32)>| r.map_or(0, |(_, l)| l as usize);
        len(e.key) + len(e.payload) + std::mem::size_of::<ChunkEntry>()
    }

    fn slice(&self, r: Option<(u32, u32)>) -> Option<&[u8]> {
        r.map(|(s, l)| &self.data[s as usize..(s + l) as usize])
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub enum PartitionWorkerMsg {
    /// The driver installed this worker: the partition is this instance's and is read from the
    /// worker's start. Until then the worker commits nothing, so a recovery that finishes after
    /// its partition was revoked (its worker is then killed unstarted) never commits for a
    /// partition another instance owns (I9). An adopted file's end is committed at once.
    Start,
    Records(RecordChunk),
    /// Periodic check of the flush age.
    Tick,
    /// Flush now: the total memory cap is reached and this partition holds the most (I4).
    FlushNow,
    /// Flush, upload and commit everything buffered, then reply with the committed next offset.
    Drain(RpcReplyPort<Result<Option<i64>, String>>),
}

pub struct PartitionWorkerArgs {
    pub partition: i32,
    /// First offset this worker may accept; lower ones are already in the lake or committed.
    pub start_offset: Option<i64>,
    /// The topic's id, as the broker gave it at the recovery: written into each raw file.
    pub topic_id: Option<uuid::Uuid>,
    /// A file the recovery scan adopted: its `last + 1` is committed before anything else, or,
    /// with `redo`, once its dead letters are sent again.
    pub adopted: Option<RawFileName>,
    /// The adopted file's dead letters, to send again (its footer lists them).
    pub redo: Option<Redo>,
    /// The partition's transactional producer (`kafka.exactly_once`).
    pub txn: Option<Arc<FlushTxn>>,
    pub ctx: Arc<PipelineCtx>,
    pub consumer: Arc<Consumer>,
    pub budget: Arc<PartitionBudget>,
}

/// An adopted file whose footer lists its dead letters ([`dlq::META_DEAD_LETTERS`]): they went
/// in a transaction that never committed, so they are in no `read_committed` reader's DLQ. Its
/// offsets from the worker's start to `last` are read again: those listed are dead-lettered with
/// the listed reason (not validated again: the validator's answer may depend on the clock), the
/// others skipped (their rows are in the file), and the transaction that commits `last + 1`
/// carries them.
#[derive(Debug)]
pub struct Redo {
    pub file: RawFileName,
    pub dead: BTreeMap<i64, Rejection>,
    letters: Vec<DeadLetter>,
}

impl Redo {
    pub fn new(file: RawFileName, dead: BTreeMap<i64, Rejection>) -> Redo {
        Redo { file, dead, letters: Vec::new() }
    }
}

/// The offsets and bytes of the current flush.
struct Window {
    first: i64,
    last: i64,
    opened: Instant,
    bytes: usize,
    records: usize,
    /// Broker timestamps of every record and event times of the valid ones, observed as
    /// end-to-end latencies once the commit covering them succeeds.
    broker_times_us: Vec<i64>,
    event_times_us: Vec<i64>,
}

pub struct PartitionWorkerState {
    partition: i32,
    partition_label: String,
    ctx: Arc<PipelineCtx>,
    consumer: Arc<Consumer>,
    budget: Arc<PartitionBudget>,
    rows: parquet::RowBuffer,
    window: Option<Window>,
    dlq_pending: Vec<(DeadLetter, Option<DeliveryFuture>)>,
    next_offset: Option<i64>,
    /// The lowest offset this worker accepts: where it started. A record below it means the log
    /// went back under it (issue 11, part 3).
    floor: Option<i64>,
    topic_id: Option<uuid::Uuid>,
    /// A commit owed without a flush: (next offset, offsets it covers).
    pending_commit: Option<(i64, u64)>,
    committed: Option<i64>,
    /// Set by [`PartitionWorkerMsg::Start`]; nothing is committed before.
    started: bool,
    adopted: Option<RawFileName>,
    redo: Option<Redo>,
    txn: Option<Arc<FlushTxn>>,
    tick: Option<tokio::task::AbortHandle>,
    tick_period: Duration,
}

pub struct PartitionWorker;

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Rows,
    Bytes,
    Age,
    Memory,
    Drain,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Rows => "rows",
            Trigger::Bytes => "bytes",
            Trigger::Age => "age",
            Trigger::Memory => "memory",
            Trigger::Drain => "drain",
        }
    }
}

/// A dead letter refused for good parks the partition (the supervisor reads the type); one
/// abandoned at shutdown is a plain failure.
fn send_failed(e: dlq::SendError) -> ActorProcessingErr {
    match e {
        dlq::SendError::Refused(r) => Box::new(r),
        abandoned => abandoned.to_string().into(),
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Actor for PartitionWorker {
    type Msg = PartitionWorkerMsg;
    type State = PartitionWorkerState;
    type Arguments = PartitionWorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionWorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let max_age = args.ctx.config.flush.max_age;
        let period = (max_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        // One tick in flight at a time, re-armed when it is handled: an interval would queue a
        // tick per period in the mailbox while a flush is blocked (an S3 outage of an hour:
        // thousands per partition, outside every cap, I4).
        let tick = myself.send_after(period, || PartitionWorkerMsg::Tick).abort_handle();
        let pending_commit = match args.redo {
            Some(_) => None,
            None => args.adopted.as_ref().map(|f| (f.last_offset + 1, (f.last_offset + 1 - f.first_offset) as u64)),
        };
        tracing::debug!(partition = args.partition, start_offset = ?args.start_offset, "partition worker started");
        let state = PartitionWorkerState {
            partition: args.partition,
            partition_label: args.partition.to_string(),
            ctx: args.ctx,
            consumer: args.consumer,
            budget: args.budget,
            rows: parquet::RowBuffer::new(),
            window: None,
            dlq_pending: Vec::new(),
            next_offset: args.start_offset,
            floor: args.start_offset,
            topic_id: args.topic_id,
            pending_commit,
            committed: None,
            started: false,
            adopted: args.adopted,
            redo: args.redo,
            txn: args.txn,
            tick: Some(tick),
            tick_period: period,
        };
        Ok(state)
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.tick.take() {
            t.abort();
        }
        if let Some(txn) = state.txn.take() {
            // Dropping a producer waits for it (up to half a second): not on the runtime.
            tokio::task::spawn_blocking(move || drop(txn));
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionWorkerMsg::Start => {
                state.started = true;
                if let Some(f) = state.adopted.take() {
                    state.ctx.stats.adopted_files.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::FILES_ADOPTED).increment(1);
                    if let Some(redo) = &state.redo {
                        tracing::info!(partition = state.partition, file = %f, dead_letters = redo.dead.len(),
                            "adopted an uploaded but uncommitted file; its dead letters are sent again as its records are read again");
                    } else {
                        tracing::info!(partition = state.partition, file = %f, "adopted an uploaded but uncommitted file");
                        if let Some((next, covers)) = state.pending_commit {
                            state.commit(&mut [], next, covers).await?;
                        }
                        state.ctx.file_committed(f);
                    }
                }
            }
            PartitionWorkerMsg::Records(chunk) => state.on_records(chunk).await?,
            PartitionWorkerMsg::Tick if !state.started => state.rearm_tick(&myself),
            PartitionWorkerMsg::Tick => {
                state.rearm_tick(&myself);
                if let Some((next, covers)) = state.pending_commit {
                    state.commit(&mut [], next, covers).await?;
                }
                let aged = state.window.as_ref().is_some_and(|w| w.opened.elapsed() >= state.ctx.config.flush.max_age);
                if aged {
                    state.flush(Trigger::Age).await?;
                }
            }
            PartitionWorkerMsg::FlushNow => state.flush(Trigger::Memory).await?,
            PartitionWorkerMsg::Drain(reply) => {
                let res = state.drain().await;
                let answer = res.as_ref().map(|_| state.committed).map_err(|e| e.to_string());
                let _ = reply.send(answer);
                res?;
            }
        }
        Ok(())
    }
}

impl Window {
    fn open(first: i64) -> Self {
        Window {
            first,
            last: first,
            opened: Instant::now(),
            bytes: 0,
            records: 0,
            broker_times_us: Vec::new(),
            event_times_us: Vec::new(),
        }
    }
}

impl PartitionWorkerState {
    /// Schedules the next tick (the one just received has left the mailbox). Re-armed before
    /// the tick's work, so its period does not stretch by a flush's duration.
    fn rearm_tick(&mut self, myself: &ActorRef<PartitionWorkerMsg>) {
        self.tick = Some(myself.send_after(self.tick_period, || PartitionWorkerMsg::Tick).abort_handle());
    }

    async fn drain(&mut self) -> Result<(), ActorProcessingErr> {
        if !self.started {
            return Ok(());
        }
        if let Some((next, covers)) = self.pending_commit {
            self.commit(&mut [], next, covers).await?;
        }
        // A redo not finished (its records not all read again) stays uncommitted: the next owner
        // adopts the file again.
        self.flush(Trigger::Drain).await
    }

    async fn on_records(&mut self, chunk: RecordChunk) -> Result<(), ActorProcessingErr> {
        let now_us = now_micros();
        let p = self.partition;
        let (max_rows, max_bytes) = (self.ctx.config.flush.max_rows, self.ctx.config.flush.max_bytes);
        let (mut consumed, mut skipped, mut skipped_bytes) = (0u64, 0u64, 0usize);
        if self.window.is_some() {
            self.ctx.faults.maybe_kill(Moment::MidBuffer);
        }
        self.ctx.faults.maybe_panic(Kind::PartitionWorker, "buffering");
        for e in &chunk.entries {
            let bytes = RecordChunk::entry_bytes(e);
            if let Some(floor) = self.floor
                && e.offset < floor
            {
                // Offsets only go back when the log is another one: the topic was re-created
                // while this worker ran and librdkafka reset its position to the new log.
                let topic = &self.ctx.config.kafka.topic;
                return Err(Box::new(WentBack(format!(
                    "partition {topic}/{p}: offset {} arrived after this worker started at offset {floor}: the log went back under it, so the topic was deleted and re-created (or the cluster replaced). Nothing more of this partition is read, written or committed here. To ingest the new log beside the old one, set kafka.incarnation to a new label; to ingest it over the old lake instead, delete the old incarnation's files first.",
                    e.offset
                ))));
            }
            let floor = *self.floor.get_or_insert(e.offset);
            debug_assert!(e.offset >= floor);
            if self.next_offset.is_some_and(|n| e.offset < n) {
                skipped += 1;
                skipped_bytes += bytes;
                continue;
            }
            if let Some(redo) = &mut self.redo {
                let last = redo.file.last_offset;
                if e.offset <= last {
                    // Its row is in the adopted file, or its dead letter is listed there.
                    if let Some(rejection) = redo.dead.remove(&e.offset) {
                        redo.letters.push(DeadLetter {
                            key: chunk.slice(e.key).map(<[u8]>::to_vec),
                            payload: chunk.slice(e.payload).map(<[u8]>::to_vec),
                            rejection,
                            source_partition: p,
                            source_offset: e.offset,
                            truncated_from: None,
                        });
                    }
                    skipped += 1;
                    skipped_bytes += bytes;
                    self.next_offset = Some(e.offset + 1);
                    if e.offset == last {
                        self.finish_redo().await?;
                    }
                    continue;
                }
                // Past the file without its last offset (a gap: the record is gone from the log).
                self.finish_redo().await?;
            }
            if self.ctx.faults.should_panic(p, e.offset) {
                panic!("injected fault: partition worker {p} fails at offset {}", e.offset);
            }
            if self.next_offset.is_none() && self.committed.is_none() && self.pending_commit.is_none() {
                // Nothing committed yet for this partition: record where we start, so a
                // replacement after a crash resumes here rather than at `auto.offset.reset`.
                // Committed now, before this record can be part of a flush that fails.
                self.pending_commit = Some((e.offset, 0));
                if self.started {
                    self.commit(&mut [], e.offset, 0).await?;
                }
            }
            consumed += 1;
            let w = self.window.get_or_insert_with(|| Window::open(e.offset));
            let payload = chunk.slice(e.payload);
            match self.ctx.validator.validate(payload, e.timestamp_us) {
                Ok(t) => {
                    self.rows.push(&t, p, e.offset, now_us);
                    w.event_times_us.push(t.event_time_us);
                }
                Err(rejection) => {
                    metrics::counter!(m::RECORDS_INVALID, "reason" => rejection.reason.as_str()).increment(1);
                    self.ctx.stats.invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(partition = p, offset = e.offset, reason = %rejection.reason, "dead-lettering");
                    let dl = DeadLetter {
                        key: chunk.slice(e.key).map(<[u8]>::to_vec),
                        payload: payload.map(<[u8]>::to_vec),
                        rejection,
                        source_partition: p,
                        source_offset: e.offset,
                        truncated_from: None,
                    };
                    // Exactly-once: sent in the flush's transaction, after the upload.
                    let fut = if self.txn.is_some() { None } else { self.ctx.dlq.send(&dl).ok() };
                    self.dlq_pending.push((dl, fut));
                }
            }
            w.last = e.offset;
            w.bytes += bytes;
            w.records += 1;
            if let Some(t) = e.timestamp_us {
                w.broker_times_us.push(t);
            }
            let over_bytes = w.bytes >= max_bytes;
            self.next_offset = Some(e.offset + 1);
            // Checked per record, so that a file never holds more than `flush.max_rows` rows.
            if self.rows.len() >= max_rows {
                self.flush(Trigger::Rows).await?;
            } else if over_bytes {
                self.flush(Trigger::Bytes).await?;
            }
        }
        if skipped > 0 {
            self.budget.release(skipped_bytes, skipped as usize);
        }
        if consumed > 0 {
            metrics::counter!(m::RECORDS_CONSUMED, "partition" => self.partition_label.clone()).increment(consumed);
            self.ctx.stats.consumed.fetch_add(consumed, Ordering::Relaxed);
        }
        if skipped > 0 {
            metrics::counter!(m::RECORDS_SKIPPED).increment(skipped);
            self.ctx.stats.skipped.fetch_add(skipped, Ordering::Relaxed);
            tracing::debug!(partition = p, skipped, "skipped records already in the lake");
        }
        Ok(())
    }

    /// DLQ acks, then upload, then commit: the order that makes I1 hold.
    async fn flush(&mut self, trigger: Trigger) -> Result<(), ActorProcessingErr> {
        let Some(w) = self.window.take() else { return Ok(()) };
        let started = Instant::now();
        let p = self.partition;
        if self.txn.is_none() {
            self.await_dlq().await?;
        }
        let mut letters: Vec<DeadLetter> = self.dlq_pending.drain(..).map(|(d, _)| d).collect();

        let rows = self.rows.len();
        let dlq_acked = started.elapsed();
        let (mut encoded, mut uploaded, mut size, mut outcome) = (dlq_acked, dlq_acked, 0, None);
        let mut file = None;
        if rows > 0 {
            let batch = self.rows.finish();
            let name = RawFileName {
                topic: self.ctx.config.lake_topic(),
                partition: p,
                first_offset: w.first,
                last_offset: w.last,
            };
            let (level, rg) = (self.ctx.config.parquet.zstd_level, self.ctx.config.parquet.row_group_rows);
            let encode_name = name.clone();
            let topic_id = self.topic_id;
            // Exactly-once: the dead letters commit after the upload, so the file says which they
            // are, for a redo if it is adopted.
            let notes = self.txn.is_some().then(|| dlq::dead_letter_notes(&letters));
            let body =
                tokio::task::spawn_blocking(move || parquet::encode(&batch, &encode_name, topic_id, notes, level, rg))
                    .await
                    .map_err(|e| format!("parquet encoder task failed: {e}"))?
                    .map_err(|e| format!("parquet encoding of {name} failed: {e}"))?;
            size = body.len();
            let key = name.key(&self.ctx.config.s3.raw_prefix);
            encoded = started.elapsed();
            self.ctx.faults.maybe_kill(Moment::MidUpload);
            outcome = Some(self.upload(&key, bytes::Bytes::from(body)).await?);
            uploaded = started.elapsed();
            self.ctx.stats.files.fetch_add(1, Ordering::Relaxed);
            self.ctx.stats.upload_bytes.fetch_add(size as u64, Ordering::Relaxed);
            metrics::counter!(m::FILES_UPLOADED).increment(1);
            metrics::counter!(m::UPLOAD_BYTES).increment(size as u64);
            self.ctx.faults.maybe_kill(Moment::AfterUpload);
            self.ctx.faults.maybe_panic(Kind::PartitionWorker, "after upload, before commit");
            if self.ctx.faults.take_crash_after_upload(p) {
                return Err(format!("injected fault: crash after uploading {key}, before the commit").into());
            }
            file = Some(name);
        }
        let dead_letters = letters.len() as u64;
        if self.txn.is_none() {
            letters.clear(); // acknowledged above
        }
        self.commit(&mut letters, w.last + 1, w.records as u64).await?;
        if self.txn.is_some() {
            metrics::counter!(m::DLQ_RECORDS).increment(dead_letters);
        }
        let committed_us = now_micros();
        m::LATENCY_FROM_BROKER.observe_since(&w.broker_times_us, committed_us);
        m::LATENCY_FROM_EVENT.observe_since(&w.event_times_us, committed_us);
        if let Some(name) = file {
            self.ctx.file_committed(name);
        }
        // One event per flush, with where its time went (cumulative since the flush began).
        tracing::debug!(
            partition = p,
            first_offset = w.first,
            last_offset = w.last,
            rows,
            bytes = size,
            trigger = trigger.as_str(),
            ?outcome,
            ?dlq_acked,
            ?encoded,
            ?uploaded,
            committed = ?started.elapsed(),
            "flushed"
        );
        self.ctx.stats.written.fetch_add(rows as u64, Ordering::Relaxed);
        metrics::counter!(m::RECORDS_WRITTEN, "partition" => self.partition_label.clone()).increment(rows as u64);
        metrics::counter!(m::FLUSHES, "trigger" => trigger.as_str()).increment(1);
        metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        self.budget.release(w.bytes, w.records);
        Ok(())
    }

    /// Waits for every DLQ write of this flush; failed ones are re-sent until acknowledged.
    async fn await_dlq(&mut self) -> Result<(), ActorProcessingErr> {
        let upload = &self.ctx.config.upload;
        for (dl, fut) in self.dlq_pending.iter_mut() {
            let acked = match fut.take() {
                Some(f) => matches!(f.await, Ok(Ok(_))),
                None => false,
            };
            if !acked {
                let ctx = self.ctx.clone();
                self.ctx
                    .dlq
                    .send_acked(dl, upload.retry_initial_backoff, upload.retry_max_backoff, move || ctx.abandoning())
                    .await
                    .map_err(send_failed)?;
            }
            metrics::counter!(m::DLQ_RECORDS).increment(1);
        }
        Ok(())
    }

    /// Conditional create, retried with capped exponential backoff while the store is down.
    async fn upload(&self, key: &str, body: bytes::Bytes) -> Result<PutOutcome, ActorProcessingErr> {
        let cfg = &self.ctx.config.upload;
        let mut wait = cfg.retry_initial_backoff;
        let started = Instant::now();
        loop {
            // I9: a worker whose partition another instance has claimed writes nothing more.
            let fence = match self.ctx.check_fence(self.partition).await {
                Ok(()) => Ok(()),
                Err(FenceError::Fenced(f)) => return Err(Box::new(f)),
                Err(FenceError::Unclaimed(p)) => {
                    return Err(Box::new(Fenced { partition: p, mine: 0, current: 0, owner: "unknown".into() }));
                }
                Err(FenceError::Store(e)) => Err(e),
            };
            let put = match fence
                .and_then(|()| self.ctx.faults.late_write(WriteKind::Raw, &self.ctx.store, key, &body, Write::IfAbsent))
            {
                Ok(()) => self.ctx.store.put_if_absent(key, body.clone()).await,
                Err(e) => Err(e),
            };
            match put {
                Ok(outcome) => {
                    self.ctx.health.s3_ok.store(true, Ordering::Relaxed);
                    metrics::histogram!(m::UPLOAD_DURATION).record(started.elapsed().as_secs_f64());
                    return Ok(outcome);
                }
                Err(e) if e.is_retryable() => {
                    self.ctx.health.s3_ok.store(false, Ordering::Relaxed);
                    self.ctx.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::UPLOAD_ERRORS).increment(1);
                    tracing::warn!(partition = self.partition, key, error = %e, retry_in = ?wait, "upload failed");
                    if self.ctx.abandoning() {
                        return Err(format!("upload of {key} abandoned at shutdown: {e}").into());
                    }
                    metrics::counter!(m::UPLOAD_RETRIES).increment(1);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(cfg.retry_max_backoff);
                }
                Err(e) => {
                    self.ctx.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::UPLOAD_ERRORS).increment(1);
                    return Err(e.into());
                }
            }
        }
    }

    /// Commits `next` (the next offset to read) with `letters`, the dead letters not yet sent:
    /// in one transaction with `kafka.exactly_once`, else each acknowledged and then the offset
    /// committed by the consumer. A failure escalates: the supervisor restarts the worker, whose
    /// recovery scan adopts what was uploaded. A transaction the broker refuses because a newer
    /// producer of the partition has started fences the worker.
    async fn commit(&mut self, letters: &mut [DeadLetter], next: i64, covers: u64) -> Result<(), ActorProcessingErr> {
        let upload = &self.ctx.config.upload;
        let retry = (upload.retry_initial_backoff, upload.retry_max_backoff);
        if let Some(txn) = &self.txn {
            let ctx = self.ctx.clone();
            match txn.commit(letters, next, &self.consumer, retry, move || ctx.abandoning()).await {
                Ok(()) => {}
                Err(TxnError::Fenced(f)) => {
                    // A newer producer of this partition's transactional id started: the next
                    // owner's, as a rule. But a recovery that checked its claim just before the
                    // next owner claimed, and started its producer just after the next owner's,
                    // fences the rightful owner the same way. The store decides, not the lease.
                    self.ctx.expire_leases(&[self.partition]);
                    return match self.ctx.check_fence(self.partition).await {
                        Ok(()) | Err(FenceError::Store(_)) => Err(format!(
                            "{f}; this instance's claim is current (or the store did not answer), so the worker restarts with a producer of its own"
                        )
                        .into()),
                        Err(_) => Err(Box::new(f)),
                    };
                }
                Err(TxnError::Refused(r)) => return Err(Box::new(r)),
                Err(TxnError::Failed(e)) => {
                    metrics::counter!(m::COMMIT_ERRORS).increment(1);
                    return Err(format!("commit of offset {next} on partition {} failed: {e}", self.partition).into());
                }
            }
        } else {
            for dl in letters.iter() {
                let ctx = self.ctx.clone();
                self.ctx.dlq.send_acked(dl, retry.0, retry.1, move || ctx.abandoning()).await.map_err(send_failed)?;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.ctx.config.kafka.topic, self.partition, Offset::Offset(next))?;
            // A commit refused because the group is rebalancing is asked again a few times: the
            // rebalance ends within moments (this worker is drained first if it loses the
            // partition), and failing the worker instead restarts it into the same rebalance,
            // which with several members fed a storm of restarts (seen in the mock cluster).
            let mut wait = Duration::from_millis(50);
            let res = loop {
                let (consumer, tpl) = (self.consumer.clone(), tpl.clone());
                let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                    .await
                    .map_err(|e| format!("commit task failed: {e}"))?;
                match res {
                    Err(e)
                        if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::RebalanceInProgress)
                            && wait < Duration::from_secs(2)
                            && !self.ctx.abandoning() =>
                    {
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    res => break res,
                }
            };
            if let Err(e) = res {
                metrics::counter!(m::COMMIT_ERRORS).increment(1);
                return Err(format!("commit of offset {next} on partition {} failed: {e}", self.partition).into());
            }
        }
        self.pending_commit = None;
        metrics::counter!(m::OFFSETS_COMMITTED, "partition" => self.partition_label.clone()).increment(covers);
        self.committed = Some(next);
        self.ctx.stats.record_commit(self.partition, next);
        Ok(())
    }

    /// Commits past an adopted file with the dead letters its footer lists ([`Redo`]).
    async fn finish_redo(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(mut redo) = self.redo.take() else { return Ok(()) };
        if !redo.dead.is_empty() {
            // Offsets the file lists were not delivered again: the log no longer holds them
            // (retention, compaction). Their dead letters cannot be sent.
            let missing: Vec<i64> = redo.dead.keys().copied().collect();
            tracing::error!(partition = self.partition, file = %redo.file, offsets = ?missing,
                "dead letters listed in an adopted file could not be sent again: their records are gone from the log");
        }
        let next = redo.file.last_offset + 1;
        let covers = (next - self.floor.unwrap_or(redo.file.first_offset)).max(0) as u64;
        let sent = redo.letters.len() as u64;
        self.commit(&mut redo.letters, next, covers).await?;
        metrics::counter!(m::DLQ_RECORDS).increment(sent);
        tracing::info!(partition = self.partition, file = %redo.file, dead_letters = sent, "committed past an adopted file");
        self.ctx.file_committed(redo.file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_shares_add_up_to_the_chunk() {
        let mut chunk = RecordChunk::default();
        chunk.push(1, None, Some(b"user-1"), Some(b"{\"a\":1}"));
        chunk.push(2, Some(0), None, Some(b"{}"));
        chunk.push(3, None, Some(b"k"), None);
        chunk.push(4, None, None, None);
        let sum: usize = chunk.entries.iter().map(RecordChunk::entry_bytes).sum();
        assert_eq!(sum, chunk.accounted_bytes());
        assert_eq!(chunk.slice(chunk.entries[0].key), Some(&b"user-1"[..]));
        assert_eq!(chunk.slice(chunk.entries[1].payload), Some(&b"{}"[..]));
        assert_eq!(chunk.slice(chunk.entries[3].payload), None);
    }
}

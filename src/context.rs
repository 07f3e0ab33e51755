//! What every actor of one daemon shares: the configuration, the stores, the DLQ producer, the
//! set of Kafka partitions this instance owns (I5) and the memory budgets (I4).
//!
//! One `PipelineCtx` per daemon instance, behind an `Arc`, handed to every actor as its
//! argument: the actors talk to each other through it (a worker hands a committed file to the
//! current partitioner) instead of holding each other's addresses, so a restarted actor is found
//! by the next message.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{ActorRef, RpcReplyPort};
use rdkafka::ClientConfig;

use crate::config::Config;
use crate::faults::Faults;
use crate::ingest::dlq::DlqProducer;
use crate::lake::owners::{self, OwnerRecord};
use crate::lake::{CondPut, FenceError, Fenced, HivePartition, LakeStore, Precondition, RawFileName, StoreError};
use crate::metrics::{Health, Stats};
use crate::record::Validator;
use crate::table::compactor::CompactorMsg;
use crate::table::partitioner::PartitionerMsg;

/// What every actor of one daemon shares.
pub struct PipelineCtx {
    pub config: Config,
    pub validator: Validator,
    pub store: LakeStore,
    /// The table bucket (`tb-transactions`).
    pub table: LakeStore,
    pub dlq: DlqProducer,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub faults: Arc<Faults>,
    /// Prefix of actor names: names are global in ractor, and tests run several pipelines.
    pub instance: String,
    /// Consumed-but-uncommitted bytes of all partitions (I4).
    pub total_buffered: AtomicUsize,
    /// The records those bytes hold.
    pub total_buffered_records: AtomicUsize,
    abandon: AtomicBool,
    /// Kafka partitions this instance owns: the partitioner and compactor touch only their data (I5).
    owned: Mutex<BTreeSet<i32>>,
    /// What the compactor is told about the table between its passes.
    for_compactor: Mutex<CompactorNotes>,
    /// This instance's claims (I9): per Kafka partition, the epoch it wrote into the owner record
    /// and when it last saw it current.
    claims: Mutex<HashMap<i32, Claim>>,
    /// Whether the stores refuse a conditional write whose precondition fails (probed at start).
    pub conditional_writes: AtomicBool,
    /// Recoveries that read and decode a raw file whole before adopting it, at once (I4): as many
    /// as there are cores, so that an assignment of hundreds of partitions holds a few decoded
    /// files at a time, not one per partition.
    pub recovery_decodes: tokio::sync::Semaphore,
    pub(crate) partitioner: Mutex<Option<ActorRef<PartitionerMsg>>>,
    pub(crate) compactor: Mutex<Option<ActorRef<CompactorMsg>>>,
}

/// What the compactor is told between its passes. Only a compactor ever takes (and so bounds)
/// these, so with it disabled nothing is kept: a daemon running for months without one would
/// otherwise grow both by every day and type it writes.
struct CompactorNotes {
    keep: bool,
    /// Hive partitions the partitioner wrote to since the compactor last looked, per Kafka
    /// partition: the compactor lists only these between full listings.
    touched: BTreeMap<i32, BTreeSet<HivePartition>>,
    /// Table writes that failed and may still land (I9's late writes): when, per Hive
    /// partition and raw file. The compactor watches those Hive partitions for a while.
    failed_writes: HashMap<(HivePartition, RawFileName), Instant>,
}

impl CompactorNotes {
    fn new(keep: bool) -> Self {
        CompactorNotes { keep, touched: BTreeMap::new(), failed_writes: HashMap::new() }
    }

    fn touch(&mut self, p: i32, hives: impl IntoIterator<Item = HivePartition>) {
        if self.keep {
            self.touched.entry(p).or_default().extend(hives);
        }
    }

    fn write_failed(&mut self, hive: HivePartition, file: &RawFileName) {
        if self.keep {
            self.failed_writes.insert((hive, file.clone()), Instant::now());
        }
    }

    fn watched(&mut self, parts: &BTreeSet<i32>, window: Duration) -> BTreeMap<(HivePartition, i32), Vec<(i64, i64)>> {
        let mut expired = Vec::new();
        self.failed_writes.retain(|(hive, f), at| {
            let keep = at.elapsed() < window;
            if !keep {
                expired.push((f.partition, hive.clone()));
            }
            keep
        });
        let mut watched: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (hive, f) in self.failed_writes.keys().filter(|(_, f)| parts.contains(&f.partition)) {
            watched.entry((hive.clone(), f.partition)).or_default().push((f.first_offset, f.last_offset));
        }
        // Their files may be merged again: listed once more, by the next pass.
        for (p, hive) in expired {
            self.touch(p, [hive]);
        }
        watched
    }
}

impl PipelineCtx {
    /// The context of a new daemon instance, owning nothing yet.
    pub fn new(
        config: Config,
        store: LakeStore,
        table: LakeStore,
        dlq: DlqProducer,
        health: Arc<Health>,
        faults: Arc<Faults>,
        instance: String,
    ) -> Self {
        let for_compactor = Mutex::new(CompactorNotes::new(config.compactor.enabled));
        PipelineCtx {
            validator: config.validator(),
            config,
            store,
            table,
            dlq,
            stats: Arc::new(Stats::default()),
            health,
            faults,
            instance,
            total_buffered: AtomicUsize::new(0),
            total_buffered_records: AtomicUsize::new(0),
            abandon: AtomicBool::new(false),
            owned: Mutex::new(BTreeSet::new()),
            for_compactor,
            claims: Mutex::new(HashMap::new()),
            conditional_writes: AtomicBool::new(false),
            recovery_decodes: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            partitioner: Mutex::new(None),
            compactor: Mutex::new(None),
        }
    }
    /// Past the shutdown deadline: retry loops give up (nothing is committed, nothing lost).
    pub fn abandoning(&self) -> bool {
        self.abandon.load(Ordering::Relaxed)
    }

    pub fn abandon(&self) {
        self.abandon.store(true, Ordering::Relaxed);
    }

    /// Whether this instance owns Kafka partition `p` (I5).
    pub fn owns(&self, p: i32) -> bool {
        self.owned.lock().unwrap().contains(&p)
    }

    pub fn owned_partitions(&self) -> Vec<i32> {
        self.owned.lock().unwrap().iter().copied().collect()
    }

    /// Partitions assigned to this instance: the partitioner and compactor take them on.
    pub fn assign_partitions(&self, parts: &[i32]) {
        self.owned.lock().unwrap().extend(parts.iter().copied());
        if let Some(a) = self.partitioner.lock().unwrap().as_ref() {
            let _ = a.cast(PartitionerMsg::Assigned(parts.to_vec()));
        }
        if let Some(a) = self.compactor.lock().unwrap().as_ref() {
            let _ = a.cast(CompactorMsg::Assigned(parts.to_vec()));
        }
    }

    /// Partitions revoked or lost: from now on the partitioner and compactor leave them alone,
    /// and this returns once neither has work on them in flight (or after `drain_timeout`), so
    /// the next owner, who cannot get them before the revoke returns, is the only writer (I5).
    pub async fn release_partitions(&self, parts: &[i32]) {
        self.disown(parts);
        let timeout = self.config.shutdown.drain_timeout.as_millis() as u64;
        let partitioner = self.partitioner.lock().unwrap().clone();
        let compactor = self.compactor.lock().unwrap().clone();
        tokio::join!(
            confirm_release("partitioner", partitioner, PartitionerMsg::Released, parts, timeout),
            confirm_release("compactor", compactor, CompactorMsg::Released, parts, timeout),
        );
    }

    /// Forgets `parts` without waiting for the partitioner and compactor to confirm.
    pub fn disown(&self, parts: &[i32]) {
        let mut owned = self.owned.lock().unwrap();
        let mut notes = self.for_compactor.lock().unwrap();
        for p in parts {
            owned.remove(p);
            notes.touched.remove(p);
        }
    }

    /// The partitioner wrote (and moved the watermark past) files of Kafka partition `p` in
    /// these Hive partitions.
    pub fn touch(&self, p: i32, hives: impl IntoIterator<Item = HivePartition>) {
        self.for_compactor.lock().unwrap().touch(p, hives);
    }

    /// A table write of Kafka partition `p` in these Hive partitions failed: the store may
    /// still apply it later.
    pub fn table_write_failed(&self, p: i32, hive: HivePartition, file: &RawFileName) {
        debug_assert_eq!(file.partition, p);
        self.for_compactor.lock().unwrap().write_failed(hive, file);
    }

    /// Per (Hive partition, Kafka partition) of `parts`, the offset ranges of the table writes
    /// that failed within the last `window`; older ones are forgotten (and their Hive
    /// partitions touched, so that the compactor lists them once more).
    pub fn watched_for_late_writes(
        &self,
        parts: &BTreeSet<i32>,
        window: Duration,
    ) -> BTreeMap<(HivePartition, i32), Vec<(i64, i64)>> {
        self.for_compactor.lock().unwrap().watched(parts, window)
    }

    /// The Hive partitions touched in `parts` since the last call, forgotten here.
    pub fn take_touched(&self, parts: impl IntoIterator<Item = i32>) -> BTreeSet<HivePartition> {
        let mut notes = self.for_compactor.lock().unwrap();
        parts.into_iter().filter_map(|p| notes.touched.remove(&p)).flatten().collect()
    }

    /// At shutdown, before the partitions are released: lets the partitioner process every
    /// raw file of the owned partitions, within `timeout`, so the table is complete on exit.
    pub async fn settle_lake(&self, timeout: Duration) {
        let partitioner = self.partitioner.lock().unwrap().clone();
        if let Some(a) = partitioner {
            match ractor::call_t!(a, PartitionerMsg::CatchUp, timeout.as_millis().max(1) as u64) {
                Ok(Ok(files)) => tracing::info!(files, "partitioner caught up"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "partitioner could not catch up before shutdown; it resumes at its watermark")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "partitioner did not catch up before the shutdown deadline; it resumes at its watermark")
                }
            }
        }
    }

    /// Claims partition `p` for this instance (on assignment): writes the next epoch into its
    /// owner record, conditionally where the store honours it, so that of two claims at once
    /// one is refused and tries again on top of the other. Every earlier owner's next write of
    /// `p` is then refused ([`PipelineCtx::check_fence`]).
    ///
    /// `topic_id` is the topic's id now: a record naming another one was written for another
    /// incarnation of the topic (issue 11, part 3), and is left as it is.
    pub async fn claim(&self, p: i32, topic_id: Option<uuid::Uuid>) -> Result<ClaimOutcome, StoreError> {
        let topic = &self.config.lake_topic();
        let key = owners::owner_key(topic, p);
        let conditional = self.conditional_writes.load(Ordering::Relaxed);
        for _ in 0..5 {
            let (prev, pre) = match self.store.get_with_etag(&key).await? {
                None => (0, Precondition::Absent),
                Some((body, etag)) => {
                    // An unreadable record counts as epoch 0: the claim replaces it.
                    let record = serde_json::from_slice::<OwnerRecord>(&body).ok();
                    let recorded = record.as_ref().and_then(|r| r.topic_id.as_deref()).and_then(|s| s.parse().ok());
                    if let (Some(recorded), Some(now)) = (recorded, topic_id)
                        && recorded != now
                    {
                        return Ok(ClaimOutcome::OtherIncarnation(recorded));
                    }
                    (record.map_or(0, |r| r.epoch), etag.map_or(Precondition::Absent, Precondition::Matches))
                }
            };
            let record = OwnerRecord {
                topic: topic.clone(),
                partition: p,
                epoch: prev + 1,
                instance: self.instance_id(),
                token: uuid::Uuid::new_v4().to_string(),
                claimed_at: chrono::Utc::now().to_rfc3339(),
                topic_id: topic_id.map(|u| u.to_string()),
            };
            let body = bytes::Bytes::from(serde_json::to_vec_pretty(&record).expect("an owner record serializes"));
            let written = if conditional {
                self.store.put_conditional(&key, body, "application/json", &pre).await?
            } else {
                // A store that ignores preconditions (Garage) may answer them with an error:
                // send none. Two claims at once then both write, and the later one stands; the
                // token tells the earlier one, at its next check, that it lost.
                self.store.put(&key, body, "application/json").await?;
                CondPut::Written(None)
            };
            match written {
                CondPut::Written(_) => {
                    let claim = Claim {
                        epoch: record.epoch,
                        token: record.token,
                        checked: Instant::now(),
                        topic_id,
                        revoked: false,
                    };
                    self.claims.lock().unwrap().insert(p, claim);
                    tracing::debug!(partition = p, epoch = record.epoch, "claimed");
                    return Ok(ClaimOutcome::Claimed(record.epoch));
                }
                CondPut::Refused => continue,
            }
        }
        Err(StoreError::Retryable {
            op: "claim",
            target: key,
            detail: "five claims in a row lost to other writers".into(),
        })
    }

    /// Every later [`PipelineCtx::check_fence`] of each of `parts` asks the store, whatever the
    /// lease: a revoke hands them over, and a group that assigns them on before every member has
    /// let go (seen with Tansu) lets the new owner claim them first.
    pub fn expire_leases(&self, parts: &[i32]) {
        let lease = self.config.kafka.session_timeout / 3;
        let mut claims = self.claims.lock().unwrap();
        for p in parts {
            if let Some(c) = claims.get_mut(p) {
                c.checked = Instant::now().checked_sub(lease).unwrap_or(c.checked);
                c.revoked = true;
            }
        }
    }

    /// The topic id this instance's claim on `p` was made under (`None` inside: the broker gave
    /// none).
    pub fn claimed_topic_id(&self, p: i32) -> Option<Option<uuid::Uuid>> {
        self.claims.lock().unwrap().get(&p).map(|c| c.topic_id)
    }

    /// Whether this instance holds a claim on `p` (it may have been superseded since).
    pub fn has_claim(&self, p: i32) -> bool {
        self.claims.lock().unwrap().contains_key(&p)
    }

    /// Before a write of partition `p` (raw file, table files, watermark, intent): `Ok` while
    /// this instance's claim is still the partition's current one (its epoch and token, I9).
    /// Within `kafka.session_timeout / 3` of the last check (measured from when that check's
    /// request was sent) no request is made (see `lake::owners`), unless the process was stopped
    /// within the last session timeout ([`crate::stall`]). A superseded claim is dropped,
    /// so that nothing of this instance writes `p` again until it is assigned `p` again.
    pub async fn check_fence(&self, p: i32) -> Result<(), FenceError> {
        let lease = self.config.kafka.session_timeout / 3;
        let stalls = crate::stall::Stalls::get();
        // After a stall the group may be moving the partition right now: no lease (crate::stall).
        let trusted = !stalls.recent(self.config.kafka.session_timeout);
        let (mine, token, topic_id) = match self.claims.lock().unwrap().get(&p) {
            None => return Err(FenceError::Unclaimed(p)),
            Some(c) if trusted && !c.revoked && c.checked.elapsed() < lease => return Ok(()),
            Some(c) => (c.epoch, c.token.clone(), c.topic_id),
        };
        let key = owners::owner_key(&self.config.lake_topic(), p);
        // An answer read after a stall that began once it was sent may be stale by the time it
        // is used: asked again (a few times; then it is used, the write's own risk).
        let (mut sent, mut current);
        let mut asks = 0;
        loop {
            let mark = stalls.mark();
            sent = Instant::now();
            current = self.store.get_opt(&key).await?.map(|body| serde_json::from_slice::<OwnerRecord>(&body).ok());
            asks += 1;
            if !stalls.since(mark) || asks >= 3 {
                break;
            }
        }
        let mut claims = self.claims.lock().unwrap();
        // Only the claim this check was about: a newer one of this instance (assigned `p` again
        // meanwhile) is left alone.
        let same = |c: &Claim| c.epoch == mine && c.token == token;
        match current {
            Some(Some(r)) if r.epoch == mine && r.token == token => {
                if let Some(c) = claims.get_mut(&p).filter(|c| same(c)) {
                    c.checked = sent;
                }
                Ok(())
            }
            None => {
                // The record is gone (a retention rule on the bucket?): nobody claimed after us.
                drop(claims);
                tracing::warn!(partition = p, key = %key, "the partition's owner record is gone; writing it again");
                let record = OwnerRecord {
                    topic: self.config.lake_topic(),
                    partition: p,
                    epoch: mine,
                    instance: self.instance_id(),
                    token,
                    claimed_at: chrono::Utc::now().to_rfc3339(),
                    topic_id: topic_id.map(|u| u.to_string()),
                };
                let body = serde_json::to_vec_pretty(&record).expect("an owner record serializes");
                self.store.put_conditional(&key, body.into(), "application/json", &Precondition::Absent).await?;
                Ok(())
            }
            Some(other) => {
                if claims.get(&p).is_some_and(same) {
                    claims.remove(&p);
                }
                let (current, owner) =
                    other.map_or((0, "nobody (the record is unreadable)".into()), |r| (r.epoch, r.instance));
                Err(Fenced { partition: p, mine, current, owner }.into())
            }
        }
    }

    /// `instance@host`, as written into owner records.
    pub fn instance_id(&self) -> String {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("{}@{host}", self.instance)
    }

    /// A worker committed a raw file: hand it to the partitioner.
    pub fn file_committed(&self, name: RawFileName) {
        if let Some(a) = self.partitioner.lock().unwrap().as_ref() {
            let _ = a.cast(PartitionerMsg::FileCommitted(name));
        }
    }
}

/// One claim of this instance (see [`PipelineCtx::check_fence`]).
/// What [`PipelineCtx::claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The partition is this instance's, at this epoch.
    Claimed(u64),
    /// The owner record was written under this other topic id: nothing claimed.
    OtherIncarnation(uuid::Uuid),
}

struct Claim {
    /// The topic id the claim was made under, where the broker gives one.
    topic_id: Option<uuid::Uuid>,
    epoch: u64,
    /// Random, per claim: on a store that ignores preconditions two claims can write the same
    /// epoch; the token tells them apart.
    token: String,
    checked: Instant,
    /// The partition was revoked: its next owner may claim it at any moment, so every check of
    /// this claim asks the store (a revoke's drain and the table actors' last unit).
    revoked: bool,
}

/// Asks `actor` (if running) to let go of `parts` and waits up to `timeout_ms` for its answer.
async fn confirm_release<M: ractor::Message>(
    who: &str,
    actor: Option<ActorRef<M>>,
    msg: fn(Vec<i32>, RpcReplyPort<()>) -> M,
    parts: &[i32],
    timeout_ms: u64,
) {
    let Some(actor) = actor else { return };
    if let Err(e) = ractor::call_t!(actor, msg, timeout_ms, parts.to_vec()) {
        tracing::warn!(actor = who, ?parts, error = %e, "did not confirm the release of revoked partitions");
    }
}

/// Restarts counted in a sliding window: more than `max` within `window` and the parent gives up.
#[derive(Debug)]
pub struct RestartIntensity {
    max: usize,
    window: Duration,
    times: VecDeque<Instant>,
}

impl RestartIntensity {
    pub fn new(config: &crate::config::SupervisionConfig) -> Self {
        RestartIntensity { max: config.max_restarts as usize, window: config.restart_window, times: VecDeque::new() }
    }

    /// Records a restart now; `Err(count)` when the limit is exceeded.
    pub fn record(&mut self) -> Result<(), usize> {
        let now = Instant::now();
        self.times.retain(|t| now.duration_since(*t) < self.window);
        self.times.push_back(now);
        if self.times.len() > self.max { Err(self.times.len()) } else { Ok(()) }
    }
}

/// One partition's share of the memory caps: bytes routed to its worker and not yet committed.
pub struct PartitionBudget {
    ctx: Arc<PipelineCtx>,
    buffered: AtomicUsize,
    records: AtomicUsize,
}

impl PartitionBudget {
    pub fn new(ctx: Arc<PipelineCtx>) -> Self {
        PartitionBudget { ctx, buffered: AtomicUsize::new(0), records: AtomicUsize::new(0) }
    }

    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// `bytes` (as counted by [`RecordChunk::accounted_bytes`]) in `records` records handed over.
    ///
    /// [`RecordChunk::accounted_bytes`]: crate::ingest::partition_worker::RecordChunk::accounted_bytes
    pub fn acquire(&self, bytes: usize, records: usize) {
        self.buffered.fetch_add(bytes, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
        self.ctx.total_buffered.fetch_add(bytes, Ordering::Relaxed);
        self.ctx.total_buffered_records.fetch_add(records, Ordering::Relaxed);
    }

    pub fn release(&self, bytes: usize, records: usize) {
        let prev = self.buffered.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(prev >= bytes, "released more than acquired");
        self.records.fetch_sub(records, Ordering::Relaxed);
        self.ctx.total_buffered.fetch_sub(bytes, Ordering::Relaxed);
        self.ctx.total_buffered_records.fetch_sub(records, Ordering::Relaxed);
    }

    /// Returns everything still held (the worker is gone).
    pub fn release_all(&self) {
        let bytes = self.buffered.swap(0, Ordering::Relaxed);
        let records = self.records.swap(0, Ordering::Relaxed);
        self.ctx.total_buffered.fetch_sub(bytes, Ordering::Relaxed);
        self.ctx.total_buffered_records.fetch_sub(records, Ordering::Relaxed);
    }
}

/// librdkafka settings shared by the consumer and the DLQ producer.
pub fn kafka_base_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.properties {
        c.set(k, v);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hive(day: u32) -> HivePartition {
        HivePartition { year: 2026, month: 11, day, transaction_type: "purchase".into() }
    }

    fn file(partition: i32, first_offset: i64) -> RawFileName {
        RawFileName { topic: "transactions".into(), partition, first_offset, last_offset: first_offset + 9 }
    }

    #[test]
    fn without_a_compactor_nothing_is_kept_for_it() {
        let mut notes = CompactorNotes::new(false);
        for day in 1..=28 {
            notes.touch(0, [hive(day)]);
            notes.write_failed(hive(day), &file(0, day as i64 * 10));
        }
        assert!(notes.touched.is_empty() && notes.failed_writes.is_empty());
    }

    #[test]
    fn a_compactor_takes_what_it_is_told_and_failed_writes_expire_into_touched() {
        let mut notes = CompactorNotes::new(true);
        notes.touch(0, [hive(1), hive(2)]);
        notes.touch(1, [hive(1)]);
        notes.write_failed(hive(3), &file(0, 100));
        let parts = BTreeSet::from([0]);
        let watched = notes.watched(&parts, Duration::from_secs(60));
        assert_eq!(watched, BTreeMap::from([((hive(3), 0), vec![(100, 109)])]));
        // Past the window the write is forgotten, and its Hive partition listed once more.
        let watched = notes.watched(&parts, Duration::ZERO);
        assert!(watched.is_empty() && notes.failed_writes.is_empty());
        assert_eq!(notes.touched[&0], BTreeSet::from([hive(1), hive(2), hive(3)]));
    }
}

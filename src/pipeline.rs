//! The daemon's supervision tree and its entry points, `start` and `run` (design §5).
//!
//! ```text
//! Root (one_for_one; gives up after supervision.max_restarts of one child in restart_window)
//!  ├─ Partitioner (permanent: raw files → Hive-partitioned table)
//!  ├─ Compactor (permanent: merges small table files)
//!  └─ IngestSupervisor (permanent; one_for_one over workers; owns the ConsumerDriver thread)
//!       ├─ ConsumerDriver thread (rdkafka consumer, rebalance, routing, pause/resume, seek)
//!       └─ PartitionWorker × assigned partitions (transient)
//! ```
//! ractor has no restart strategies of its own: every parent implements
//! `handle_supervisor_evt`, and decides there whether to restart, or to give up and stop so its
//! own parent decides. `supervision.md` is the reference for what happens on each crash.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use crate::compactor::{Compactor, CompactorMsg};
use crate::config::Config;
use crate::consumer_driver::{self, DriverCmd, DriverContext};
use crate::dlq::DlqProducer;
use crate::faults::Faults;
use crate::lake::{HivePartition, LakeStore, RawFileName};
use crate::metrics::{self as m, Health, Stats};
use crate::partitioner::{Partitioner, PartitionerMsg};
use crate::record::Validator;

pub type Consumer = BaseConsumer<DriverContext>;

/// What every actor of one pipeline shares.
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
    /// Hive partitions the partitioner wrote to since the compactor last looked, per Kafka
    /// partition: the compactor lists only these between full listings.
    touched: Mutex<BTreeMap<i32, BTreeSet<HivePartition>>>,
    partitioner: Mutex<Option<ActorRef<PartitionerMsg>>>,
    compactor: Mutex<Option<ActorRef<CompactorMsg>>>,
}

impl PipelineCtx {
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
        let mut touched = self.touched.lock().unwrap();
        for p in parts {
            owned.remove(p);
            touched.remove(p);
        }
    }

    /// The partitioner wrote (and moved the watermark past) files of Kafka partition `p` in
    /// these Hive partitions.
    pub fn touch(&self, p: i32, hives: impl IntoIterator<Item = HivePartition>) {
        self.touched.lock().unwrap().entry(p).or_default().extend(hives);
    }

    /// The Hive partitions touched in `parts` since the last call, forgotten here.
    pub fn take_touched(&self, parts: impl IntoIterator<Item = i32>) -> BTreeSet<HivePartition> {
        let mut touched = self.touched.lock().unwrap();
        parts.into_iter().filter_map(|p| touched.remove(&p)).flatten().collect()
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

    /// A worker committed a raw file: hand it to the partitioner.
    pub fn file_committed(&self, name: RawFileName) {
        if let Some(a) = self.partitioner.lock().unwrap().as_ref() {
            let _ = a.cast(PartitionerMsg::FileCommitted(name));
        }
    }
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
    /// [`RecordChunk::accounted_bytes`]: crate::partition_worker::RecordChunk::accounted_bytes
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

fn consumer_config(config: &Config) -> ClientConfig {
    let k = &config.kafka;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("session.timeout.ms", k.session_timeout.as_millis().to_string())
        .set("queued.max.messages.kbytes", k.fetch_queue_kbytes.to_string())
        .set("fetch.queue.backoff.ms", k.fetch_queue_backoff.as_millis().to_string())
        .set("statistics.interval.ms", k.lag_interval.as_millis().to_string())
        .set("partition.assignment.strategy", "range,roundrobin");
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    c
}

// ---------------------------------------------------------------------------------------------
// IngestSupervisor

pub struct IngestSupervisor;

pub enum IngestMsg {
    /// The driver thread ended on its own (a bug or a fatal consumer error).
    DriverExited(String),
    /// Graceful shutdown (I7): drain, commit, leave the group, then reply.
    Shutdown(RpcReplyPort<()>),
}

pub struct IngestState {
    ctx: Arc<PipelineCtx>,
    cmds: Sender<DriverCmd>,
    thread: Option<std::thread::JoinHandle<()>>,
    restarts: HashMap<i32, RestartIntensity>,
}

impl Drop for IngestState {
    /// Runs on every exit, a panic included (ractor skips `post_stop` after a failure): the
    /// driver must not outlive its supervisor with workers nobody supervises.
    fn drop(&mut self) {
        let _ = self.cmds.send(DriverCmd::Abort);
        // Whatever the driver manages before it goes, this instance owns nothing any more (I5).
        let all = self.ctx.owned_partitions();
        self.ctx.disown(&all);
    }
}

impl Actor for IngestSupervisor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = Arc<PipelineCtx>;

    async fn pre_start(
        &self,
        myself: ActorRef<IngestMsg>,
        ctx: Arc<PipelineCtx>,
    ) -> Result<IngestState, ActorProcessingErr> {
        let dc = DriverContext::new(ctx.clone(), tokio::runtime::Handle::current(), myself.get_cell());
        let consumer: Consumer = consumer_config(&ctx.config)
            .create_with_context(dc)
            .map_err(|e| format!("creating the Kafka consumer: {e}"))?;
        let consumer = Arc::new(consumer);
        consumer.context().set_consumer(&consumer);
        consumer
            .subscribe(&[&ctx.config.kafka.topic])
            .map_err(|e| format!("subscribing to {}: {e}", ctx.config.kafka.topic))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let me = myself.clone();
        let thread = std::thread::Builder::new()
            .name("trstream-consumer".into())
            .spawn(move || {
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| consumer_driver::run(consumer, rx)));
                let why = match res {
                    Ok(()) => "stopped".to_string(),
                    Err(p) => format!(
                        "panicked: {}",
                        p.downcast_ref::<String>()
                            .map(String::as_str)
                            .or(p.downcast_ref::<&str>().copied())
                            .unwrap_or("?")
                    ),
                };
                let _ = me.cast(IngestMsg::DriverExited(why));
            })
            .map_err(|e| format!("spawning the consumer thread: {e}"))?;
        Ok(IngestState { ctx, cmds: tx, thread: Some(thread), restarts: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<IngestMsg>,
        msg: IngestMsg,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            IngestMsg::DriverExited(why) => {
                if state.thread.is_some() {
                    tracing::error!(reason = %why, "consumer driver exited; restarting the ingest subtree");
                    state.thread = None;
                    myself.stop(Some(format!("consumer driver {why}")));
                }
            }
            IngestMsg::Shutdown(reply) => {
                let deadline = Instant::now() + state.ctx.config.shutdown.timeout;
                let _ = state.cmds.send(DriverCmd::Shutdown { deadline });
                if let Some(t) = state.thread.take() {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<IngestMsg>,
        evt: SupervisionEvent,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            let name = cell.get_name().unwrap_or_default();
            let Some(partition) = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                tracing::error!(actor = %name, error = %err, "unknown child failed");
                return Ok(());
            };
            tracing::warn!(partition, error = %err, "partition worker failed");
            let sup = &state.ctx.config.supervision;
            let intensity = state.restarts.entry(partition).or_insert_with(|| RestartIntensity::new(sup));
            if let Err(count) = intensity.record() {
                tracing::error!(partition, restarts = count, "restart intensity exceeded; escalating");
                myself.stop(Some(format!(
                    "partition {partition} worker failed {count} times within {}: {err}",
                    humantime::format_duration(sup.restart_window)
                )));
                return Ok(());
            }
            state.ctx.stats.restarts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "partition_worker").increment(1);
            let _ = state.cmds.send(DriverCmd::WorkerDied { partition, worker: cell.get_id() });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Root

pub struct RootActor;

/// Root's children, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    Partitioner,
    Compactor,
    Ingest,
}

impl Child {
    fn label(self) -> &'static str {
        match self {
            Child::Partitioner => "partitioner",
            Child::Compactor => "compactor",
            Child::Ingest => "ingest_supervisor",
        }
    }
}

pub enum RootMsg {
    Start(Child),
    Shutdown(RpcReplyPort<()>),
}

pub struct RootState {
    ctx: Arc<PipelineCtx>,
    ingest: Option<ActorRef<IngestMsg>>,
    /// Live children by actor id.
    children: HashMap<ActorId, (Child, ActorCell)>,
    generation: u64,
    restarts: HashMap<Child, RestartIntensity>,
    shutting_down: bool,
}

impl RootActor {
    async fn start_child(
        &self,
        myself: &ActorRef<RootMsg>,
        state: &mut RootState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        state.generation += 1;
        let name = format!("{}/{}-{}", state.ctx.instance, child.label(), state.generation);
        let ctx = state.ctx.clone();
        let cell = myself.get_cell();
        let spawned = match child {
            Child::Partitioner => {
                Actor::spawn_linked(Some(name), Partitioner, ctx.clone(), cell).await.map(|(r, _)| {
                    *ctx.partitioner.lock().unwrap() = Some(r.clone());
                    r.get_cell()
                })
            }
            Child::Compactor => Actor::spawn_linked(Some(name), Compactor, ctx.clone(), cell).await.map(|(r, _)| {
                *ctx.compactor.lock().unwrap() = Some(r.clone());
                r.get_cell()
            }),
            Child::Ingest => Actor::spawn_linked(Some(name), IngestSupervisor, ctx, cell).await.map(|(r, _)| {
                state.ingest = Some(r.clone());
                r.get_cell()
            }),
        };
        match spawned {
            Ok(cell) => {
                state.children.insert(cell.get_id(), (child, cell));
                Ok(())
            }
            Err(e) => self.child_down(myself, state, child, format!("failed to start: {e}")),
        }
    }

    fn child_down(
        &self,
        myself: &ActorRef<RootMsg>,
        state: &mut RootState,
        child: Child,
        why: String,
    ) -> Result<(), ActorProcessingErr> {
        match child {
            Child::Ingest => state.ingest = None,
            Child::Partitioner => *state.ctx.partitioner.lock().unwrap() = None,
            Child::Compactor => *state.ctx.compactor.lock().unwrap() = None,
        }
        if state.shutting_down {
            return Ok(());
        }
        let sup = &state.ctx.config.supervision;
        let intensity = state.restarts.entry(child).or_insert_with(|| RestartIntensity::new(sup));
        if let Err(count) = intensity.record() {
            tracing::error!(actor = child.label(), reason = %why, "restart intensity exceeded; stopping");
            let reason = format!("gave up after {count} restarts of the {}: {why}", child.label());
            *state.ctx.health.exit_reason.lock().unwrap() = Some(reason.clone());
            state.ctx.health.alive.store(false, Ordering::Relaxed);
            myself.stop(Some(reason));
            return Ok(());
        }
        tracing::warn!(actor = child.label(), reason = %why, "child down; restarting");
        state.ctx.stats.restarts.fetch_add(1, Ordering::Relaxed);
        match child {
            Child::Ingest => state.ctx.stats.ingest_restarts.fetch_add(1, Ordering::Relaxed),
            _ => state.ctx.stats.lake_restarts.fetch_add(1, Ordering::Relaxed),
        };
        metrics::counter!(m::ACTOR_RESTARTS, "actor" => child.label()).increment(1);
        // A short pause lets an old consumer leave the group, or a store blip pass.
        myself.send_after(Duration::from_millis(500), move || RootMsg::Start(child));
        Ok(())
    }

    fn running(state: &RootState, child: Child) -> bool {
        state.children.values().any(|(c, _)| *c == child)
    }
}

impl Actor for RootActor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = Arc<PipelineCtx>;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        ctx: Arc<PipelineCtx>,
    ) -> Result<RootState, ActorProcessingErr> {
        ctx.health.alive.store(true, Ordering::Relaxed);
        let mut children = Vec::new();
        if ctx.config.partitioner.enabled {
            children.push(Child::Partitioner);
        }
        if ctx.config.compactor.enabled {
            children.push(Child::Compactor);
        }
        children.push(Child::Ingest);
        let mut state = RootState {
            ctx,
            ingest: None,
            children: HashMap::new(),
            generation: 0,
            restarts: HashMap::new(),
            shutting_down: false,
        };
        for child in children {
            RootActor.start_child(&myself, &mut state, child).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Start(child) => {
                if !state.shutting_down && !Self::running(state, child) {
                    self.start_child(&myself, state, child).await?;
                }
            }
            RootMsg::Shutdown(reply) => {
                state.shutting_down = true;
                // Ingest first: its drain hands the last files to the partitioner.
                if let Some(ingest) = state.ingest.take() {
                    let timeout = state.ctx.config.shutdown.timeout + Duration::from_secs(5);
                    if let Err(e) = ractor::call_t!(ingest, IngestMsg::Shutdown, timeout.as_millis() as u64) {
                        tracing::warn!(error = %e, "ingest shutdown did not finish in time");
                    }
                }
                for (_, (child, cell)) in state.children.drain() {
                    if child != Child::Ingest {
                        let _ = cell.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10))).await;
                    }
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell.get_id(), reason.unwrap_or_else(|| "stopped".into()))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), format!("failed: {err}")),
            _ => return Ok(()),
        };
        if let Some((child, _)) = state.children.remove(&id) {
            self.child_down(&myself, state, child, why)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dlq(#[from] crate::dlq::DlqError),
    #[error("S3 bucket check failed: {0}")]
    Store(#[from] crate::lake::StoreError),
    #[error("metrics server: {0}")]
    Http(#[from] std::io::Error),
    #[error("supervision tree failed to start: {0}")]
    Spawn(String),
}

/// A running pipeline.
pub struct Pipeline {
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub faults: Arc<Faults>,
    pub http_addr: Option<SocketAddr>,
    root: ActorRef<RootMsg>,
    root_task: tokio::task::JoinHandle<()>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

static INSTANCE_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Starts the daemon's supervision tree and HTTP server.
pub async fn start(config: Config, faults: Arc<Faults>) -> Result<Pipeline, StartError> {
    let handle = m::install();
    let store = LakeStore::new(&config.s3, &config.s3.raw_bucket);
    let table = LakeStore::new(&config.s3, &config.s3.table_bucket);
    let health = Arc::new(Health::default());
    let mut buckets = vec![&store];
    if config.partitioner.enabled {
        buckets.push(&table);
    }
    for b in buckets {
        if config.s3.create_bucket {
            b.ensure_bucket().await?;
            health.s3_ok.store(true, Ordering::Relaxed);
        } else {
            // Not fatal: S3 may come up after us; uploads retry and /readyz tells.
            match b.probe().await {
                Ok(()) => health.s3_ok.store(true, Ordering::Relaxed),
                Err(e) if e.is_retryable() => tracing::warn!(error = %e, "S3 not reachable yet"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    let dlq = DlqProducer::new(&kafka_base_config(&config), &config.kafka.dlq_topic, &config.kafka.topic)?;
    let instance = format!("trstream-{}-{}", std::process::id(), INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed));
    let stats = Arc::new(Stats::default());
    let ctx = Arc::new(PipelineCtx {
        validator: config.validator(),
        config,
        store,
        table,
        dlq,
        stats: stats.clone(),
        health: health.clone(),
        faults: faults.clone(),
        instance: instance.clone(),
        total_buffered: AtomicUsize::new(0),
        total_buffered_records: AtomicUsize::new(0),
        abandon: AtomicBool::new(false),
        owned: Mutex::new(BTreeSet::new()),
        touched: Mutex::new(BTreeMap::new()),
        partitioner: Mutex::new(None),
        compactor: Mutex::new(None),
    });
    let (http_stop, http_rx) = tokio::sync::watch::channel(false);
    let http_addr = match ctx.config.http.listen.as_str() {
        "" => None,
        addr => {
            let addr: SocketAddr = addr.parse().expect("validated in Config::validate");
            Some(m::serve(addr, handle, health.clone(), http_rx).await?)
        }
    };
    let (root, root_handle) = Actor::spawn(Some(format!("{instance}/root")), RootActor, ctx)
        .await
        .map_err(|e| StartError::Spawn(e.to_string()))?;
    let h = health.clone();
    let root_task = tokio::spawn(async move {
        let _ = root_handle.await;
        h.alive.store(false, Ordering::Relaxed);
    });
    tracing::info!(http = ?http_addr, "trstream started");
    Ok(Pipeline { stats, health, faults, http_addr, root, root_task, http_stop })
}

impl Pipeline {
    /// Graceful shutdown (I7): drain, upload, commit, leave the group.
    pub async fn shutdown(self) {
        let timeout = Duration::from_secs(120);
        if let Err(e) = ractor::call_t!(self.root, RootMsg::Shutdown, timeout.as_millis() as u64) {
            tracing::warn!(error = %e, "shutdown request failed");
        }
        let _ = self.root_task.await;
        let _ = self.http_stop.send(true);
    }

    /// Resolves if the supervision tree stops on its own (restart intensity exceeded).
    pub async fn stopped(&mut self) -> String {
        let _ = (&mut self.root_task).await;
        self.health.exit_reason.lock().unwrap().clone().unwrap_or_else(|| "supervision tree stopped".into())
    }
}

/// `trstream run`: start, run until `shutdown` resolves, drain, exit.
/// `faults` is [`Faults::default`] outside the chaos tests.
pub async fn run(config: Config, faults: Arc<Faults>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut pipeline = start(config, faults).await?;
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested; draining");
            pipeline.shutdown().await;
            tracing::info!("shutdown complete");
            Ok(())
        }
        reason = pipeline.stopped() => {
            anyhow::bail!("trstream stopped: {reason}")
        }
    }
}

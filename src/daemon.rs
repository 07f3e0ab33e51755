//! The daemon: its supervision tree's root and its entry points, `start` and `run` (design §5).
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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::config::Config;
use crate::context::{PipelineCtx, RestartIntensity, kafka_base_config};
use crate::faults::Faults;
use crate::ingest::dlq::DlqProducer;
use crate::ingest::{IngestMsg, IngestSupervisor};
use crate::lake::LakeStore;
use crate::metrics::{self as m, Health, Stats};
use crate::table::compactor::Compactor;
use crate::table::partitioner::Partitioner;

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
    /// A lake actor restarted after backoff has run for the restart window without failing: its
    /// backoff ends (if it is still the run of that `generation`).
    Steady(Child, u64),
    Shutdown(RpcReplyPort<()>),
}

pub struct RootState {
    ctx: Arc<PipelineCtx>,
    ingest: Option<ActorRef<IngestMsg>>,
    /// Live children by actor id.
    children: HashMap<ActorId, (Child, ActorCell)>,
    generation: u64,
    restarts: HashMap<Child, RestartIntensity>,
    /// The current delay before restarting a lake actor past its restart intensity. It ends only
    /// once a restart has run for `supervision.restart_window` without failing: a delay longer
    /// than the window would otherwise bring it back within the intensity, and reset it.
    /// With the failures since it began.
    lake_backoff: HashMap<Child, (Duration, u32)>,
    /// The generation each running child was started with.
    started: HashMap<Child, u64>,
    shutting_down: bool,
}

/// A lake actor past `supervision.max_restarts` within `supervision.restart_window` is restarted
/// after this, doubling up to [`LAKE_MAX_BACKOFF`], until a restart has run a whole window
/// without failing.
const LAKE_FIRST_BACKOFF: Duration = Duration::from_secs(5);
const LAKE_MAX_BACKOFF: Duration = Duration::from_secs(300);

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
                state.started.insert(child, state.generation);
                if state.lake_backoff.contains_key(&child) {
                    let generation = state.generation;
                    myself.send_after(state.ctx.config.supervision.restart_window, move || {
                        RootMsg::Steady(child, generation)
                    });
                }
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
        if let Some(fatal) = state.ctx.health.fatal.lock().unwrap().take() {
            // Restarting would meet it again (and with static membership, fence the other member).
            tracing::error!(actor = child.label(), reason = %fatal, "unrecoverable failure; stopping");
            let reason = format!("the {} met a failure no restart can mend: {fatal}", child.label());
            *state.ctx.health.exit_reason.lock().unwrap() = Some(reason.clone());
            state.ctx.health.alive.store(false, Ordering::Relaxed);
            myself.stop(Some(reason));
            return Ok(());
        }
        let sup = &state.ctx.config.supervision;
        let intensity = state.restarts.entry(child).or_insert_with(|| RestartIntensity::new(sup));
        let over = intensity.record();
        let backing_off = state.lake_backoff.contains_key(&child);
        if matches!(child, Child::Partitioner | Child::Compactor) && (over.is_err() || backing_off) {
            // I10: the lake actors never take ingestion down with them. raw-data is the source of
            // truth; a lake actor that keeps failing is retried less and less often, for ever.
            let (delay, failures) = *state
                .lake_backoff
                .entry(child)
                .and_modify(|(d, n)| (*d, *n) = ((*d * 2).min(LAKE_MAX_BACKOFF), *n + 1))
                .or_insert((LAKE_FIRST_BACKOFF, 1));
            tracing::error!(actor = child.label(), retry_in = ?delay, failures, reason = %why,
                "keeps failing; ingestion goes on, and it is restarted with backoff");
            // True for as long as it shows: while the actor waits, and while it runs again until
            // a whole restart window has passed without failing.
            state.ctx.health.set_lake_failing(
                child.label(),
                format!(
                    "backed off {} before restarting (restart {failures} past the limit) after: {why}",
                    humantime::format_duration(delay)
                ),
            );
            metrics::gauge!(m::LAKE_BACKOFF, "actor" => child.label()).set(delay.as_secs_f64());
            state.ctx.stats.restarts.fetch_add(1, Ordering::Relaxed);
            state.ctx.stats.lake_restarts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => child.label()).increment(1);
            myself.send_after(delay, move || RootMsg::Start(child));
            return Ok(());
        }
        if let Err(count) = over {
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
            lake_backoff: HashMap::new(),
            started: HashMap::new(),
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
            RootMsg::Steady(child, generation) => {
                if Self::running(state, child) && state.started.get(&child) == Some(&generation) {
                    state.lake_backoff.remove(&child);
                    state.ctx.health.clear_lake_failing(child.label());
                    metrics::gauge!(m::LAKE_BACKOFF, "actor" => child.label()).set(0.0);
                    tracing::info!(actor = child.label(), "running again without failing; its restart backoff ends");
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
    Dlq(#[from] crate::ingest::dlq::DlqError),
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
    /// `None` once [`Pipeline::stopped`] has seen it end.
    root_task: Option<tokio::task::JoinHandle<()>>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

static INSTANCE_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Starts the daemon's supervision tree and HTTP server.
pub async fn start(config: Config, faults: Arc<Faults>) -> Result<Pipeline, StartError> {
    let handle = m::install();
    // Watching from the start, so that a stall before the first fence check counts too.
    crate::stall::Stalls::get();
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
    let dlq = DlqProducer::new(
        &kafka_base_config(&config),
        &config.kafka.dlq_topic,
        &config.kafka.topic,
        &config.kafka.incarnation,
    )?;
    let instance = format!("trstream-{}-{}", std::process::id(), INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed));
    // I9: which kind of store this is decides how exact the fence of watermarks and intents is.
    let conditional = match store.honours_conditional_writes().await {
        Ok(true) => {
            tracing::info!(
                bucket = store.bucket(),
                "the store honours conditional writes: owner records, watermarks and intents are written conditionally"
            );
            true
        }
        Ok(false) => {
            tracing::warn!(
                bucket = store.bucket(),
                "the store ignores conditional writes (Garage does): writers are fenced by a check before each write only, and a write that lands late is repaired by the table side (supervision.md, known limits)"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not probe the store for conditional writes; assuming it ignores them");
            false
        }
    };
    metrics::gauge!(m::STORE_CONDITIONAL_WRITES).set(if conditional { 1.0 } else { 0.0 });
    if config.kafka.exactly_once {
        tracing::info!(
            dlq = %config.kafka.dlq_topic,
            "kafka.exactly_once: each flush's dead letters and offset commit are one transaction (transactional ids {}.{}.<partition>); read the DLQ with isolation.level=read_committed",
            config.kafka.group_id,
            config.lake_topic()
        );
    } else {
        tracing::warn!(
            dlq = %config.kafka.dlq_topic,
            "kafka.exactly_once is off: offsets are committed by the consumer and the DLQ is at-least-once (deduplicate it on source_partition and source_offset)"
        );
    }
    metrics::gauge!(m::KAFKA_EXACTLY_ONCE).set(if config.kafka.exactly_once { 1.0 } else { 0.0 });
    let ctx = Arc::new(PipelineCtx::new(config, store, table, dlq, health.clone(), faults.clone(), instance.clone()));
    ctx.conditional_writes.store(conditional, Ordering::Relaxed);
    let stats = ctx.stats.clone();
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
    Ok(Pipeline { stats, health, faults, http_addr, root, root_task: Some(root_task), http_stop })
}

impl Pipeline {
    /// Graceful shutdown (I7): drain, upload, commit, leave the group.
    pub async fn shutdown(self) {
        let timeout = Duration::from_secs(120);
        if let Err(e) = ractor::call_t!(self.root, RootMsg::Shutdown, timeout.as_millis() as u64) {
            tracing::warn!(error = %e, "shutdown request failed");
        }
        if let Some(task) = self.root_task {
            let _ = task.await;
        }
        let _ = self.http_stop.send(true);
    }

    /// Resolves if the supervision tree stops on its own (restart intensity exceeded).
    pub async fn stopped(&mut self) -> String {
        if let Some(task) = self.root_task.as_mut() {
            let _ = task.await;
            self.root_task = None;
        }
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

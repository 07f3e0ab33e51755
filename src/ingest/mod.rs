//! The ingest subtree (design §5): IngestSupervisor, the ConsumerDriver thread it owns, one
//! PartitionWorker per assigned partition, and the DLQ producer they share.
//!
//! IngestSupervisor is one_for_one over its workers: a failed worker is restarted through the
//! driver, which pauses its partition and seeks it back to the commit first (I3). A worker over
//! its restart intensity, or a driver that exits, stops the supervisor, and Root restarts the
//! whole subtree with a fresh consumer.

pub mod consumer_driver;
pub mod dlq;
pub mod incarnation;
pub mod partition_worker;
pub mod txn;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use crate::config::Config;
use crate::context::{PipelineCtx, RestartIntensity};
use crate::lake::Fenced;
use crate::metrics as m;
use consumer_driver::{DriverCmd, DriverContext};

pub type Consumer = BaseConsumer<DriverContext>;

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
        let health = ctx.health.clone();
        let thread = std::thread::Builder::new()
            .name("trstream-consumer".into())
            .spawn(move || {
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| consumer_driver::run(consumer, rx)));
                let why = match res {
                    Ok(None) => "stopped".to_string(),
                    Ok(Some(fatal)) => {
                        *health.fatal.lock().unwrap() = Some(fatal.clone());
                        fatal
                    }
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
            let fenced = if err.downcast_ref::<Fenced>().is_some() {
                Some("raw")
            } else if err.downcast_ref::<txn::TxnFenced>().is_some() {
                Some("offset_commit")
            } else {
                None
            };
            if let Some(kind) = fenced {
                // Not a fault to restart: the partition is another instance's now (I9).
                tracing::warn!(partition, error = %err, "partition worker fenced");
                metrics::counter!(m::ZOMBIE_WRITES_REFUSED, "kind" => kind).increment(1);
                state.ctx.stats.zombie_writes_refused.fetch_add(1, Ordering::Relaxed);
                let _ = state.cmds.send(DriverCmd::Fenced { partition, worker: cell.get_id() });
                return Ok(());
            }
            let stopped = match (err.downcast_ref::<incarnation::WentBack>(), err.downcast_ref::<dlq::DlqRefused>()) {
                // Not a fault to restart either: the log is not the one this worker read, or the
                // DLQ refuses a dead letter whatever the number of tries (a restart would spin).
                (Some(went_back), _) => Some(went_back.0.clone()),
                (_, Some(refused)) => Some(refused.to_string()),
                _ => None,
            };
            if let Some(reason) = stopped {
                let _ = state.cmds.send(DriverCmd::Stopped { partition, worker: cell.get_id(), reason });
                return Ok(());
            }
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

//! Exactly-once dead letters (issue 11, part 4): with `kafka.exactly_once`, a flush's dead
//! letters and its offset commit are one Kafka transaction.
//!
//! Each partition has a transactional producer of its own, `transactional.id =
//! <group_id>.<lake topic>.<partition>`, started by the partition's recovery. A flush uploads the
//! raw file (its footer lists the window's dead letters, [`dlq::META_DEAD_LETTERS`]) and then
//! runs one transaction: the dead letters, then the offset commit
//! (`send_offsets_to_transaction`, with the consumer's group metadata, KIP-447). Hence:
//!
//! - a `read_committed` reader of the DLQ sees a dead letter once its offset is committed, and
//!   only once: a transaction that did not commit is aborted and its records are read again;
//! - starting the producer aborts whatever transaction an earlier owner of the partition left
//!   open and fences that owner (a newer epoch of the same transactional id): its later dead
//!   letters and commits are refused by the broker, whatever its clock or the store says. The
//!   recovery reads the committed offset only after that, so the offset it reads is final;
//! - a file that was uploaded but whose transaction aborted is adopted by the next recovery,
//!   which sends its dead letters again, from the footer, in the transaction that commits past it
//!   (see the partition worker's redo).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::Config;
use crate::ingest::Consumer;
use crate::ingest::dlq::{self, DeadLetter, DlqProducer};
use crate::metrics as m;

/// A partition's transactional producer.
pub struct FlushTxn {
    producer: FutureProducer,
    id: String,
    dlq: DlqProducer,
    topic: String,
    partition: i32,
    timeout: Duration,
}

/// The broker refused this instance's transaction: a newer producer of the partition's
/// transactional id has started, so another instance (or a later recovery) owns it now.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "partition {partition}: a newer producer of transactional id {id} has started, so another instance owns the partition now; this instance commits nothing more of it ({detail})"
)]
pub struct TxnFenced {
    pub partition: i32,
    pub id: String,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error(transparent)]
    Fenced(#[from] TxnFenced),
    /// A dead letter the DLQ refuses for good: the transaction was aborted, the partition parks.
    #[error(transparent)]
    Refused(#[from] dlq::DlqRefused),
    #[error("{0}")]
    Failed(String),
}

impl FlushTxn {
    /// `<group_id>.<lake topic>.<partition>`: one per partition of one deployment's lake, so the
    /// partition's next owner fences its last one.
    pub fn transactional_id(config: &Config, partition: i32) -> String {
        format!("{}.{}.{partition}", config.kafka.group_id, config.lake_topic())
    }

    /// Creates the partition's producer and starts its transactional id, which aborts the
    /// transaction an earlier producer of it left open and fences that producer. Blocking (up to
    /// `kafka.request_timeout` and the broker's own retries).
    pub fn start(
        base: &ClientConfig,
        dlq: &DlqProducer,
        config: &Config,
        partition: i32,
    ) -> Result<FlushTxn, TxnError> {
        let id = Self::transactional_id(config, partition);
        let timeout = config.kafka.request_timeout;
        let producer: FutureProducer = dlq::producer_config(base)
            .set("transactional.id", &id)
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
            .set("linger.ms", "5")
            .create()
            .map_err(|e| TxnError::Failed(format!("creating the transactional producer {id}: {e}")))?;
        retrying(|| producer.init_transactions(timeout)).map_err(|e| {
            TxnError::Failed(format!(
                "starting transactional id {id} failed: {e}. kafka.exactly_once needs a broker with transactions (Apache Kafka 2.5 or later, Redpanda); for one without (librdkafka's mock cluster), set kafka.exactly_once = false"
            ))
        })?;
        Ok(FlushTxn { producer, id, dlq: dlq.clone(), topic: config.kafka.topic.clone(), partition, timeout })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// One transaction: `letters` to the DLQ and `next` as the partition's committed offset.
    /// An abortable failure (a delivery refused, the coordinator moved, the group rebalanced) is
    /// aborted and the whole transaction tried again, with capped exponential backoff, until
    /// `give_up`. A dead letter whose size the DLQ topic refused is cut to its first bytes for the
    /// next try ([`DeadLetter::truncated_for`]).
    pub async fn commit(
        self: &Arc<Self>,
        letters: &mut [DeadLetter],
        next: i64,
        consumer: &Arc<Consumer>,
        (initial_backoff, max_backoff): (Duration, Duration),
        give_up: impl Fn() -> bool,
    ) -> Result<(), TxnError> {
        let mut wait = initial_backoff;
        // After the DLQ topic refused a batch for its size, each dead letter is sent alone and
        // acknowledged before the next: librdkafka does not split a refused batch, so letters that
        // each fit the topic but not together would be refused together for ever.
        let mut one_by_one = false;
        loop {
            let (err, deliveries, mut park) = match self.try_commit(letters, next, consumer, one_by_one).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Abort(e, deliveries)) => (e, deliveries, None),
                Err(Attempt::Park(r, deliveries)) => (r.to_string(), deliveries, Some(r)),
            };
            metrics::counter!(m::TXN_ABORTS).increment(1);
            tracing::warn!(partition = self.partition, transactional_id = %self.id, next_offset = next, dead_letters = letters.len(), error = %err, retry_in = ?wait, "transaction failed; aborting it");
            let this = self.clone();
            let aborted = tokio::task::spawn_blocking(move || this.producer.abort_transaction(this.timeout))
                .await
                .map_err(|e| TxnError::Failed(format!("abort task failed: {e}")))?;
            if let Err(e) = aborted {
                return Err(self.classify(&e, "aborting the transaction"));
            }
            // Which deliveries failed, and why (the abort has purged what was in flight, so every
            // future has resolved). A batch refused for its size fails every letter in it, so
            // none is cut yet: they go alone next time, and one refused alone is cut then.
            // A refusal no retry changes (a permission, the topic's policy) parks the partition;
            // a size refusal of a batch is only final for a letter sent alone.
            for (i, f) in deliveries.into_iter().enumerate() {
                let Some(f) = f else { continue };
                if let Ok(Err((de, _))) = f.await {
                    // Batch-level size refusals too: each letter sent alone may fit.
                    let size = matches!(
                        de.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::MessageSizeTooLarge
                                | RDKafkaErrorCode::MessageBatchTooLarge
                                | RDKafkaErrorCode::InvalidMessageSize
                        )
                    );
                    one_by_one |= size;
                    if !size && park.is_none() && dlq::refused_for_good(&de) {
                        park = Some(letters[i].refused(self.dlq.topic(), &de));
                    }
                }
            }
            if let Some(refused) = park {
                metrics::counter!(m::DLQ_ERRORS).increment(1);
                return Err(TxnError::Refused(refused));
            }
            if give_up() {
                return Err(TxnError::Failed(format!(
                    "the transaction committing offset {next} of partition {} was abandoned at shutdown: {err}",
                    self.partition
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max_backoff);
        }
    }

    async fn try_commit(
        self: &Arc<Self>,
        letters: &mut [DeadLetter],
        next: i64,
        consumer: &Arc<Consumer>,
        one_by_one: bool,
    ) -> Result<(), Attempt> {
        self.producer.begin_transaction().map_err(|e| Attempt::Fatal(self.classify(&e, "beginning a transaction")))?;
        let mut deliveries = Vec::with_capacity(letters.len());
        let mut refused = None;
        for d in letters.iter_mut() {
            match self.send(d).await {
                Ok(f) if one_by_one => match f.await {
                    Ok(Ok(_)) => deliveries.push(None),
                    Ok(Err((e, _))) => {
                        if !cut_if_too_large(d, &e) && d.refused_for_good(&e) {
                            return Err(Attempt::Park(d.refused(self.dlq.topic(), &e), deliveries));
                        }
                        return Err(Attempt::Abort(format!("a dead letter was refused: {e}"), deliveries));
                    }
                    Err(_) => return Err(Attempt::Abort("a dead letter's delivery was cancelled".into(), deliveries)),
                },
                Ok(f) => deliveries.push(Some(f)),
                Err(e) => {
                    // Refused before it left (its size, a full queue): cut it if that helps.
                    if !cut_if_too_large(d, &e) && d.refused_for_good(&e) {
                        return Err(Attempt::Park(d.refused(self.dlq.topic(), &e), deliveries));
                    }
                    deliveries.push(None);
                    refused.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(Attempt::Abort(format!("a dead letter was refused: {e}"), deliveries));
        }
        let Some(cgm) = consumer.group_metadata() else {
            return Err(Attempt::Abort("the consumer has no group metadata (not in its group)".into(), deliveries));
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(next))
            .map_err(|e| Attempt::Fatal(TxnError::Failed(e.to_string())))?;
        let this = self.clone();
        let committed = tokio::task::spawn_blocking(move || {
            retrying(|| this.producer.send_offsets_to_transaction(&tpl, &cgm, this.timeout))?;
            retrying(|| this.producer.commit_transaction(this.timeout))
        })
        .await
        .map_err(|e| Attempt::Fatal(TxnError::Failed(format!("commit task failed: {e}"))))?;
        match committed {
            Ok(()) => Ok(()),
            Err(e) => match self.classify(&e, "committing the transaction") {
                fenced @ TxnError::Fenced(_) => Err(Attempt::Fatal(fenced)),
                failed if is_fatal(&e) => Err(Attempt::Fatal(failed)),
                _ => Err(Attempt::Abort(e.to_string(), deliveries)),
            },
        }
    }

    /// Queues one dead letter. A full producer queue (more dead letters in one window than
    /// `queue.buffering.max.messages`) is waited out while deliveries drain it, for up to
    /// `kafka.request_timeout` without room, instead of failing the transaction: the same
    /// letters would fill it again on every try.
    async fn send(&self, d: &DeadLetter) -> rdkafka::error::KafkaResult<rdkafka::producer::DeliveryFuture> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match self.dlq.send_on(&self.producer, d) {
                Err(e)
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                r => return r,
            }
        }
    }

    /// A refusal that means another producer of the transactional id has started is
    /// [`TxnFenced`]; anything else a failure.
    fn classify(&self, e: &KafkaError, doing: &str) -> TxnError {
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fenced,
            ) => TxnError::Fenced(TxnFenced {
                partition: self.partition,
                id: self.id.clone(),
                detail: format!("{doing}: {e}"),
            }),
            _ => TxnError::Failed(format!("transactional id {}: {doing} failed: {e}", self.id)),
        }
    }
}

/// librdkafka's default: how long the broker keeps a transaction open without its producer.
/// A new owner's start aborts the last owner's open transaction at once (its recovery reads the
/// committed offset only after the start: read before, it would wait for this timeout), so this
/// only bounds a transaction left open by an instance that stopped for good with nobody taking
/// its partition.
const TRANSACTION_TIMEOUT_MS: &str = "60000";

enum Attempt {
    /// Abort the transaction and try again; the deliveries tell which dead letter failed.
    Abort(String, Vec<Option<rdkafka::producer::DeliveryFuture>>),
    /// Abort the transaction and park the partition: a dead letter is refused for good.
    Park(dlq::DlqRefused, Vec<Option<rdkafka::producer::DeliveryFuture>>),
    /// The producer cannot go on: the worker stops (fenced) or fails (and its recovery starts a
    /// new producer).
    Fatal(TxnError),
}

/// A dead letter whose size the DLQ topic refused goes as its prefix on the next try
/// ([`DeadLetter::truncated_for`]).
fn cut_if_too_large(d: &mut DeadLetter, e: &KafkaError) -> bool {
    match d.truncated_for(e) {
        Some(t) => {
            *d = t;
            true
        }
        None => false,
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}

/// Calls `op` again while librdkafka says its error is retriable (a timeout, a coordinator being
/// loaded), a few times.
fn retrying(mut op: impl FnMut() -> rdkafka::error::KafkaResult<()>) -> rdkafka::error::KafkaResult<()> {
    let mut left = 5;
    loop {
        match op() {
            Err(KafkaError::Transaction(t)) if t.is_retriable() && left > 0 => {
                left -= 1;
                tracing::debug!(error = %t, "retriable transaction error; trying again");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

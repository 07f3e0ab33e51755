//! The dead-letter queue: invalid records go to `kafka.dlq_topic` with their original key and
//! bytes and headers naming why and where from.
//!
//! I1 covers dead-lettered offsets too. With `kafka.exactly_once` (the default) a flush's dead
//! letters and its offset commit are one Kafka transaction ([`crate::ingest::txn`]): a
//! `read_committed` reader of the DLQ sees each dead letter once. Without it a worker keeps every
//! DLQ send of the current flush and commits past them only once each is acknowledged; a failed
//! delivery is re-sent. That DLQ is at-least-once: a crash after the acknowledgement and before
//! the commit re-sends the record, so its readers deduplicate on (`source_partition`,
//! `source_offset`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::record::{RejectReason, Rejection};

pub const HEADER_REASON: &str = "reason";
pub const HEADER_DETAIL: &str = "detail";
pub const HEADER_SOURCE_TOPIC: &str = "source_topic";
pub const HEADER_SOURCE_PARTITION: &str = "source_partition";
pub const HEADER_SOURCE_OFFSET: &str = "source_offset";
/// `kafka.incarnation`, when set: which incarnation of the source topic the offset is of.
pub const HEADER_SOURCE_INCARNATION: &str = "source_incarnation";
/// Set when the DLQ topic refused the record's size: the payload is its first
/// [`TRUNCATED_PAYLOAD_BYTES`] bytes and this header holds the original length. The whole record
/// is still in the source topic at `source_partition`/`source_offset`.
pub const HEADER_PAYLOAD_TRUNCATED_FROM: &str = "payload_truncated_from";
pub const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;
/// The largest record the consumer can be handed (librdkafka's `receive.message.max.bytes`):
/// the DLQ producer accepts as much, so that an oversized record keeps its bytes.
const MAX_DLQ_MESSAGE_BYTES: &str = "100000000";

/// Set when the record's key was longer than [`MAX_KEY_BYTES`]: the DLQ record has no key and
/// this header holds the key's length. The key is still in the source topic at the offset named.
pub const HEADER_KEY_DROPPED_BYTES: &str = "key_dropped_bytes";
/// The longest key a dead letter keeps. Keys are user ids (64 characters at most when valid); a
/// longer one would count against the DLQ topic's record size, where no cut of the payload helps.
pub const MAX_KEY_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("DLQ producer could not be created: {0}")]
pub struct DlqError(#[from] rdkafka::error::KafkaError);

/// The DLQ refused a dead letter in a way that sending it again cannot change (its size after the
/// cut, a missing permission, a record the topic's policy refuses). The partition is parked: its
/// records stay in the source topic, nothing past the offset is committed, `/readyz` names it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "partition {partition}: the DLQ topic {topic} refuses the dead letter of offset {offset} ({reason}) for good: {error}. The partition is parked: nothing of it past that offset is committed until the cause is fixed (for a size refusal, raise the topic's max.message.bytes above {TRUNCATED_PAYLOAD_BYTES} bytes; for an authorization refusal, grant the daemon's principal Write on the topic) and the partition is assigned again (restart the daemon)"
)]
pub struct DlqRefused {
    pub partition: i32,
    pub offset: i64,
    pub topic: String,
    pub reason: String,
    pub error: String,
}

/// Whether `err`, the DLQ's answer to a dead letter, means sending the same record again will be
/// refused again. A size refusal counts once the payload is cut ([`DeadLetter::truncated_for`]).
pub fn refused_for_good(err: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as E;
    matches!(
        err.rdkafka_error_code(),
        Some(
            E::MessageSizeTooLarge
                | E::InvalidMessageSize
                | E::MessageBatchTooLarge
                | E::InvalidRecord
                | E::InvalidRequiredAcks
                | E::PolicyViolation
                | E::TopicAuthorizationFailed
                | E::ClusterAuthorizationFailed
                | E::TransactionalIdAuthorizationFailed
        )
    )
}

/// What became of a dead letter that was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Refused(#[from] DlqRefused),
    #[error("DLQ write for offset {offset} abandoned at shutdown: {error}")]
    Abandoned { offset: i64, error: rdkafka::error::KafkaError },
    #[error("the DLQ producer for re-sends could not be created: {0}")]
    Producer(rdkafka::error::KafkaError),
}

/// One invalid record, kept until its DLQ write is acknowledged.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub rejection: Rejection,
    pub source_partition: i32,
    pub source_offset: i64,
    /// The payload's original length, when the DLQ refused its size (see
    /// [`HEADER_PAYLOAD_TRUNCATED_FROM`]).
    pub truncated_from: Option<usize>,
}

/// What every producer of dead letters sets on top of the user's Kafka properties.
pub fn producer_config(base: &ClientConfig) -> ClientConfig {
    let mut config = base.clone();
    if config.get("compression.type").is_none() {
        // Dead letters include oversized records: compressing them keeps the DLQ small.
        config.set("compression.type", "lz4");
    }
    if config.get("message.max.bytes").is_none() {
        config.set("message.max.bytes", MAX_DLQ_MESSAGE_BYTES);
    }
    config
}

impl DeadLetter {
    /// The [`DlqRefused`] for this letter, refused with `err`.
    pub fn refused(&self, topic: &str, err: &rdkafka::error::KafkaError) -> DlqRefused {
        DlqRefused {
            partition: self.source_partition,
            offset: self.source_offset,
            topic: topic.to_string(),
            reason: self.rejection.reason.as_str().to_string(),
            error: err.to_string(),
        }
    }

    /// Whether the DLQ's refusal `err` is final for this letter: nothing left to cut, and a
    /// refusal no retry changes.
    pub fn refused_for_good(&self, err: &rdkafka::error::KafkaError) -> bool {
        refused_for_good(err) && self.truncated_for_quiet(err).is_none()
    }

    fn truncated_for_quiet(&self, err: &rdkafka::error::KafkaError) -> Option<usize> {
        let len = self.payload.as_ref().map_or(0, Vec::len);
        (self.truncated_from.is_none()
            && len > TRUNCATED_PAYLOAD_BYTES
            && err.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge))
        .then_some(len)
    }

    /// The same dead letter with its payload cut to [`TRUNCATED_PAYLOAD_BYTES`], when `err` says
    /// the DLQ topic refused its size and cutting it helps.
    pub fn truncated_for(&self, err: &rdkafka::error::KafkaError) -> Option<DeadLetter> {
        let len = self.truncated_for_quiet(err)?;
        // The DLQ topic takes smaller records than the source topic: keep the reason, the source
        // coordinates and a prefix rather than stall the partition for ever.
        tracing::warn!(partition = self.source_partition, offset = self.source_offset, bytes = len, error = %err,
            "the DLQ topic refused the record's size; dead-lettering its first {TRUNCATED_PAYLOAD_BYTES} bytes");
        let mut t = self.clone();
        t.payload.as_mut().unwrap().truncate(TRUNCATED_PAYLOAD_BYTES);
        t.truncated_from = Some(len);
        Some(t)
    }
}

/// The raw file's footer entry listing the offsets of its window that were dead-lettered, with
/// why (exactly-once mode only). Those dead letters are committed with the window's offsets, in
/// one transaction, after the upload: when the file is adopted (uploaded, never committed), the
/// worker sends them again from this list, so that a file never stands for offsets whose dead
/// letters went nowhere. A file without the entry (written at-least-once, or before) had its
/// dead letters acknowledged before its upload.
pub const META_DEAD_LETTERS: &str = "trstream.dead_letters";

/// One entry of [`META_DEAD_LETTERS`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterNote {
    pub offset: i64,
    pub reason: String,
    pub detail: String,
}

/// The [`META_DEAD_LETTERS`] value of a window's dead letters.
pub fn dead_letter_notes(letters: &[DeadLetter]) -> String {
    let notes: Vec<DeadLetterNote> = letters
        .iter()
        .map(|d| DeadLetterNote {
            offset: d.source_offset,
            reason: d.rejection.reason.as_str().to_string(),
            detail: d.rejection.detail.clone(),
        })
        .collect();
    serde_json::to_string(&notes).expect("dead letter notes serialize")
}

/// Reads a [`META_DEAD_LETTERS`] value back, per offset.
pub fn parse_dead_letter_notes(value: &str) -> Result<std::collections::BTreeMap<i64, Rejection>, String> {
    let notes: Vec<DeadLetterNote> =
        serde_json::from_str(value).map_err(|e| format!("{META_DEAD_LETTERS} is not a list of dead letters: {e}"))?;
    notes
        .into_iter()
        .map(|n| {
            let reason = RejectReason::parse(&n.reason)
                .ok_or_else(|| format!("{META_DEAD_LETTERS}: unknown reason {:?} at offset {}", n.reason, n.offset))?;
            Ok((n.offset, Rejection { reason, detail: n.detail }))
        })
        .collect()
}

#[derive(Clone)]
pub struct DlqProducer {
    producer: FutureProducer,
    /// The producer of [`DlqProducer::send_acked`]: one letter per batch. The broker judges a
    /// batch against the DLQ topic's `max.message.bytes`, and librdkafka fails every letter of a
    /// refused batch without splitting it, so two letters that each fit, batched together by the
    /// shared producer (two partitions' workers, one linger), are refused together. A refusal
    /// here is the letter's own, and only then is it final (a partition parked). Made at its
    /// first use: with `kafka.exactly_once` letters go through the partitions' transactional
    /// producers and this one is never needed.
    alone: Arc<OnceLock<FutureProducer>>,
    alone_config: ClientConfig,
    topic: String,
    source_topic: String,
    /// `kafka.incarnation` (empty: no header).
    source_incarnation: String,
}

impl DlqProducer {
    pub fn new(
        base: &ClientConfig,
        topic: &str,
        source_topic: &str,
        source_incarnation: &str,
    ) -> Result<DlqProducer, DlqError> {
        let config = producer_config(base)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .clone();
        let producer: FutureProducer = config.create()?;
        let alone_config = config.clone().set("batch.num.messages", "1").set("linger.ms", "0").clone();
        Ok(DlqProducer {
            producer,
            alone: Arc::new(OnceLock::new()),
            alone_config,
            topic: topic.to_string(),
            source_topic: source_topic.to_string(),
            source_incarnation: source_incarnation.to_string(),
        })
    }

    /// Enqueues one record; the future resolves when the broker acknowledges (or gives up).
    pub fn send(&self, dl: &DeadLetter) -> Result<DeliveryFuture, rdkafka::error::KafkaError> {
        self.send_on(&self.producer, dl)
    }

    /// [`DlqProducer::send`] on another producer: a partition's transactional one.
    pub fn send_on(
        &self,
        producer: &FutureProducer,
        dl: &DeadLetter,
    ) -> Result<DeliveryFuture, rdkafka::error::KafkaError> {
        let partition = dl.source_partition.to_string();
        let offset = dl.source_offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_REASON, value: Some(dl.rejection.reason.as_str()) })
            .insert(Header { key: HEADER_DETAIL, value: Some(dl.rejection.detail.as_str()) })
            .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(self.source_topic.as_str()) })
            .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_str()) });
        let original = dl.truncated_from.map(|n| n.to_string());
        let headers = match &original {
            Some(n) => headers.insert(Header { key: HEADER_PAYLOAD_TRUNCATED_FROM, value: Some(n.as_str()) }),
            None => headers,
        };
        let key = dl.key.as_deref().filter(|k| k.len() <= MAX_KEY_BYTES);
        let dropped = dl.key.as_ref().filter(|_| key.is_none()).map(|k| k.len().to_string());
        let headers = match &dropped {
            Some(n) => headers.insert(Header { key: HEADER_KEY_DROPPED_BYTES, value: Some(n.as_str()) }),
            None => headers,
        };
        let headers = match self.source_incarnation.as_str() {
            "" => headers,
            label => headers.insert(Header { key: HEADER_SOURCE_INCARNATION, value: Some(label) }),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = &dl.payload {
            record = record.payload(p.as_slice());
        }
        producer.send_result(record).map_err(|(e, _)| e)
    }

    /// The DLQ topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends alone and waits for the acknowledgement, retrying with backoff until acknowledged,
    /// refused for good ([`DeadLetter::refused_for_good`]) or `give_up` says stop. Used for
    /// re-sends; the hot path pipelines [`DlqProducer::send`].
    pub async fn send_acked(
        &self,
        dl: &DeadLetter,
        backoff: Duration,
        max_backoff: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), SendError> {
        let alone = match self.alone.get() {
            Some(alone) => alone,
            None => {
                // Not kept when it fails: the next send tries again.
                let _ = self.alone.set(self.alone_config.create().map_err(SendError::Producer)?);
                self.alone.get().expect("set just above, by this send or another")
            }
        };
        let mut wait = backoff;
        let mut truncated = None;
        loop {
            let err = match self.send_on(alone, truncated.as_ref().unwrap_or(dl)) {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err((e, _))) => e,
                    Err(_) => rdkafka::error::KafkaError::Canceled,
                },
                Err(e) => e,
            };
            metrics::counter!(crate::metrics::DLQ_ERRORS).increment(1);
            if truncated.is_none()
                && let Some(t) = dl.truncated_for(&err)
            {
                truncated = Some(t);
                continue;
            }
            let sent = truncated.as_ref().unwrap_or(dl);
            if sent.refused_for_good(&err) {
                return Err(sent.refused(&self.topic, &err).into());
            }
            tracing::warn!(partition = dl.source_partition, offset = dl.source_offset, error = %err, "DLQ delivery failed, retrying");
            if give_up() {
                return Err(SendError::Abandoned { offset: dl.source_offset, error: err });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_notes_round_trip_and_name_a_bad_reason() {
        let letter = |offset, reason| DeadLetter {
            key: None,
            payload: Some(b"{".to_vec()),
            rejection: Rejection { reason, detail: format!("detail of {offset}") },
            source_partition: 3,
            source_offset: offset,
            truncated_from: None,
        };
        let letters = [letter(7, RejectReason::MalformedJson), letter(9, RejectReason::UnknownCurrency)];
        let parsed = parse_dead_letter_notes(&dead_letter_notes(&letters)).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[&7], letters[0].rejection);
        assert_eq!(parsed[&9], letters[1].rejection);
        assert!(parse_dead_letter_notes(&dead_letter_notes(&[])).unwrap().is_empty());
        let err = parse_dead_letter_notes(r#"[{"offset":4,"reason":"gremlins","detail":""}]"#).unwrap_err();
        assert!(err.contains("\"gremlins\"") && err.contains("offset 4"), "{err}");
    }
}

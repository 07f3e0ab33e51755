//! The dead-letter queue: invalid records go to `kafka.dlq_topic` with their original key and
//! bytes and headers naming why and where from.
//!
//! I1 covers dead-lettered offsets too: a worker keeps every DLQ send it has made for the current
//! flush and commits past them only once each is acknowledged; a failed delivery is re-sent.
//! The DLQ is at-least-once: a crash after the acknowledgement and before the commit re-sends
//! the record, so consumers of the DLQ deduplicate on (`source_partition`, `source_offset`).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::record::Rejection;

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

#[derive(Debug, thiserror::Error)]
#[error("DLQ producer could not be created: {0}")]
pub struct DlqError(#[from] rdkafka::error::KafkaError);

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

#[derive(Clone)]
pub struct DlqProducer {
    producer: FutureProducer,
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
        let mut config = base.clone();
        if config.get("compression.type").is_none() {
            // Dead letters include oversized records: compressing them keeps the DLQ small.
            config.set("compression.type", "lz4");
        }
        if config.get("message.max.bytes").is_none() {
            config.set("message.max.bytes", MAX_DLQ_MESSAGE_BYTES);
        }
        let producer: FutureProducer = config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(DlqProducer {
            producer,
            topic: topic.to_string(),
            source_topic: source_topic.to_string(),
            source_incarnation: source_incarnation.to_string(),
        })
    }

    /// Enqueues one record; the future resolves when the broker acknowledges (or gives up).
    pub fn send(&self, dl: &DeadLetter) -> Result<DeliveryFuture, rdkafka::error::KafkaError> {
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
        let headers = match self.source_incarnation.as_str() {
            "" => headers,
            label => headers.insert(Header { key: HEADER_SOURCE_INCARNATION, value: Some(label) }),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &dl.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &dl.payload {
            record = record.payload(p.as_slice());
        }
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Sends and waits for the acknowledgement, retrying with backoff until acknowledged or
    /// `give_up` says stop. Used for re-sends; the hot path pipelines [`DlqProducer::send`].
    pub async fn send_acked(
        &self,
        dl: &DeadLetter,
        backoff: Duration,
        max_backoff: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let mut wait = backoff;
        let mut truncated = None;
        loop {
            let err = match self.send(truncated.as_ref().unwrap_or(dl)) {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err((e, _))) => e,
                    Err(_) => rdkafka::error::KafkaError::Canceled,
                },
                Err(e) => e,
            };
            metrics::counter!(crate::metrics::DLQ_ERRORS).increment(1);
            let len = dl.payload.as_ref().map_or(0, Vec::len);
            if truncated.is_none()
                && len > TRUNCATED_PAYLOAD_BYTES
                && err.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
            {
                // The DLQ topic takes smaller records than the source topic: keep the reason, the
                // source coordinates and a prefix rather than stall the partition for ever.
                tracing::warn!(partition = dl.source_partition, offset = dl.source_offset, bytes = len, error = %err,
                    "the DLQ topic refused the record's size; dead-lettering its first {TRUNCATED_PAYLOAD_BYTES} bytes");
                let mut t = dl.clone();
                t.payload.as_mut().unwrap().truncate(TRUNCATED_PAYLOAD_BYTES);
                t.truncated_from = Some(len);
                truncated = Some(t);
                continue;
            }
            tracing::warn!(partition = dl.source_partition, offset = dl.source_offset, error = %err, "DLQ delivery failed, retrying");
            if give_up() {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max_backoff);
        }
    }
}

//! Which incarnation of the topic the lake's offsets belong to (issue 11, part 3).
//!
//! A topic deleted and re-created under the same name, or a daemon pointed at another cluster
//! with the same buckets, starts its offsets again at 0. Left alone, the recovery scan would
//! adopt the old incarnation's highest raw file and the worker would skip every new record up to
//! it as "already in the lake", then commit past them: silent loss. Two checks stop that:
//!
//! - **The topic id** (KIP-516), asked of the broker with librdkafka's `DescribeTopics` at every
//!   recovery and written into each raw file's metadata (`trstream.source.topic_id`). The
//!   highest raw file of a partition naming another id is another incarnation's. A broker that
//!   gives no id (an all-zero one) leaves only the next check.
//! - **The log end**: a committed offset, or an adopted file's end, beyond the partition's log
//!   end cannot be of this log.
//!
//! Either stops the partition ([`Reused`]) with an error naming the topic, partition and offsets
//! and saying what to do; `kafka.incarnation` chooses to ingest the new log under names of its
//! own instead (`Config::lake_topic`).

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::consumer::Consumer as _;

use crate::ingest::Consumer;
use crate::lake::RawFileName;

/// Parquet key of the topic id a raw file was read from.
pub const META_TOPIC_ID: &str = "trstream.source.topic_id";

/// The broker's id of `topic`; `None` where the broker gives none (an all-zero id). The request
/// (a Metadata request) goes to `broker`, any broker of the cluster: librdkafka sends it to the
/// controller otherwise, which some brokers (librdkafka's mock cluster) never name.
pub fn topic_id<C: rdkafka::ClientContext>(
    client: &Client<C>,
    topic: &str,
    broker: i32,
    timeout: Duration,
) -> Result<Option<uuid::Uuid>, String> {
    let name = CString::new(topic).map_err(|_| format!("topic name {topic:?} holds a NUL byte"))?;
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: every handle made here is destroyed here, after the last use of what it owns;
    // the event's descriptions are read before the event is destroyed.
    unsafe {
        let rk = client.native_ptr();
        let queue = rd::rd_kafka_queue_new(rk);
        let mut names = [name.as_ptr()];
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let options = rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS);
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(options, ms, errstr.as_mut_ptr(), errstr.len());
        rd::rd_kafka_AdminOptions_set_broker(options, broker, errstr.as_mut_ptr(), errstr.len());
        rd::rd_kafka_DescribeTopics(rk, topics, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, ms.saturating_add(1_000));
        let result = if event.is_null() {
            Err(format!("describing topic {topic}: no answer within {}", humantime::format_duration(timeout)))
        } else if rd::rd_kafka_event_error(event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let msg = CStr::from_ptr(rd::rd_kafka_event_error_string(event)).to_string_lossy();
            Err(format!("describing topic {topic}: {msg}"))
        } else {
            let res = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut n = 0usize;
            let descs = rd::rd_kafka_DescribeTopics_result_topics(res, &mut n);
            let mut found = Err(format!("describing topic {topic}: the broker did not describe it"));
            for i in 0..n {
                let d = *descs.add(i);
                let err = rd::rd_kafka_TopicDescription_error(d);
                if !err.is_null() && rd::rd_kafka_error_code(err) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    let msg = CStr::from_ptr(rd::rd_kafka_error_string(err)).to_string_lossy();
                    found = Err(format!("describing topic {topic}: {msg}"));
                    continue;
                }
                let id = rd::rd_kafka_TopicDescription_topic_id(d);
                found = Ok(if id.is_null() {
                    None
                } else {
                    let (hi, lo) =
                        (rd::rd_kafka_Uuid_most_significant_bits(id), rd::rd_kafka_Uuid_least_significant_bits(id));
                    Some(uuid::Uuid::from_u64_pair(hi as u64, lo as u64)).filter(|u| !u.is_nil())
                });
            }
            found
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(topics);
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}

/// What the broker says of one partition now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogNow {
    pub topic_id: Option<uuid::Uuid>,
    /// The partition's log end (high watermark): the next offset to be written.
    pub log_end: i64,
}

/// Asks the broker for the topic id and the partition's log end (blocking requests).
pub fn log_now(consumer: &Consumer, topic: &str, p: i32, timeout: Duration) -> Result<LogNow, String> {
    let md =
        consumer.fetch_metadata(Some(topic), timeout).map_err(|e| format!("fetching the metadata of {topic}: {e}"))?;
    let leader = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().find(|x| x.id() == p))
        .map(|x| x.leader())
        .filter(|&l| l >= 0)
        .or_else(|| md.brokers().first().map(|b| b.id()))
        .ok_or_else(|| format!("the metadata of {topic} names no broker"))?;
    let topic_id = topic_id(consumer.client(), topic, leader, timeout)?;
    let (_, log_end) = consumer
        .fetch_watermarks(topic, p, timeout)
        .map_err(|e| format!("fetching the log end of {topic}/{p}: {e}"))?;
    Ok(LogNow { topic_id, log_end })
}

/// A worker's error when a record arrives below the offset it started from: the log went back
/// under it (the topic was re-created while it ran, and librdkafka reset its position).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct WentBack(pub String);

/// Why a partition's log cannot be the one the lake and the group's offsets were made from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Reused(pub String);

/// The owner record (or this instance's own claim) was made under `recorded`, another topic id
/// than the log's now.
pub fn other_topic_id(topic: &str, p: i32, recorded: uuid::Uuid, now: LogNow) -> Reused {
    Reused(format!(
        "partition {topic}/{p}: the partition was claimed under topic id {recorded}, but {topic} is topic id {} now \
         (log end {}): {WHAT_TO_DO}",
        now.topic_id.map_or_else(|| "none".to_string(), |u| u.to_string()),
        now.log_end
    ))
}

const WHAT_TO_DO: &str = "the topic was deleted and re-created, or this daemon points at another Kafka cluster than \
    the one the lake was made from. Nothing of this partition is read, written or committed until then. To \
    ingest the new log beside the old one, set kafka.incarnation to a new label (its files are then named \
    <topic>~<label>+…); to ingest it over the old lake instead, delete the old incarnation's files first. \
    If the group's committed offsets are the old ones too, reset them (or use a new kafka.group_id).";

/// Checks the recovery scan's findings against the log: the highest raw file (`latest`, with the
/// topic id it records, if any) and the committed offset must belong to this incarnation.
pub fn check(
    topic: &str,
    p: i32,
    now: LogNow,
    committed: Option<i64>,
    latest: Option<(&RawFileName, Option<uuid::Uuid>)>,
) -> Result<(), Reused> {
    if let (Some((file, Some(file_id))), Some(id)) = (latest, now.topic_id)
        && file_id != id
    {
        return Err(Reused(format!(
            "partition {topic}/{p}: raw file {file} was read from topic id {file_id}, but {topic} is topic id {id} \
             now (log end {}): {WHAT_TO_DO}",
            now.log_end
        )));
    }
    if let Some((file, _)) = latest
        && file.last_offset >= now.log_end
    {
        return Err(Reused(format!(
            "partition {topic}/{p}: raw-data holds offsets up to {} (file {file}), but the log ends at {}: {WHAT_TO_DO}",
            file.last_offset, now.log_end
        )));
    }
    if let Some(c) = committed
        && c > now.log_end
    {
        return Err(Reused(format!(
            "partition {topic}/{p}: the group committed offset {c}, but the log ends at {}: {WHAT_TO_DO}",
            now.log_end
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(first: i64, last: i64) -> RawFileName {
        RawFileName { topic: "transactions".into(), partition: 3, first_offset: first, last_offset: last }
    }

    #[test]
    fn a_lake_or_a_commit_beyond_the_log_end_or_another_topic_id_is_refused() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let now = |id, end| LogNow { topic_id: id, log_end: end };
        let f = file(100, 199);
        // This incarnation: the file and the commit are inside the log.
        assert_eq!(check("transactions", 3, now(Some(a), 500), Some(200), Some((&f, Some(a)))), Ok(()));
        assert_eq!(check("transactions", 3, now(Some(a), 200), Some(200), Some((&f, Some(a)))), Ok(()));
        // Files from before topic ids were recorded, or a broker without ids: offsets only.
        assert_eq!(check("transactions", 3, now(None, 500), None, Some((&f, Some(a)))), Ok(()));
        assert_eq!(check("transactions", 3, now(Some(a), 500), None, Some((&f, None))), Ok(()));
        assert_eq!(check("transactions", 3, now(Some(a), 0), None, None), Ok(()));

        let e = check("transactions", 3, now(Some(b), 5_000), Some(200), Some((&f, Some(a)))).unwrap_err();
        assert!(
            e.0.contains("partition transactions/3") && e.0.contains(&a.to_string()) && e.0.contains(&b.to_string()),
            "{e}"
        );
        assert!(e.0.contains("kafka.incarnation"), "says what to do: {e}");
        let e = check("transactions", 3, now(None, 150), None, Some((&f, Some(a)))).unwrap_err();
        assert!(e.0.contains("offsets up to 199") && e.0.contains("log ends at 150"), "{e}");
        let e = check("transactions", 3, now(Some(a), 199), None, Some((&f, Some(a)))).unwrap_err();
        assert!(e.0.contains("log ends at 199"), "the file's last offset must be below the end: {e}");
        let e = check("transactions", 3, now(Some(a), 20), Some(200), None).unwrap_err();
        assert!(e.0.contains("committed offset 200") && e.0.contains("log ends at 20"), "{e}");
    }
}

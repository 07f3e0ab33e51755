//! Partition ownership in the store: the fence of I9.
//!
//! Kafka gives a partition to one member of the group at a time, but a member that stalls past
//! its session timeout (a GC-like pause, a frozen VM, `docker pause`, a network partition) does
//! not know it has lost its partitions until it wakes, and then goes on with the flush or merge it
//! was in. So every owner writes, on assignment, the next *epoch* of the partition into
//! `_trstream/owners/<topic>/partition=<p>.json` in the raw bucket (a conditional write where the
//! store honours them, so two claims never both win), and checks before each write of that
//! partition (raw file, table files, watermark, intent) that the record still holds its epoch.
//! A claim checked within the last `kafka.session_timeout / 3` is trusted without a request:
//! the group moves a partition only after its member's session expired, which is at least
//! `session_timeout - heartbeat interval` after the member's last heartbeat, and librdkafka
//! requires the heartbeat interval below the session timeout (Kafka's minimum session is 6 s, its
//! default heartbeat 3 s), so a claim checked that recently cannot have been superseded yet.
//! A process that was stopped finds, on waking, a check older than that and asks the store; and
//! since its session may have expired while it was stopped, so that the next owner may claim a
//! moment after that check, it trusts no check for a session timeout after the stall
//! ([`crate::stall`]): every write asks the store.
//!
//! What remains: a write whose check passed and that was then held up past the new owner's claim
//! (a PUT in flight when the process froze, or a request that lands after its client gave up).
//! Those are the late writes the overlap-tolerant table side absorbs (supervision.md).

use serde::{Deserialize, Serialize};

/// The owner record of one Kafka partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub topic: String,
    pub partition: i32,
    /// Grows by one with every assignment of the partition to any instance.
    pub epoch: u64,
    /// The instance that claimed it (`trstream-<pid>-<n>@<host>`), for operators.
    pub instance: String,
    /// Random, per claim (I9): tells apart two claims of one epoch on a store that ignores
    /// conditional writes.
    #[serde(default)]
    pub token: String,
    pub claimed_at: String,
    /// The topic id (KIP-516) the claiming instance read the partition from, where the broker
    /// gives one: a later claim under another id is another incarnation of the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
}

/// `_trstream/owners/<topic>/partition=<p>.json`, in the raw bucket (the one bucket every
/// deployment has); outside the raw files' `<prefix>/partition=` layout.
pub fn owner_key(topic: &str, partition: i32) -> String {
    format!("{}/owners/{topic}/partition={partition}.json", super::table::META_DIR)
}

/// A write refused because another instance claimed the partition since this one did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "partition {partition} was claimed by {owner} (epoch {current}) after this instance's claim (epoch {mine}): \
     this instance writes nothing more of it until it is assigned the partition again"
)]
pub struct Fenced {
    pub partition: i32,
    pub mine: u64,
    pub current: u64,
    pub owner: String,
}

/// Why a fence check did not pass.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FenceError {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// This instance has not claimed the partition (yet): its assignment is still in progress.
    #[error("partition {0} is not claimed by this instance")]
    Unclaimed(i32),
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_live_under_the_bookkeeping_prefix_and_round_trip() {
        let key = owner_key("transactions", 7);
        assert_eq!(key, "_trstream/owners/transactions/partition=7.json");
        assert!(crate::lake::RawFileName::parse(&key).is_none());
        let r = OwnerRecord {
            topic: "transactions".into(),
            partition: 7,
            epoch: 3,
            instance: "trstream-1-0@h".into(),
            token: "t".into(),
            claimed_at: "2026-11-27T00:00:00Z".into(),
            topic_id: Some("2171e556-8657-407d-b81c-7723c868e008".into()),
        };
        assert_eq!(serde_json::from_slice::<OwnerRecord>(&serde_json::to_vec(&r).unwrap()).unwrap(), r);
        // A record of an earlier version, without a topic id, still reads.
        let old = r#"{"topic":"transactions","partition":7,"epoch":3,"instance":"i","token":"t","claimed_at":"x"}"#;
        assert_eq!(serde_json::from_str::<OwnerRecord>(old).unwrap().topic_id, None);
        let f = Fenced { partition: 7, mine: 3, current: 4, owner: "trstream-2-0@g".into() };
        assert!(f.to_string().contains("partition 7 was claimed by trstream-2-0@g (epoch 4)"), "{f}");
    }
}

//! The table side (design §3): the Partitioner turns committed raw files into the
//! Hive-partitioned table `tb-transactions`, the Compactor merges its small files. Both work only
//! on the Kafka partitions this instance owns (I5) and recover from the store alone: the
//! Partitioner from its watermarks, the Compactor from its intents (I6).

pub mod compactor;
pub mod partitioner;

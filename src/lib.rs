//! trstream: a supervised Kafka → Parquet → S3 ingestion daemon for financial transactions.
//!
//! The design brief (`design.md`) names the parts; each has its module here:
//! [`record`] (the transaction and its validation), [`partition_worker`] (buffer, flush,
//! upload, commit), [`consumer_driver`] (the rdkafka consumer and rebalances), [`pipeline`]
//! (the supervision tree and `run`), [`partitioner`] and [`compactor`] (the Hive-partitioned
//! table), [`lake`] (file names, Parquet, S3), [`dlq`], [`metrics`], [`config`], [`faults`] (tests only),
//! plus the tools
//! around the daemon: [`produce`], [`embedded`], [`demo`], [`bench`], [`audit`].

pub mod audit;
pub mod bench;
pub mod compactor;
pub mod config;
pub mod consumer_driver;
pub mod demo;
pub mod dlq;
pub mod embedded;
pub mod faults;
pub mod lake;
pub mod metrics;
pub mod partition_worker;
pub mod partitioner;
pub mod pipeline;
pub mod produce;
pub mod record;

pub use config::Config;
pub use faults::{FaultPoint, Faults};
pub use pipeline::{Pipeline, run, start};

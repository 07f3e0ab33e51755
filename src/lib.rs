//! trstream: a supervised Kafka → Parquet → S3 ingestion daemon for financial transactions.
//!
//! The design brief (`design.md`) names the parts; the modules are its rooms:
//! [`daemon`] (Root, the supervision tree, `start` and `run`), [`context`] (what every actor of
//! one daemon shares), [`ingest`] (IngestSupervisor, the consumer driver, partition workers, the
//! DLQ), [`table`] (partitioner and compactor), [`lake`] (file names, Parquet, S3, table layout),
//! [`record`] (the transaction and its validation), [`config`], [`metrics`], [`faults`] (tests
//! only), [`stall`] (notices a stopped process, for the fence), and [`tools`], the user's commands beside the daemon (produce, audit, demo, bench,
//! embedded Kafka and S3).

pub mod config;
pub mod context;
pub mod daemon;
pub mod faults;
pub mod ingest;
pub mod lake;
pub mod metrics;
pub mod record;
pub mod stall;
pub mod table;
pub mod tools;

pub use config::Config;
pub use daemon::{Pipeline, run, start};
pub use faults::{FaultPoint, Faults};
pub use ingest::dlq;
pub use tools::{audit, bench, demo, embedded, produce};

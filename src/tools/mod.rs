//! The user's commands beside the daemon (design §8): `produce` (synthetic transactions),
//! `audit` (the reconciliation of I1 and I2), `demo` and `bench` (everything in one process), and
//! `embedded` (the in-process Kafka and S3 they run on).

pub mod audit;
pub mod bench;
pub mod demo;
pub mod embedded;
pub mod produce;

//! The lake (design §3): how raw files are named, encoded and stored.
//!
//! `keys` fixes a file's name from the offsets it holds, so a re-upload is the same object (I2);
//! `parquet` encodes a flush with the logical types of design §2; `store` talks to S3 with a
//! conditional create and the listing the recovery scan (I2) relies on.

pub mod keys;
pub mod parquet;
pub mod store;

pub use keys::RawFileName;
pub use store::{LakeStore, PutOutcome, StoreError};

//! The lake (design §3): how raw files are named, encoded and stored.
//!
//! `keys` fixes a file's name from the offsets it holds, so a re-upload is the same object (I2);
//! `parquet` encodes a flush with the logical types of design §2; `store` talks to S3 with a
//! conditional create and the listing the recovery scan (I2) relies on.

pub mod keys;
pub mod parquet;
pub mod store;
pub mod table;

pub use keys::RawFileName;
pub use store::{LakeStore, ObjectInfo, PutOutcome, StoreError};
pub use table::HivePartition;

/// Why a unit of partitioner or compactor work failed: the store (retry if
/// [`StoreError::is_retryable`]), or anything else (a bug or a corrupt file: escalate).
#[derive(Debug)]
pub enum WorkError {
    Store(StoreError),
    Other(String),
}

impl WorkError {
    /// The store error to retry after a backoff, or (`Err`) what must fail the actor.
    pub fn retryable(self) -> Result<StoreError, String> {
        match self {
            WorkError::Store(e) if e.is_retryable() => Ok(e),
            WorkError::Store(e) => Err(e.to_string()),
            WorkError::Other(e) => Err(e),
        }
    }
}

impl From<StoreError> for WorkError {
    fn from(e: StoreError) -> Self {
        WorkError::Store(e)
    }
}

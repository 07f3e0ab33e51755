//! The lake (design §3): how raw files are named, encoded and stored.
//!
//! `keys` fixes a file's name from the offsets it holds, so a re-upload is the same object (I2);
//! `parquet` encodes a flush with the logical types of design §2; `store` talks to S3 with a
//! conditional create and the listing the recovery scan (I2) relies on.

pub mod keys;
pub mod owners;
pub mod parquet;
pub mod quarantine;
pub mod store;
pub mod table;

pub use keys::RawFileName;
pub use owners::{FenceError, Fenced};
pub use store::{CondPut, LakeStore, Multipart, ObjectInfo, Precondition, PutOutcome, StoreError};
pub use table::HivePartition;

/// Why a unit of partitioner or compactor work failed: the store (retry if
/// [`StoreError::is_retryable`]), or anything else (a bug or a corrupt file: escalate).
#[derive(Debug)]
pub enum WorkError {
    Store(StoreError),
    /// Another instance claimed the partition (I9): let go of it.
    Fenced(Fenced),
    /// A conditional write was refused: the watermark changed since it was read, or an intent
    /// of that name exists. Read the state again (after a backoff) before going on.
    Refused(String),
    Other(String),
}

impl WorkError {
    /// The store error to retry after a backoff, or (`Err`) what must fail the actor.
    pub fn retryable(self) -> Result<StoreError, String> {
        match self {
            WorkError::Store(e) if e.is_retryable() => Ok(e),
            WorkError::Store(e) => Err(e.to_string()),
            WorkError::Refused(e) => {
                Ok(StoreError::Retryable { op: "conditional write", target: String::new(), detail: e })
            }
            WorkError::Fenced(f) => Err(f.to_string()),
            WorkError::Other(e) => Err(e),
        }
    }
}

impl From<FenceError> for WorkError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Fenced(f) => WorkError::Fenced(f),
            // The assignment is still writing its claim: try again shortly.
            FenceError::Unclaimed(p) => WorkError::Store(StoreError::Retryable {
                op: "fence check",
                target: format!("partition {p}"),
                detail: "not claimed by this instance yet".into(),
            }),
            FenceError::Store(e) => WorkError::Store(e),
        }
    }
}

impl From<StoreError> for WorkError {
    fn from(e: StoreError) -> Self {
        WorkError::Store(e)
    }
}

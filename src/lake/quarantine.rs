//! Quarantine (I10): an object of the lake that cannot be read, or does not belong, is moved
//! aside instead of failing its reader on every restart.
//!
//! A raw file, table file, watermark or compaction intent that does not decode (truncated,
//! garbage, a schema no version can read) would fail the partitioner or compactor each time it
//! met it, and with it the restart intensity. Instead it is copied to
//! `_trstream/quarantine/<its key>` in the same bucket, with `<its key>.reason.json` beside it
//! (what it was, why, when, by which instance), then deleted. Copy first, delete last: a crash in
//! between leaves the original, which is quarantined again. `_trstream/` is under no reader's
//! `year=*/**` glob and no listing of raw files, so nothing reads a quarantined object by
//! accident; `trstream audit` lists them. Counted in `trstream_objects_quarantined_total{kind}`,
//! logged at ERROR with the key.
//!
//! What becomes of the data depends on the kind (supervision.md, "Poison objects"): a raw file's
//! rows leave the table's reach (its records are still in Kafka, within retention); a table
//! file is rebuilt from the raw files under it; a watermark or an intent is bookkeeping that is
//! rebuilt (the partition partitioned again from its start, the overlaps repaired) or dropped.

use serde::{Deserialize, Serialize};

use crate::context::PipelineCtx;
use crate::lake::{LakeStore, StoreError};
use crate::metrics as m;

/// Where quarantined objects go, in the bucket they came from.
pub const PREFIX: &str = "_trstream/quarantine/";
const NOTE_SUFFIX: &str = ".reason.json";

/// What was quarantined (the metric's `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Table,
    Watermark,
    Intent,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Table => "table",
            Kind::Watermark => "watermark",
            Kind::Intent => "intent",
        }
    }
}

/// The reason file beside a quarantined object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The object's key before it was moved (the copy is under [`PREFIX`] + this).
    pub key: String,
    pub kind: String,
    pub reason: String,
    pub bytes: u64,
    pub quarantined_at: String,
    pub instance: String,
}

/// Where the copy of `key` goes.
pub fn copy_key(key: &str) -> String {
    format!("{PREFIX}{key}")
}

/// Where the reason for `key` goes.
pub fn note_key(key: &str) -> String {
    format!("{PREFIX}{key}{NOTE_SUFFIX}")
}

/// What decoding an object (and reading it again when that failed) found.
pub enum Reread<T> {
    /// It decodes (at the first reading, or at the second: that transfer went wrong).
    Decodes(T),
    /// It fails again: poison, with the bytes of the second reading and why.
    Poison { body: bytes::Bytes, why: String },
    /// It is gone (another writer moved or replaced it meanwhile).
    Gone,
}

/// `body`, the object `key` as read, decoded; when that fails, the object read once more and
/// decoded again: an object is poison only when it fails twice, so that a transfer cut on its
/// way is never taken for a bad object. The partitioner (raw files) and the recovery (a raw file
/// to adopt) come through here; the compactor, whose first decode is part of a merge, through
/// [`read_again`].
pub async fn decode_twice<T: Send + 'static>(
    store: &LakeStore,
    key: &str,
    body: bytes::Bytes,
    decode: impl Fn(bytes::Bytes) -> Result<T, String> + Clone + Send + 'static,
) -> Result<Reread<T>, StoreError> {
    match off_thread(body, decode.clone()).await {
        Ok(t) => Ok(Reread::Decodes(t)),
        Err(first) => read_again(store, key, &first, decode).await,
    }
}

/// The second reading of `key`, which did not decode (`first`, why); see [`decode_twice`].
pub async fn read_again<T: Send + 'static>(
    store: &LakeStore,
    key: &str,
    first: &str,
    decode: impl FnOnce(bytes::Bytes) -> Result<T, String> + Send + 'static,
) -> Result<Reread<T>, StoreError> {
    tracing::warn!(bucket = store.bucket(), key, error = first, "an object does not decode; reading it again");
    let Some(body) = store.get_opt(key).await? else { return Ok(Reread::Gone) };
    Ok(match off_thread(body.clone(), decode).await {
        Ok(t) => Reread::Decodes(t),
        Err(why) => Reread::Poison { body, why },
    })
}

/// `decode(body)` off the async threads; a decoder that panics (on a bad file) counts as one that
/// does not decode, so that the object is quarantined instead of failing its reader for ever.
async fn off_thread<T: Send + 'static>(
    body: bytes::Bytes,
    decode: impl FnOnce(bytes::Bytes) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || decode(body)).await.unwrap_or_else(|e| Err(format!("the decoder failed: {e}")))
}

/// Moves `key` (whose bytes are `body`) of `store` aside with `reason`. The caller has checked
/// its fence: this deletes the original.
pub async fn quarantine(
    ctx: &PipelineCtx,
    store: &LakeStore,
    key: &str,
    body: bytes::Bytes,
    kind: Kind,
    reason: &str,
) -> Result<(), StoreError> {
    set_aside(ctx, store, key, body, kind, reason).await?;
    store.delete(key).await
}

/// Copies `key` aside with `reason`, leaving the original in place: for an object that is about
/// to be replaced (a table file rebuilt under its own key), so that nothing is ever deleted
/// before its replacement exists.
pub async fn set_aside(
    ctx: &PipelineCtx,
    store: &LakeStore,
    key: &str,
    body: bytes::Bytes,
    kind: Kind,
    reason: &str,
) -> Result<(), StoreError> {
    let note = Note {
        key: key.to_string(),
        kind: kind.as_str().to_string(),
        reason: reason.to_string(),
        bytes: body.len() as u64,
        quarantined_at: chrono::Utc::now().to_rfc3339(),
        instance: ctx.instance.clone(),
    };
    store.put(&copy_key(key), body, "application/octet-stream").await?;
    let json = serde_json::to_vec_pretty(&note).expect("a quarantine note serializes");
    store.put(&note_key(key), bytes::Bytes::from(json), "application/json").await?;
    ctx.stats.quarantined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!(m::OBJECTS_QUARANTINED, "kind" => kind.as_str()).increment(1);
    tracing::error!(
        bucket = store.bucket(),
        key,
        kind = kind.as_str(),
        reason,
        "quarantined an object that cannot be read; moved to {PREFIX} with its reason, work goes on"
    );
    Ok(())
}

/// The notes of every object quarantined in `store`.
pub async fn notes(store: &LakeStore) -> Result<Vec<Note>, StoreError> {
    let mut out = Vec::new();
    for key in store.list_keys(PREFIX, None).await? {
        if !key.ends_with(NOTE_SUFFIX) {
            continue;
        }
        let body = store.get(&key).await?;
        let note = serde_json::from_slice(&body).unwrap_or_else(|e| Note {
            key: key[PREFIX.len()..key.len() - NOTE_SUFFIX.len()].to_string(),
            kind: "unknown".into(),
            reason: format!("(the reason file is not readable: {e})"),
            bytes: 0,
            quarantined_at: String::new(),
            instance: String::new(),
        });
        out.push(note);
    }
    Ok(out)
}

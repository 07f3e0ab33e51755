//! The S3 side of the lake: conditional create, listing for the recovery scan, bucket checks.
//!
//! Errors say whether a retry can help ([`StoreError::is_retryable`]): a 5xx, a timeout or a
//! refused connection is an outage to wait out (I4 keeps memory bounded meanwhile); a 403 or a
//! missing bucket is for an operator, so the caller escalates. A 412 on the conditional create
//! means the file is already there: success, not an error (design §3).

use std::ops::ControlFlow;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;

use crate::config::S3Config;
use crate::lake::keys::{self, RawFileName};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the store is down, slow or overloaded.
    #[error("S3 {op} {target} failed, will retry: {detail}")]
    Retryable { op: &'static str, target: String, detail: String },
    /// Not worth retrying: credentials, a missing bucket, a malformed request.
    #[error("S3 {op} {target} failed: {detail}")]
    Fatal { op: &'static str, target: String, detail: String },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Retryable { .. })
    }
}

/// What a conditional create did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// `If-None-Match: *` answered 412: an earlier attempt already uploaded this exact name.
    AlreadyExists,
}

/// The precondition of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// `If-None-Match: *`: no object has the key.
    Absent,
    /// `If-Match: <etag>`: the object is still the one last read or written.
    Matches(String),
}

/// What a conditional write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CondPut {
    /// Written; the new object's ETag, when the store gives one.
    Written(Option<String>),
    /// 412: the object is not what the writer expected (another writer got there first).
    Refused,
}

fn classify<E, R>(op: &'static str, target: &str, err: &SdkError<E, R>, status: Option<u16>) -> StoreError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = match err {
        SdkError::ServiceError(se) => format!("{} (HTTP {})", se.err(), status.unwrap_or(0)),
        other => format!("{}", aws_smithy_types::error::display::DisplayErrorContext(other)),
    };
    let target = target.to_string();
    let retryable = match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(_) => matches!(status, Some(408 | 429) | Some(500..=599) | None),
        _ => false,
    };
    if retryable { StoreError::Retryable { op, target, detail } } else { StoreError::Fatal { op, target, detail } }
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// One bucket of the lake.
#[derive(Clone)]
pub struct LakeStore {
    client: Client,
    bucket: String,
}

impl LakeStore {
    pub fn new(cfg: &S3Config, bucket: &str) -> LakeStore {
        let creds = Credentials::new(&cfg.access_key_id, &cfg.secret_access_key, None, None, "trstream-config");
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .endpoint_url(&cfg.endpoint)
            .credentials_provider(creds)
            .force_path_style(cfg.force_path_style)
            // Our own loop retries with backoff for as long as it takes; the SDK only smooths blips.
            .retry_config(RetryConfig::standard().with_max_attempts(2))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3).min(cfg.request_timeout))
                    .operation_timeout(cfg.request_timeout)
                    .build(),
            )
            // Plain Content-MD5-free PUTs: every S3-compatible store accepts them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        LakeStore { client: Client::from_conf(conf), bucket: bucket.to_string() }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Uploads `body` under `key` only if no object has that key (`If-None-Match: *`).
    pub async fn put_if_absent(&self, key: &str, body: bytes::Bytes) -> Result<PutOutcome, StoreError> {
        let res = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_type("application/vnd.apache.parquet")
            .body(ByteStream::from(body))
            .send()
            .await;
        match res {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(412) {
                    Ok(PutOutcome::AlreadyExists)
                } else {
                    Err(classify("PutObject", key, &e, status))
                }
            }
        }
    }

    /// Uploads `body` under `key`, replacing any object there. Used only where the name is
    /// derived from the content's source, so a replacement writes the same rows again.
    pub async fn put(&self, key: &str, body: bytes::Bytes, content_type: &str) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let status = e.raw_response().map(|r| r.status().as_u16());
                classify("PutObject", key, &e, status)
            })
    }

    /// Uploads `body` under `key` if `pre` holds (I9). A store that ignores preconditions
    /// (Garage 2.5) always writes; [`LakeStore::honours_conditional_writes`] tells which.
    pub async fn put_conditional(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &str,
        pre: &Precondition,
    ) -> Result<CondPut, StoreError> {
        let req = self.client.put_object().bucket(&self.bucket).key(key).content_type(content_type);
        let req = match pre {
            Precondition::Absent => req.if_none_match("*"),
            Precondition::Matches(etag) => req.if_match(etag),
        };
        match req.body(ByteStream::from(body)).send().await {
            Ok(out) => Ok(CondPut::Written(out.e_tag)),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(412) { Ok(CondPut::Refused) } else { Err(classify("PutObject", key, &e, status)) }
            }
        }
    }

    /// The object at `key` with its ETag, or `None` when there is none.
    pub async fn get_with_etag(&self, key: &str) -> Result<Option<(bytes::Bytes, Option<String>)>, StoreError> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => {
                let etag = out.e_tag.clone();
                let body = out.body.collect().await.map_err(|e| StoreError::Retryable {
                    op: "GetObject",
                    target: key.to_string(),
                    detail: e.to_string(),
                })?;
                Ok(Some((body.into_bytes(), etag)))
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(404) { Ok(None) } else { Err(classify("GetObject", key, &e, status)) }
            }
        }
    }

    /// Whether the store refuses a conditional create of a key that exists and a replacement
    /// under a stale ETag, as MinIO, AWS S3 and s3s-fs do (Garage 2.5 overwrites). Probed once
    /// at start-up with a throw-away key; an error answer counts as "no".
    pub async fn honours_conditional_writes(&self) -> Result<bool, StoreError> {
        let key = format!("{}/probe/{}.json", crate::lake::table::META_DIR, uuid::Uuid::new_v4());
        let first = self.put_conditional(&key, "{}".into(), "application/json", &Precondition::Absent).await?;
        let second = self.put_conditional(&key, "{}".into(), "application/json", &Precondition::Absent).await?;
        let stale = Precondition::Matches("\"00000000000000000000000000000000\"".into());
        let third = self.put_conditional(&key, "{}".into(), "application/json", &stale).await;
        self.delete(&key).await?;
        Ok(matches!(first, CondPut::Written(_)) && second == CondPut::Refused && third? == CondPut::Refused)
    }

    /// Deletes `key`. Idempotent: deleting a key that is not there (S3 answers 204, some stores
    /// 404) is success, so a retry or a second recovery is harmless.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(404) { Ok(()) } else { Err(classify("DeleteObject", key, &e, status)) }
            }
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(404) { Ok(false) } else { Err(classify("HeadObject", key, &e, status)) }
            }
        }
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get_opt(&self, key: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => {
                let body = out.body.collect().await.map_err(|e| StoreError::Retryable {
                    op: "GetObject",
                    target: key.to_string(),
                    detail: e.to_string(),
                })?;
                Ok(Some(body.into_bytes()))
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(404) { Ok(None) } else { Err(classify("GetObject", key, &e, status)) }
            }
        }
    }

    /// Every key under `prefix` strictly after `start_after`, in lexical order.
    pub async fn list_keys(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<String>, StoreError> {
        Ok(self.list_objects(prefix, start_after).await?.into_iter().map(|o| o.key).collect())
    }

    /// Every object (key and size) under `prefix` strictly after `start_after`, in lexical order.
    /// For a listing that may be long (it grows with the lake), [`LakeStore::list_paged`].
    pub async fn list_objects(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut all = Vec::new();
        self.list_paged(prefix, start_after, |page| {
            all.extend(page);
            ControlFlow::Continue(())
        })
        .await?;
        Ok(all)
    }

    /// The objects under `prefix` strictly after `start_after`, in lexical order, a page (up to
    /// 1,000, the store's page) at a time: `each` takes every page and says whether to go on. The
    /// listing holds one page, however long it is (I4).
    pub async fn list_paged(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        mut each: impl FnMut(Vec<ObjectInfo>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix);
            if let Some(sa) = start_after {
                req = req.start_after(sa);
            }
            if let Some(t) = &token {
                req = req.continuation_token(t);
            }
            let out = req.send().await.map_err(|e| {
                let status = e.raw_response().map(|r| r.status().as_u16());
                classify("ListObjectsV2", prefix, &e, status)
            })?;
            let page = out
                .contents()
                .iter()
                .filter_map(|o| {
                    Some(ObjectInfo { key: o.key()?.to_string(), size: o.size().unwrap_or(0).max(0) as u64 })
                })
                .collect();
            if each(page).is_break() {
                return Ok(());
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }

    /// The recovery scan of I2: the raw file with the highest last offset among those whose first
    /// offset is at or after `from_offset` (the committed offset), i.e. uploaded but perhaps not
    /// committed. `None` when nothing past the commit exists. With the file's size in bytes.
    pub async fn latest_raw_file(
        &self,
        raw_prefix: &str,
        topic: &str,
        partition: i32,
        from_offset: Option<i64>,
    ) -> Result<Option<(RawFileName, u64)>, StoreError> {
        let prefix = keys::partition_prefix(raw_prefix, partition);
        let marker = from_offset.map(|o| keys::start_after_for(raw_prefix, topic, partition, o));
        let mut latest: Option<(RawFileName, u64)> = None;
        self.list_paged(&prefix, marker.as_deref(), |page| {
            let files = page.into_iter().filter_map(|o| Some((RawFileName::parse(&o.key)?, o.size)));
            for (n, size) in files.filter(|(n, _)| n.topic == topic && n.partition == partition) {
                if latest.as_ref().is_none_or(|(l, _)| n.last_offset >= l.last_offset) {
                    latest = Some((n, size));
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
        Ok(latest)
    }

    /// The bytes of the object at `key` from `start` to its end; `None` when there is no such
    /// object. An explicit start rather than a suffix range: s3s-fs fails a suffix longer than
    /// the object. A start past the end (the object is shorter than listed: replaced since)
    /// reads it whole.
    async fn get_from(&self, key: &str, start: u64) -> Result<Option<bytes::Bytes>, StoreError> {
        let range = format!("bytes={start}-");
        match self.client.get_object().bucket(&self.bucket).key(key).range(range).send().await {
            Ok(out) => Ok(Some(
                out.body
                    .collect()
                    .await
                    .map_err(|e| StoreError::Retryable { op: "GetObject", target: key.into(), detail: e.to_string() })?
                    .into_bytes(),
            )),
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                Some(404) => Ok(None),
                Some(416) => self.get_opt(key).await,
                status => Err(classify("GetObject", key, &e, status)),
            },
        }
    }

    /// Reads the footer of the Parquet file at `key` (of `size` bytes, as listed) alone, its last
    /// 64 KiB first and more when `parse` says how much it needs. `None`: no such object;
    /// `Some(Err)`: not a readable Parquet file.
    async fn read_footer<T>(
        &self,
        key: &str,
        size: u64,
        parse: impl Fn(&[u8]) -> Result<T, Result<usize, String>>,
    ) -> Result<Option<Result<T, String>>, StoreError> {
        let mut want: u64 = 64 * 1024;
        loop {
            let start = size.saturating_sub(want);
            let Some(tail) = self.get_from(key, start).await? else { return Ok(None) };
            return Ok(Some(match parse(&tail) {
                Ok(v) => Ok(v),
                Err(Ok(needed)) if start > 0 && needed as u64 > want => {
                    want = needed as u64;
                    continue;
                }
                Err(Ok(needed)) => {
                    Err(format!("the Parquet footer needs {needed} bytes, the object has {}", tail.len()))
                }
                Err(Err(detail)) => Err(detail),
            }));
        }
    }

    /// A key-value metadata entry of the Parquet file at `key` (of `size` bytes), read from its
    /// footer alone.
    pub async fn parquet_footer_value(&self, key: &str, size: u64, entry: &str) -> Result<Option<String>, StoreError> {
        match self.read_footer(key, size, |tail| crate::lake::parquet::footer_value(tail, entry)).await? {
            Some(Ok(v)) => Ok(v),
            Some(Err(detail)) => Err(StoreError::Fatal { op: "GetObject", target: key.to_string(), detail }),
            None => Err(StoreError::Fatal { op: "GetObject", target: key.to_string(), detail: "no such key".into() }),
        }
    }

    /// The Arrow schema of the Parquet file at `key` (of `size` bytes, as listed), from its footer
    /// alone. `None`: there is no such object; `Some(Err)`: it is not a readable Parquet file.
    pub async fn parquet_schema(
        &self,
        key: &str,
        size: u64,
    ) -> Result<Option<Result<arrow_schema::SchemaRef, String>>, StoreError> {
        self.read_footer(key, size, crate::lake::parquet::schema_from_tail).await
    }

    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        self.get_opt(key).await?.ok_or_else(|| StoreError::Fatal {
            op: "GetObject",
            target: key.to_string(),
            detail: "no such key".into(),
        })
    }

    /// Starts a multipart upload of `key`: an object written in parts, each its own request (so
    /// one `s3.request_timeout` bounds a part, not the whole object), that appears whole at
    /// [`Multipart::complete`] or not at all.
    pub async fn start_multipart(&self, key: &str, content_type: &str) -> Result<Multipart, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| {
                let status = e.raw_response().map(|r| r.status().as_u16());
                classify("CreateMultipartUpload", key, &e, status)
            })?;
        let upload_id = out.upload_id().unwrap_or_default().to_string();
        Ok(Multipart { store: self.clone(), key: key.to_string(), upload_id, parts: Vec::new(), bytes: 0 })
    }

    /// Readiness probe: the bucket answers.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map(|_| ()).map_err(|e| {
            let status = e.raw_response().map(|r| r.status().as_u16());
            classify("HeadBucket", &self.bucket, &e, status)
        })
    }

    /// Creates the bucket if it is missing (used when `s3.create_bucket` is set, and by the demo).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        match self.probe().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => return Err(e),
            Err(_) => {}
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                if status == Some(409) {
                    Ok(()) // created meanwhile by another instance
                } else {
                    Err(classify("CreateBucket", &self.bucket, &e, status))
                }
            }
        }
    }
}

/// A multipart upload in progress ([`LakeStore::start_multipart`]). Every part but the last must
/// be at least 5 MiB (S3's rule).
pub struct Multipart {
    store: LakeStore,
    key: String,
    upload_id: String,
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
    bytes: u64,
}

impl Multipart {
    /// The smallest part S3 accepts, but for the last.
    pub const MIN_PART_BYTES: usize = 5 << 20;

    /// Uploads the next part, retrying a failed request a few times (with `backoff`, doubling)
    /// before giving up: a blip must not cost the whole object.
    pub async fn part(&mut self, body: bytes::Bytes, backoff: Duration) -> Result<(), StoreError> {
        let number = self.parts.len() as i32 + 1;
        let (mut wait, mut left) = (backoff, 4);
        loop {
            let sent = self
                .store
                .client
                .upload_part()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .part_number(number)
                .body(ByteStream::from(body.clone()))
                .send()
                .await;
            match sent {
                Ok(out) => {
                    self.bytes += body.len() as u64;
                    self.parts.push(
                        aws_sdk_s3::types::CompletedPart::builder().set_e_tag(out.e_tag).part_number(number).build(),
                    );
                    return Ok(());
                }
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    let err = classify("UploadPart", &self.key, &e, status);
                    if !err.is_retryable() || left == 0 {
                        return Err(err);
                    }
                    left -= 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }

    /// Bytes uploaded so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the object appear, whole.
    pub async fn complete(self) -> Result<(), StoreError> {
        let upload = aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(self.parts)).build();
        self.store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(upload)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let status = e.raw_response().map(|r| r.status().as_u16());
                classify("CompleteMultipartUpload", &self.key, &e, status)
            })
    }

    /// Gives the upload up; its parts are dropped by the store (best effort: a store keeps an
    /// upload nobody aborted until its lifecycle rule, if any, expires it).
    pub async fn abort(self) {
        let res = self
            .store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await;
        if let Err(e) = res {
            tracing::warn!(key = %self.key, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "aborting a multipart upload failed");
        }
    }
}

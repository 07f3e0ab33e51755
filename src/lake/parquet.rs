//! Encoding a flush as Parquet with the logical types of design §2.
//!
//! Rows are appended straight into Arrow builders as they are validated, so a flush costs one
//! `finish()` and one encode, never a second copy of the records. Amounts are Decimal128(18,2)
//! (never a float), times are Timestamp(µs, "UTC"), low-cardinality strings are dictionary-encoded
//! by the Parquet writer, and the file's key-value metadata names its source offsets.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{Decimal128Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::lake::keys::RawFileName;
use crate::record::Transaction;

pub const AMOUNT_PRECISION: u8 = 18;
pub const AMOUNT_SCALE: i8 = 2;

/// Key-value metadata keys written into every raw file.
pub const META_TOPIC: &str = "trstream.source.topic";
pub const META_PARTITION: &str = "trstream.source.partition";
pub const META_FIRST_OFFSET: &str = "trstream.source.first_offset";
pub const META_LAST_OFFSET: &str = "trstream.source.last_offset";
pub const META_ROWS: &str = "trstream.rows";

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("transaction_type", DataType::Utf8, false),
        Field::new("amount", DataType::Decimal128(AMOUNT_PRECISION, AMOUNT_SCALE), false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, true),
        Field::new("merchant_category", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, false),
        Field::new("city", DataType::Utf8, true),
        Field::new("channel", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("event_time", utc_micros(), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new("ingested_at", utc_micros(), false),
    ]))
});

/// The Arrow schema of every raw file.
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Columnar buffer of validated rows for one partition's current flush.
pub struct RowBuffer {
    transaction_id: StringBuilder,
    user_id: StringBuilder,
    account_id: StringBuilder,
    transaction_type: StringBuilder,
    amount: Decimal128Builder,
    currency: StringBuilder,
    merchant_id: StringBuilder,
    merchant_category: StringBuilder,
    country: StringBuilder,
    city: StringBuilder,
    channel: StringBuilder,
    status: StringBuilder,
    event_time: TimestampMicrosecondBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    ingested_at: TimestampMicrosecondBuilder,
    rows: usize,
}

impl Default for RowBuffer {
    fn default() -> Self {
        RowBuffer::new()
    }
}

impl RowBuffer {
    pub fn new() -> Self {
        RowBuffer {
            transaction_id: StringBuilder::new(),
            user_id: StringBuilder::new(),
            account_id: StringBuilder::new(),
            transaction_type: StringBuilder::new(),
            amount: Decimal128Builder::new(),
            currency: StringBuilder::new(),
            merchant_id: StringBuilder::new(),
            merchant_category: StringBuilder::new(),
            country: StringBuilder::new(),
            city: StringBuilder::new(),
            channel: StringBuilder::new(),
            status: StringBuilder::new(),
            event_time: TimestampMicrosecondBuilder::new(),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            ingested_at: TimestampMicrosecondBuilder::new(),
            rows: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn push(&mut self, t: &Transaction<'_>, partition: i32, offset: i64, ingested_at_us: i64) {
        self.transaction_id.append_value(&t.transaction_id);
        self.user_id.append_value(&t.user_id);
        self.account_id.append_value(&t.account_id);
        self.transaction_type.append_value(t.transaction_type);
        self.amount.append_value(i128::from(t.amount_cents));
        self.currency.append_value(&t.currency);
        self.merchant_id.append_option(t.merchant_id.as_deref());
        self.merchant_category.append_option(t.merchant_category.as_deref());
        self.country.append_value(&t.country);
        self.city.append_option(t.city.as_deref());
        self.channel.append_value(t.channel);
        self.status.append_value(t.status);
        self.event_time.append_value(t.event_time_us);
        self.kafka_partition.append_value(partition);
        self.kafka_offset.append_value(offset);
        self.ingested_at.append_value(ingested_at_us);
        self.rows += 1;
    }

    /// Takes the buffered rows as a batch, leaving the buffer empty for the next flush.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.transaction_id.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.account_id.finish()),
            Arc::new(self.transaction_type.finish()),
            Arc::new(
                self.amount
                    .finish()
                    .with_precision_and_scale(AMOUNT_PRECISION, AMOUNT_SCALE)
                    .expect("18,2 is a valid decimal type"),
            ),
            Arc::new(self.currency.finish()),
            Arc::new(self.merchant_id.finish()),
            Arc::new(self.merchant_category.finish()),
            Arc::new(self.country.finish()),
            Arc::new(self.city.finish()),
            Arc::new(self.channel.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.event_time.finish().with_timezone("UTC")),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
            Arc::new(self.ingested_at.finish().with_timezone("UTC")),
        ];
        self.rows = 0;
        RecordBatch::try_new(schema(), columns).expect("builders match the schema")
    }
}

/// The key-value metadata naming a file's source: topic, partition, offset range, rows.
pub fn source_metadata(name: &RawFileName, rows: usize) -> Vec<KeyValue> {
    vec![
        KeyValue::new(META_TOPIC.into(), name.topic.clone()),
        KeyValue::new(META_PARTITION.into(), name.partition.to_string()),
        KeyValue::new(META_FIRST_OFFSET.into(), name.first_offset.to_string()),
        KeyValue::new(META_LAST_OFFSET.into(), name.last_offset.to_string()),
        KeyValue::new(META_ROWS.into(), rows.to_string()),
    ]
}

/// Encodes one flush; the metadata names the source offsets, the topic id where the broker
/// gives one and, in exactly-once mode, the window's dead letters, so a file explains itself.
pub fn encode(
    batch: &RecordBatch,
    name: &RawFileName,
    topic_id: Option<uuid::Uuid>,
    dead_letters: Option<String>,
    zstd_level: i32,
    row_group_rows: usize,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let mut meta = source_metadata(name, batch.num_rows());
    if let Some(id) = topic_id {
        meta.push(KeyValue::new(crate::ingest::incarnation::META_TOPIC_ID.into(), id.to_string()));
    }
    if let Some(notes) = dead_letters {
        meta.push(KeyValue::new(crate::ingest::dlq::META_DEAD_LETTERS.into(), notes));
    }
    encode_with(batch, meta, zstd_level, row_group_rows)
}

/// A key-value metadata entry of a Parquet file, read from its tail (the last bytes of the
/// file, footer included). `Ok(None)`: the file has no such entry. `Err(Some(n))`: the footer
/// needs the last `n` bytes, more than `tail` holds.
pub fn footer_value(tail: &[u8], key: &str) -> Result<Option<String>, Result<usize, String>> {
    let meta = metadata_from_tail(tail)?;
    Ok(meta
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == key))
        .and_then(|e| e.value.clone()))
}

/// A Parquet file's metadata from its tail; `Err(Ok(n))`: the last `n` bytes are needed.
fn metadata_from_tail(tail: &[u8]) -> Result<parquet::file::metadata::ParquetMetaData, Result<usize, String>> {
    let n = tail.len();
    if n < 8 || &tail[n - 4..] != b"PAR1" {
        return Err(Err("not a Parquet file (no PAR1 footer)".into()));
    }
    let len = u32::from_le_bytes(tail[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
    if len + 8 > n {
        return Err(Ok(len + 8));
    }
    parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&tail[n - 8 - len..n - 8])
        .map_err(|e| Err(e.to_string()))
}

/// The Arrow schema of a Parquet file, from its tail (as [`footer_value`]).
pub fn schema_from_tail(tail: &[u8]) -> Result<SchemaRef, Result<usize, String>> {
    let meta = metadata_from_tail(tail)?;
    let fm = meta.file_metadata();
    let schema = parquet::arrow::parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())
        .map_err(|e| Err(e.to_string()))?;
    // The file's key-value metadata is not part of the columns.
    Ok(Arc::new(Schema::new(schema.fields().clone())))
}

/// The lake's writer settings with the given metadata.
fn writer_properties(
    meta: Vec<KeyValue>,
    zstd_level: i32,
    row_group_rows: usize,
) -> Result<WriterProperties, parquet::errors::ParquetError> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(concat!("trstream ", env!("CARGO_PKG_VERSION")).into())
        // Unique ids gain nothing from a dictionary; it only costs time.
        .set_column_dictionary_enabled(ColumnPath::from("transaction_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("kafka_offset"), false)
        .set_key_value_metadata(Some(meta))
        .build())
}

/// A lake file written file by file and batch by batch, its bytes taken as they are encoded (a
/// streamed merge): memory holds one batch and one row group being encoded, not the file.
pub struct StreamWriter {
    writer: ArrowWriter<Vec<u8>>,
    schema: SchemaRef,
    rows: usize,
}

/// A streamed file's row group is closed once its encoded size reaches this, even short of
/// `parquet.row_group_rows` rows.
const STREAM_ROW_GROUP_BYTES: usize = 16 << 20;

impl StreamWriter {
    /// A file of `schema` (from [`union_schema`]).
    pub fn new(
        schema: SchemaRef,
        zstd_level: i32,
        row_group_rows: usize,
    ) -> Result<Self, parquet::errors::ParquetError> {
        let props = writer_properties(Vec::new(), zstd_level, row_group_rows)?;
        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
        Ok(StreamWriter { writer, schema, rows: 0 })
    }

    /// Appends every row of the lake file `bytes`, conformed to the schema, 8,192 at a time.
    pub fn append_file(&mut self, bytes: bytes::Bytes) -> Result<(), DecodeError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.with_batch_size(8192).build()?;
        for batch in reader {
            let batch = conform(&batch?, &self.schema)?;
            self.writer.write(&batch)?;
            self.rows += batch.num_rows();
            if self.writer.in_progress_size() >= STREAM_ROW_GROUP_BYTES {
                self.writer.flush()?;
            }
        }
        Ok(())
    }

    /// The bytes encoded since the last call.
    pub fn take_bytes(&mut self) -> Vec<u8> {
        // The writer counts its offsets itself: taking what it wrote so far does not move them.
        std::mem::take(self.writer.inner_mut())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Closes the file with `meta` in its footer; the bytes not taken yet.
    pub fn finish(mut self, meta: Vec<KeyValue>) -> Result<Vec<u8>, parquet::errors::ParquetError> {
        for kv in meta {
            self.writer.append_key_value_metadata(kv);
        }
        self.writer.into_inner()
    }
}

/// Encodes `batch` (of [`schema`], or of a union of it with another version's columns) with the
/// lake's writer settings and the given metadata.
pub fn encode_with(
    batch: &RecordBatch,
    meta: Vec<KeyValue>,
    zstd_level: i32,
    row_group_rows: usize,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let props = writer_properties(meta, zstd_level, row_group_rows)?;
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 4 + 4096);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(out)
}

/// Why a lake file cannot be read as one (its reader quarantines it, I10).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a readable Parquet file: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    Arrow(#[from] arrow_schema::ArrowError),
}

/// Decodes a lake file (raw or table) written by this version or another: its columns of
/// [`schema`] by name and in that order (a nullable one the file lacks, an older version's, is
/// all nulls), then the columns it has beyond them (a newer version's), nullable. A file that
/// lacks a required column, or has one of another type, is an error.
pub fn decode(bytes: bytes::Bytes) -> Result<RecordBatch, DecodeError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.with_batch_size(64 * 1024).build()?;
    let file_schema = arrow_array::RecordBatchReader::schema(&reader);
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    let batch = arrow_select::concat::concat_batches(&file_schema, &batches)?;
    let union = union_schema([batch.schema_ref()])?;
    conform(&batch, &union)
}

/// [`decode`], for the raw file `name`: every row must be of its Kafka partition and have an
/// offset in its range. A file whose rows are not what its name says would put them where they
/// do not belong: rows of another partition, or offsets the commit never covered (the recovery
/// adopts a file by its name), so it is as unreadable as a truncated one.
pub fn decode_raw(bytes: bytes::Bytes, name: &RawFileName) -> Result<RecordBatch, DecodeError> {
    use arrow_array::cast::AsArray;
    let batch = decode(bytes)?;
    let parts = batch.column(COL_KAFKA_PARTITION).as_primitive::<arrow_array::types::Int32Type>();
    if let Some(other) = parts.iter().flatten().find(|&q| q != name.partition) {
        return Err(DecodeError::Schema(format!(
            "holds rows of Kafka partition {other}, not only of partition {} its name says",
            name.partition
        )));
    }
    let range = name.first_offset..=name.last_offset;
    if let Some(o) = crate::lake::table::offsets(&batch).iter().find(|o| !range.contains(o)) {
        return Err(DecodeError::Schema(format!(
            "holds a row of offset {o}, outside the offsets {}..={} its name says",
            name.first_offset, name.last_offset
        )));
    }
    Ok(batch)
}

/// Index of `kafka_partition` in [`schema`] (and in every decoded batch).
const COL_KAFKA_PARTITION: usize = 13;

/// The schema that holds every one of `schemas`: [`schema`]'s columns, then the others in the
/// order first seen, nullable (schema drift: a column a newer version added, read by this one).
pub fn union_schema<'a>(schemas: impl IntoIterator<Item = &'a SchemaRef>) -> Result<SchemaRef, DecodeError> {
    let base = schema();
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut extra = false;
    for s in schemas {
        for f in s.fields() {
            match fields.iter().find(|known| known.name() == f.name()) {
                Some(known) if known.data_type() != f.data_type() => {
                    return Err(DecodeError::Schema(format!(
                        "column {} is {}, expected {}",
                        f.name(),
                        f.data_type(),
                        known.data_type()
                    )));
                }
                Some(_) => {}
                None => {
                    fields.push(f.as_ref().clone().with_nullable(true));
                    extra = true;
                }
            }
        }
    }
    Ok(if extra { Arc::new(Schema::new(fields)) } else { base })
}

/// `batch` with the columns of `union` (from [`union_schema`]), in its order: a column `batch`
/// lacks is all nulls, which only a nullable column may be.
pub fn conform(batch: &RecordBatch, union: &SchemaRef) -> Result<RecordBatch, DecodeError> {
    if batch.schema_ref() == union {
        return Ok(batch.clone());
    }
    let columns = union
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => Ok(c.clone()),
            None if f.is_nullable() => Ok(arrow_array::new_null_array(f.data_type(), batch.num_rows())),
            None => Err(DecodeError::Schema(format!("lacks the required column {}", f.name()))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(union.clone(), columns)?)
}

/// Concatenates lake batches that may differ in schema (files of several versions) under their
/// union ([`union_schema`]).
pub fn concat_union(batches: &[RecordBatch]) -> Result<RecordBatch, DecodeError> {
    let union = union_schema(batches.iter().map(RecordBatch::schema_ref))?;
    let conformed = batches.iter().map(|b| conform(b, &union)).collect::<Result<Vec<_>, _>>()?;
    Ok(arrow_select::concat::concat_batches(&union, &conformed)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, TimestampMicrosecondType};
    use std::borrow::Cow;

    fn tx(i: i64) -> Transaction<'static> {
        Transaction {
            transaction_id: Cow::Owned(format!("00000000-0000-4000-8000-{i:012}")),
            user_id: Cow::Borrowed("u1"),
            account_id: Cow::Borrowed("a1"),
            transaction_type: "REFUND",
            amount_cents: 100_000_000_000 - i,
            currency: Cow::Borrowed("USD"),
            merchant_id: None,
            merchant_category: if i % 2 == 0 { Some(Cow::Borrowed("5411")) } else { None },
            country: Cow::Borrowed("US"),
            city: None,
            channel: "ATM",
            status: "DECLINED",
            event_time_us: 1_700_000_000_000_000 + i,
        }
    }

    /// A batch of `n` rows from `offset` on, with the extra column `extra` when given (a newer
    /// version's file) or without `city` (an older one's) when `older`.
    fn version_batch(offset: i64, n: i64, extra: Option<&str>, older: bool) -> RecordBatch {
        let mut buf = RowBuffer::new();
        for i in offset..offset + n {
            buf.push(&tx(i), 7, i, 42);
        }
        let batch = buf.finish();
        let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns = batch.columns().to_vec();
        if older {
            let i = fields.iter().position(|f| f.name() == "city").unwrap();
            fields.remove(i);
            columns.remove(i);
        }
        if let Some(name) = extra {
            fields.push(Field::new(name, DataType::Int64, true));
            columns.push(Arc::new(arrow_array::Int64Array::from_iter_values(offset..offset + n)));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    fn file_of(batch: &RecordBatch) -> bytes::Bytes {
        let name = RawFileName { topic: "t".into(), partition: 7, first_offset: 0, last_offset: 0 };
        encode_with(batch, source_metadata(&name, batch.num_rows()), 1, 1000).unwrap().into()
    }

    #[test]
    fn a_raw_file_whose_rows_are_not_what_its_name_says_does_not_decode() {
        let mut buf = RowBuffer::new();
        for i in 100..110 {
            buf.push(&tx(i), 7, i, 42);
        }
        let batch = buf.finish();
        let name = |partition, first_offset, last_offset| RawFileName {
            topic: "t".into(),
            partition,
            first_offset,
            last_offset,
        };
        let file = || bytes::Bytes::from(encode(&batch, &name(7, 100, 109), None, None, 3, 300).unwrap());
        assert_eq!(decode_raw(file(), &name(7, 100, 109)).unwrap().num_rows(), 10);
        assert_eq!(decode_raw(file(), &name(7, 90, 200)).unwrap().num_rows(), 10, "a gap in the offsets is fine");
        let e = decode_raw(file(), &name(3, 100, 109)).unwrap_err().to_string();
        assert!(e.contains("rows of Kafka partition 7, not only of partition 3"), "{e}");
        let e = decode_raw(file(), &name(7, 100, 108)).unwrap_err().to_string();
        assert!(e.contains("offset 109, outside the offsets 100..=108"), "{e}");
        let e = decode_raw(file(), &name(7, 101, 109)).unwrap_err().to_string();
        assert!(e.contains("offset 100, outside the offsets 101..=109"), "{e}");
    }

    #[test]
    fn files_of_older_and_newer_versions_decode_and_merge_under_the_union_schema() {
        let older = decode(file_of(&version_batch(0, 10, None, true))).unwrap();
        assert_eq!(older.schema(), schema(), "a missing nullable column comes back as nulls");
        assert_eq!(older.column_by_name("city").unwrap().null_count(), 10);
        let newer = decode(file_of(&version_batch(10, 5, Some("tier"), false))).unwrap();
        assert_eq!(newer.schema().fields().len(), schema().fields().len() + 1);
        let merged = concat_union(&[older, newer]).unwrap();
        assert_eq!(merged.num_rows(), 15);
        let tier = merged.column_by_name("tier").unwrap();
        assert_eq!(tier.null_count(), 10, "the older rows have no tier; the newer keep theirs");
        assert_eq!(crate::lake::table::offsets(&merged), (0..15).collect::<Vec<_>>().as_slice());

        // A required column missing, or a known column of another type: not a lake file.
        let b = version_batch(0, 3, None, false);
        let no_amount = b.project(&(0..b.num_columns()).filter(|&i| i != 4).collect::<Vec<_>>()).unwrap();
        let e = decode(file_of(&no_amount)).unwrap_err().to_string();
        assert!(e.contains("lacks the required column amount"), "{e}");
        let mut fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields[14] = Field::new("kafka_offset", DataType::Utf8, false);
        let mut columns = b.columns().to_vec();
        columns[14] = Arc::new(arrow_array::StringArray::from(vec!["a", "b", "c"]));
        let wrong = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let e = decode(file_of(&wrong)).unwrap_err().to_string();
        assert!(e.contains("column kafka_offset is Utf8, expected Int64"), "{e}");
        assert!(decode(bytes::Bytes::from_static(b"PAR1 but not really PAR1")).is_err());
    }

    #[test]
    fn a_streamed_file_holds_every_input_row_under_the_union_schema() {
        let older = file_of(&version_batch(0, 2500, None, true));
        let newer = file_of(&version_batch(2500, 1500, Some("tier"), false));
        let schemas = [schema_from_tail(&older).unwrap(), schema_from_tail(&newer).unwrap()];
        let union = union_schema(&schemas).unwrap();
        let mut w = StreamWriter::new(union.clone(), 1, 1000).unwrap();
        let mut out = Vec::new();
        w.append_file(older).unwrap();
        out.extend(w.take_bytes());
        w.append_file(newer).unwrap();
        out.extend(w.take_bytes());
        assert_eq!(w.rows(), 4000);
        let name = RawFileName { topic: "t".into(), partition: 7, first_offset: 0, last_offset: 3999 };
        out.extend(w.finish(source_metadata(&name, 4000)).unwrap());
        let read = decode(out.into()).unwrap();
        assert_eq!(read.schema(), union);
        assert_eq!(crate::lake::table::offsets(&read), (0..4000).collect::<Vec<_>>().as_slice());
        assert_eq!(read.column_by_name("tier").unwrap().null_count(), 2500);
    }

    #[test]
    fn round_trip_keeps_logical_types_values_and_metadata() {
        let mut buf = RowBuffer::new();
        for i in 0..1000 {
            buf.push(&tx(i), 7, 500 + i, 42);
        }
        assert_eq!(buf.len(), 1000);
        let batch = buf.finish();
        assert!(buf.is_empty(), "finish leaves the buffer empty");
        let name = RawFileName { topic: "t".into(), partition: 7, first_offset: 500, last_offset: 1499 };
        let id = uuid::Uuid::from_u128(0x2171e556_8657_407d_b81c_7723c868e008);
        let bytes = encode(&batch, &name, Some(id), Some("[]".into()), 3, 300).unwrap();
        // The footer alone tells the topic id, from a tail long enough, else how long it must be.
        let key = crate::ingest::incarnation::META_TOPIC_ID;
        assert_eq!(footer_value(&bytes, key), Ok(Some(id.to_string())));
        assert_eq!(footer_value(&bytes, "no.such.key"), Ok(None));
        assert_eq!(footer_value(&bytes, crate::ingest::dlq::META_DEAD_LETTERS), Ok(Some("[]".into())));
        let needed = match footer_value(&bytes[bytes.len() - 16..], key) {
            Err(Ok(n)) => n,
            other => panic!("a short tail asks for more: {other:?}"),
        };
        assert_eq!(footer_value(&bytes[bytes.len() - needed..], key), Ok(Some(id.to_string())));
        assert!(matches!(footer_value(b"not parquet at all", key), Err(Err(_))));

        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let kv = reader.metadata().file_metadata().key_value_metadata().unwrap().clone();
        let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
        assert_eq!(get(META_FIRST_OFFSET).as_deref(), Some("500"));
        assert_eq!(get(META_LAST_OFFSET).as_deref(), Some("1499"));
        assert_eq!(get(META_PARTITION).as_deref(), Some("7"));
        assert_eq!(reader.metadata().num_row_groups(), 4, "row groups of 300 rows");
        let rg = reader.metadata().row_group(0);
        assert!(rg.column(0).compression().to_string().starts_with("ZSTD"));
        assert!(rg.column(4).statistics().is_some(), "statistics are written");

        let batches: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 1000);
        let read = &batches[0];
        assert_eq!(read.schema(), schema(), "logical types survive the round trip");
        let amount = read.column(4).as_primitive::<Decimal128Type>();
        assert_eq!(amount.value(0), 100_000_000_000);
        assert_eq!(amount.value_as_string(1), "999999999.99");
        let et = read.column(12).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(et.value(299), 1_700_000_000_000_299);
        let nulls: usize = batches.iter().map(|b| b.column(7).null_count()).sum();
        assert_eq!(nulls, 500);
    }
}

//! Memory in its caps, measured as the daemon process's peak RSS (`VmHWM` of `trstream run`, a
//! child process), never as a gauge the daemon keeps about itself (issue 12, I4): through a
//! store outage of over a minute, and through a merge of a large partition. Each test prints its
//! figures; the bounds are loose enough for a loaded machine and far below what the unbounded
//! behaviour cost (below, per test).

mod common;

use std::time::{Duration, Instant};

use common::{GROUP, Harness, free_port, spawn_daemon, stop_daemon, wait_for};

const MIB: u64 = 1 << 20;

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon is running");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM in kB");
    kb * 1024
}

/// A store outage of 70 s under a steady produce: uploads fail, buffers fill to the caps and the
/// partitions pause; the process must not grow past them however long it lasts (ticks queued
/// in mailboxes, retry bookkeeping, librdkafka's prefetch). Asserted: the peak RSS at the end of
/// the outage is within 3 × `memory.total_max_buffered_bytes` + 24 MiB of the peak before it, and
/// everything is ingested exactly once after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_stays_in_the_caps_through_a_store_outage_of_over_a_minute() {
    let mut h = Harness::new(8).await;
    let mut config = h.config();
    let port = free_port();
    config.http.listen = format!("127.0.0.1:{port}");
    config.memory.total_max_buffered_bytes = 4 * MIB as usize;
    config.memory.partition_max_buffered_bytes = MIB as usize;
    config.flush.max_bytes = 512 * 1024;
    config.kafka.fetch_queue_kbytes = 1024;
    config.validate().unwrap();
    let total_cap = config.memory.total_max_buffered_bytes as u64;
    let child = spawn_daemon(&h, &config);
    let pid = child.id();
    let addr = ([127, 0, 0, 1], port).into();
    // Warm up: everything the daemon allocates in steady state, allocated.
    for _ in 0..10 {
        h.produce(400);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("the warm-up committed", Duration::from_secs(120), || h.all_committed(GROUP)).await;
    let before = peak_rss(pid);

    h.s3.set_down(true);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(70) {
        h.produce(300); // 300 records/s, 21,000 in all: several times the caps, under the mock's retention
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let buffered = common::metric(addr, "trstream_buffered_bytes").unwrap_or(0.0) as u64;
    let during = peak_rss(pid);
    h.s3.set_down(false);
    wait_for("everything committed after the outage", Duration::from_secs(180), || h.all_committed(GROUP)).await;
    let after = peak_rss(pid);
    stop_daemon(child).await;
    println!(
        "store outage of 70 s: peak RSS {:.1} MiB before, {:.1} MiB at its end, {:.1} MiB after the catch-up; {:.1} MiB buffered at its end; cap {:.0} MiB",
        before as f64 / MIB as f64,
        during as f64 / MIB as f64,
        after as f64 / MIB as f64,
        buffered as f64 / MIB as f64,
        total_cap as f64 / MIB as f64
    );
    assert!(
        during <= before + 3 * total_cap + 24 * MIB,
        "the outage grew the peak RSS from {before} to {during} bytes, past the caps"
    );
    h.assert_exactly_once(GROUP, false);
}

/// One merge of 24 files of 8 MiB (192 MiB of Parquet) into one, `compactor.target_file_bytes`
/// at 1 GiB: streamed, the merge holds one input, a row group being encoded and an upload part,
/// so its peak does not follow the output's size. (Held in memory, the inputs alone were the
/// output's size, their decoded batches and the concatenation twice more.) The files are a newer
/// version's too: an extra column, merged under the union schema. Asserted: the merged file
/// holds every row once, in offset order, and the daemon's peak RSS stays under 128 MiB, below the
/// output's own size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_of_a_large_merge_does_not_follow_the_files_size() {
    use trstream::lake::{HivePartition, RawFileName, parquet, table};
    const FILES: i64 = 24;
    const ROWS: i64 = 8_000;
    const BLOB: usize = 1024;
    let h = Harness::new(1).await;
    let mut config = h.config();
    let port = free_port();
    config.http.listen = format!("127.0.0.1:{port}");
    config.compactor.interval = Duration::from_secs(1);
    config.compactor.min_files = 2;
    config.compactor.small_file_bytes = 16 * MIB;
    config.compactor.target_file_bytes = 1 << 30;
    config.validate().unwrap();

    // The group: (2026-01-01, PAYMENT, partition 0), offsets 0 .. FILES * ROWS, each row with
    // 1 KiB of incompressible bytes in a column a newer version added.
    let hive = HivePartition::of(1_767_225_600_000_000, "PAYMENT");
    let table_dir = h.dir.path().join("tb-transactions");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut written = 0u64;
    for f in 0..FILES {
        let (first, last) = (f * ROWS, f * ROWS + ROWS - 1);
        let mut rows = parquet::RowBuffer::new();
        for o in first..=last {
            let t = trstream::record::Transaction {
                transaction_id: format!("00000000-0000-4000-8000-{o:012}").into(),
                user_id: "u".into(),
                account_id: "a".into(),
                transaction_type: "PAYMENT",
                amount_cents: 100,
                currency: "EUR".into(),
                merchant_id: None,
                merchant_category: None,
                country: "FR".into(),
                city: None,
                channel: "POS",
                status: "APPROVED",
                event_time_us: 1_767_225_600_000_000 + o,
            };
            rows.push(&t, 0, o, 1_767_225_600_000_000);
        }
        let batch = rows.finish();
        let blobs: arrow_array::BinaryArray = (0..ROWS)
            .map(|_| {
                let mut b = vec![0u8; BLOB];
                for chunk in b.chunks_mut(8) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
                }
                Some(b)
            })
            .collect();
        let mut fields: Vec<_> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(arrow_schema::Field::new("blob", arrow_schema::DataType::Binary, true));
        let mut columns = batch.columns().to_vec();
        columns.push(std::sync::Arc::new(blobs));
        let batch =
            arrow_array::RecordBatch::try_new(std::sync::Arc::new(arrow_schema::Schema::new(fields)), columns).unwrap();
        let name = RawFileName { topic: common::TOPIC.into(), partition: 0, first_offset: first, last_offset: last };
        let bytes = parquet::encode_with(&batch, parquet::source_metadata(&name, ROWS as usize), 1, 131_072).unwrap();
        written += bytes.len() as u64;
        let path = table_dir.join(hive.file_key(&name));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let wm = table::Watermark {
        topic: common::TOPIC.into(),
        partition: 0,
        last_offset: FILES * ROWS - 1,
        raw_file: RawFileName {
            topic: common::TOPIC.into(),
            partition: 0,
            first_offset: (FILES - 1) * ROWS,
            last_offset: FILES * ROWS - 1,
        }
        .key(&config.s3.raw_prefix),
        updated_at: "2026-01-01T00:00:00Z".into(),
    };
    let wm_path = table_dir.join(table::watermark_key(common::TOPIC, 0));
    std::fs::create_dir_all(wm_path.parent().unwrap()).unwrap();
    std::fs::write(wm_path, serde_json::to_vec(&wm).unwrap()).unwrap();

    let child = spawn_daemon(&h, &config);
    let pid = child.id();
    wait_for("the group merged into one file", Duration::from_secs(300), || h.table_files().len() == 1).await;
    let peak = peak_rss(pid);
    stop_daemon(child).await;
    let (path, _, name) = h.table_files_with_paths().pop().unwrap();
    let merged_bytes = std::fs::metadata(&path).unwrap().len();
    println!(
        "merge of {FILES} files, {:.1} MiB, into one of {:.1} MiB: peak RSS {:.1} MiB",
        written as f64 / MIB as f64,
        merged_bytes as f64 / MIB as f64,
        peak as f64 / MIB as f64
    );
    assert_eq!((name.first_offset, name.last_offset), (0, FILES * ROWS - 1));
    let reader =
        ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
    let mut next = 0i64;
    for batch in reader {
        let batch = batch.unwrap();
        assert!(batch.column_by_name("blob").is_some_and(|b| b.null_count() == 0), "the newer column is kept");
        for &o in table::offsets(&batch) {
            assert_eq!(o, next, "every row once, in offset order");
            next += 1;
        }
    }
    assert_eq!(next, FILES * ROWS);
    assert!(peak < 128 * MIB, "peak RSS {peak} bytes for a merge of {written} bytes");
}

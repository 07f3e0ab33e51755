//! End-to-end ingestion on the embedded mock cluster and s3s-fs: the invariants I1–I4 and I7
//! under clean runs and injected faults. Every scenario ends with the same check: each valid id
//! exactly once in raw-data, each invalid record in the DLQ with its reason, offsets committed
//! to the log end.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, http_get, wait_for};
use trstream::Faults;
use trstream::metrics::Stats;

const GROUP: &str = "trstream-test";
const DONE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_records_land_exactly_once() {
    let mut h = Harness::new(4).await;
    // Produce while consuming, in slices, so the mock's 5 MB per-partition log never drops data.
    let pipeline = trstream::start(h.config(), Arc::new(Faults::default())).await.unwrap();
    for _ in 0..5 {
        h.produce(10_000);
    }
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await;
    h.assert_exactly_once(GROUP, true);
    assert_eq!(Stats::get(&stats.restarts), 0);
    let rows = h.lake_rows();
    assert!(h.raw_files().len() >= rows.len() / 2_000, "flush.max_rows = 2000: {} files", h.raw_files().len());
    for (name, path) in h.raw_files() {
        let meta = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let n = parquet::file::reader::FileReader::metadata(&meta).file_metadata().num_rows();
        assert!(n <= 2_000, "{name} holds {n} rows, more than flush.max_rows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failing_mid_stream_is_restarted_and_nothing_is_lost() {
    let mut h = Harness::new(4).await;
    let faults = Arc::new(Faults::default());
    faults.panic_at_offset(1, 3_000);
    faults.panic_at_offset(2, 100);
    let pipeline = trstream::start(h.config(), faults).await.unwrap();
    for _ in 0..3 {
        h.produce(10_000);
    }
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await;
    assert_eq!(Stats::get(&stats.restarts), 2, "both injected failures restarted their worker");
    h.assert_exactly_once(GROUP, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_upload_and_commit_adopts_the_file() {
    let mut h = Harness::new(2).await;
    let faults = Arc::new(Faults::default());
    faults.crash_after_upload(0, 2);
    let pipeline = trstream::start(h.config(), faults).await.unwrap();
    h.produce(10_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await;
    assert_eq!(Stats::get(&stats.restarts), 2);
    assert!(Stats::get(&stats.adopted_files) >= 2, "the uploaded files were adopted, not rewritten");
    h.assert_exactly_once(GROUP, false);
}

/// Issue 11, part 4: with `kafka.exactly_once` a window's dead letters go in its commit's
/// transaction, after the upload, and the raw file's footer lists them. A file uploaded whose
/// transaction never ran (a crash in between) is adopted, and the dead letters it lists are sent
/// then, once each. (The mock cluster runs transactions but keeps no transactional offset commit:
/// the end state is checked in the lake, the DLQ and the daemon's own commits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_file_sends_the_dead_letters_its_footer_lists_once() {
    let mut h = Harness::new(2).await;
    let mut config = h.config();
    config.kafka.exactly_once = true;
    let faults = Arc::new(Faults::default());
    faults.crash_after_upload(0, 2);
    let pipeline = trstream::start(config, faults).await.unwrap();
    h.produce(10_000);
    let stats = pipeline.stats.clone();
    let total = h.produced.len() as i64;
    wait_for("every offset committed by the daemon", DONE, || stats.committed().values().sum::<i64>() == total).await;
    pipeline.shutdown().await;
    assert_eq!(Stats::get(&stats.restarts), 2);
    assert!(Stats::get(&stats.adopted_files) >= 2, "the uploaded files were adopted, not rewritten");
    let raw = h.raw_files();
    assert!(raw.iter().any(|(f, _)| f.partition == 0), "partition 0 has files");
    h.assert_lake_and_dlq(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_loses_nothing_and_keeps_buffers_under_the_cap() {
    let mut h = Harness::new(2).await;
    let mut config = h.config();
    config.memory.partition_max_buffered_bytes = 1024 * 1024;
    config.memory.total_max_buffered_bytes = 2 * 1024 * 1024;
    config.flush.max_bytes = 512 * 1024;
    config.kafka.fetch_queue_kbytes = 256;
    let caps = config.memory.total_max_buffered_bytes as u64;
    let pipeline = trstream::start(config, Arc::new(Faults::default())).await.unwrap();
    h.produce(2_000);
    wait_for("the first records committed", DONE, || h.all_committed(GROUP)).await;

    h.s3.set_down(true);
    // ~40k records ≈ 15 MB: far more than the 2 MB cap.
    for _ in 0..4 {
        h.produce(10_000);
    }
    let stats = pipeline.stats.clone();
    wait_for("uploads failing and partitions paused", DONE, || {
        Stats::get(&stats.upload_errors) > 0 && Stats::get(&stats.pauses) > 0
    })
    .await;
    assert!(!pipeline.health.s3_ok.load(Ordering::Relaxed), "/readyz reports the outage");
    // The outage goes on; memory must stay bounded while it does.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = Stats::get(&stats.max_buffered_bytes);
    // The cap plus at most one routing batch that arrived before the pause took effect.
    assert!(peak <= caps + 2 * 1024 * 1024, "buffered {peak} bytes, cap {caps}");
    assert!(!h.all_committed(GROUP));

    h.s3.set_down(false);
    wait_for("all offsets committed after the outage", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    h.assert_exactly_once(GROUP, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_going_down_and_up_loses_nothing() {
    let mut h = Harness::new(3).await;
    let pipeline = trstream::start(h.config(), Arc::new(Faults::default())).await.unwrap();
    h.produce(5_000);
    wait_for("the first records committed", DONE, || h.all_committed(GROUP)).await;
    h.produce(5_000);
    h.kafka.cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.kafka.cluster.broker_up(1).unwrap();
    h.produce(5_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    h.assert_exactly_once(GROUP, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_commits_everything_it_flushed() {
    let mut h = Harness::new(2).await;
    // Nothing would flush on its own: only the shutdown drain can commit.
    let pipeline = trstream::start(h.drain_only_config(), Arc::new(Faults::default())).await.unwrap();
    h.produce(3_000);
    let stats = pipeline.stats.clone();
    wait_for("every record consumed", DONE, || Stats::get(&stats.consumed) + Stats::get(&stats.skipped) >= 3_000).await;
    assert!(h.raw_files().is_empty(), "nothing flushed before the shutdown");
    pipeline.shutdown().await;
    assert_eq!(h.raw_files().len(), 2, "one file per partition, written by the drain");
    h.assert_exactly_once(GROUP, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_resumes_without_duplicates_and_serves_health() {
    let mut h = Harness::new(2).await;
    let pipeline = trstream::start(h.config(), Arc::new(Faults::default())).await.unwrap();
    let addr = pipeline.http_addr.expect("http server");
    h.produce(4_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    let metrics = http_get(addr, "/metrics");
    assert!(metrics.contains("trstream_records_consumed_total"), "{metrics}");
    assert!(metrics.contains("trstream_flush_duration_seconds_bucket"));
    assert!(http_get(addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(addr, "/readyz").starts_with("HTTP/1.1 200"));
    pipeline.shutdown().await;

    // Same group, same lake: the second instance starts at the committed offsets.
    let pipeline = trstream::start(h.config(), Arc::new(Faults::default())).await.unwrap();
    h.produce(4_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    h.assert_exactly_once(GROUP, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_restart_limit_escalates_and_the_subtree_restarts() {
    let mut h = Harness::new(2).await;
    let mut config = h.config();
    // One restart per minute per partition: the second crash escalates to Root.
    config.supervision.max_restarts = 1;
    let faults = Arc::new(Faults::default());
    faults.crash_after_upload(0, 3);
    let pipeline = trstream::start(config, faults).await.unwrap();
    // ~10,000 records per partition: enough flushes on partition 0 for all three crashes.
    h.produce(20_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    let stats = pipeline.stats.clone();
    assert!(pipeline.health.alive.load(Ordering::Relaxed), "Root is still up");
    pipeline.shutdown().await;
    assert!(Stats::get(&stats.ingest_restarts) >= 1, "the ingest subtree was restarted by Root");
    assert!(Stats::get(&stats.adopted_files) >= 3, "every crashed upload was adopted");
    h.assert_exactly_once(GROUP, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_at_assignment_defers_the_partition_until_the_recovery_scan_succeeds() {
    let mut h = Harness::new(2).await;
    let mut config = h.config();
    config.s3.create_bucket = false; // the bucket exists; only the scan can fail
    h.s3.set_down(true);
    let pipeline = trstream::start(config, Arc::new(Faults::default())).await.unwrap();
    h.produce(4_000);
    let stats = pipeline.stats.clone();
    // Without a scan the start offset is unknown: nothing may be consumed meanwhile.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        assert_eq!(Stats::get(&stats.consumed), 0, "consumed before the recovery scan succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!pipeline.health.s3_ok.load(Ordering::Relaxed), "/readyz reports S3 unreachable");
    h.s3.set_down(false);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    h.assert_exactly_once(GROUP, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_dlq_topic_is_dead_lettered_as_a_prefix_and_nothing_stalls() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let mut h = Harness::new(1).await;
    let mut config = h.config();
    // The DLQ producer refuses records over 100 kB here, as a DLQ topic with a smaller
    // max.message.bytes than the source topic would.
    config.kafka.properties.insert("message.max.bytes".into(), "100000".into());
    let pipeline = trstream::start(config, Arc::new(Faults::default())).await.unwrap();
    h.produce(500);
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26).collect();
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &h.kafka.bootstrap).create().unwrap();
    producer.send(BaseRecord::<str, [u8]>::to("transactions").key("big").payload(&big)).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    h.produce(500);
    wait_for("all offsets committed past the big record", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    let prefix = trstream::dlq::TRUNCATED_PAYLOAD_BYTES;
    let dead = h.dlq_records();
    let found = dead.iter().find(|d| d.0.len() == prefix && big.starts_with(&d.0));
    let (_, reason, _, _) = found.expect("the big record is in the DLQ, as its first 64 KiB");
    assert_eq!(reason, "oversized");
}

/// I9: a recovery that finishes after its partition was revoked never starts its worker, so it
/// commits nothing for a partition that is another instance's now. Every partition's worker
/// crashes between its upload and its commit, and each recovery is held after its scan (which
/// adopted that file) while a second daemon joins and the partitions are committed to the end by
/// their new owners; then the recoveries finish. Before the fix, each late worker committed its
/// adopted file's end at once, moving the new owner's commit backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_finishes_after_a_revoke_commits_nothing() {
    let mut h = Harness::new(4).await;
    let faults = Arc::new(Faults::default());
    let a = trstream::start(h.config(), faults.clone()).await.unwrap();
    wait_for("the first assignment", DONE, || a.health.consuming.load(Ordering::Relaxed)).await;
    for p in 0..4 {
        faults.crash_after_upload(p, 1);
        faults.hold_next_recovery(p);
    }
    h.produce(4_000);
    wait_for("every partition's recovery held after its crash", DONE, || faults.recoveries_held() == 4).await;
    let b = trstream::start(h.config(), Arc::new(Faults::default())).await.unwrap();
    h.produce(4_000);
    wait_for("the new owners committed everything", DONE, || h.all_committed(GROUP)).await;

    faults.release_recoveries();
    let stale = a.stats.clone();
    wait_for("the four late recoveries discarded", DONE, || Stats::get(&stale.stale_recoveries) >= 4).await;
    b.shutdown().await;
    a.shutdown().await;
    // A late worker's commit of its adopted file would have moved a partition's commit back
    // below the log end, and nothing would have committed it forward again.
    assert_eq!(h.committed(GROUP), h.end_offsets(), "every partition still committed to its end");
    h.assert_exactly_once(GROUP, false);
}

/// Issue 11, part 3: the daemon pointed at another cluster (or a re-created topic) with the old
/// buckets. The new log's offsets start again at 0: without the incarnation check the recovery
/// scan adopts the old lake's highest file and every new record below it is skipped as "already
/// in the lake" and committed past. The new log here is *longer* than the old lake, so the log
/// end alone cannot tell: the topic id recorded in the owner records (and raw files) does. Then `kafka.incarnation`
/// ingests the new log beside the old one, and the audit of it is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lake_from_another_incarnation_of_the_topic_stops_its_partitions_until_told_to_reingest() {
    use trstream::produce::Expect;
    let mut h = Harness::new(2).await;
    let pipeline = trstream::start(h.lake_config(), Arc::new(Faults::default())).await.unwrap();
    h.produce(2_000);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    pipeline.shutdown().await;
    let old_files = h.raw_files();
    let old_rows = h.lake_rows();

    // Another cluster, the same buckets; more records on it than the old lake holds.
    h.kafka = trstream::embedded::EmbeddedKafka::start(1, &[(common::TOPIC, 2), (common::DLQ, 1)]).unwrap();
    let before = h.produced.len();
    h.produce(3_000);
    let pipeline = trstream::start(h.lake_config(), Arc::new(Faults::default())).await.unwrap();
    let addr = pipeline.http_addr.expect("http server");
    wait_for("both partitions stopped", DONE, || pipeline.health.stopped.lock().unwrap().len() == 2).await;
    let readyz = http_get(addr, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    for p in 0..2 {
        let line =
            format!("partition {p} stopped: partition transactions/{p}: the partition was claimed under topic id");
        assert!(readyz.contains(&line), "/readyz names the partition and the ids: {readyz}");
    }
    assert!(readyz.contains("topic id") && readyz.contains("kafka.incarnation"), "says why and what to do: {readyz}");
    assert_eq!(common::metric(addr, "trstream_partitions_stopped"), Some(2.0));
    // Stopped means stopped: a while later, nothing was written or committed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.raw_files(), old_files, "nothing written to raw-data");
    assert!(h.committed(GROUP).values().all(|&c| c < 0), "nothing committed: {:?}", h.committed(GROUP));
    pipeline.shutdown().await;

    // Told to re-ingest: the new log goes in under names of its own, the old lake untouched.
    let mut config = h.lake_config();
    config.kafka.incarnation = "2".into();
    let pipeline = trstream::start(config.clone(), Arc::new(Faults::default())).await.unwrap();
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    wait_for("the partitioner to catch up", DONE, || h.partitioner_caught_up_on("transactions~2")).await;
    pipeline.shutdown().await;
    let files = h.raw_files();
    assert!(old_files.iter().all(|f| files.contains(f)), "the old incarnation's files stay");
    let new_files: Vec<_> = files.iter().filter(|(n, _)| n.topic == "transactions~2").collect();
    assert_eq!(new_files.len() + old_files.len(), files.len(), "every new file is named for incarnation 2");
    let rows = h.lake_rows();
    assert!(old_rows.iter().all(|r| rows.contains(r)), "the old incarnation's rows stay");
    let report = h.audit(&config).await;
    let new_valid = h.produced[before..].iter().filter(|g| matches!(g.expect, Expect::Valid(_))).count() as u64;
    assert!(report.clean, "{}", report.to_table());
    assert_eq!(report.total.valid, new_valid);
    assert_eq!(report.total.raw_missing, Some(0));
}

/// I8 (issue 12): a record's class is a function of the record, never of the clock that reads
/// it. Two records are judged by their broker timestamps: A was sent an hour ago (its timestamp
/// says so) with an `event_time` a minute past it, B now with an `event_time` 2.5 s ahead (the
/// skew allowed is 1 s). The worker reads both, then, once the wall clock has passed B's
/// `event_time`, crashes before any upload, and reads them again. Judged by the wall clock, A is
/// valid on both reads and B on the second (it then went to the lake, and with at-least-once
/// dead letters to the DLQ as well). Judged by the record, both are in the DLQ once and in the
/// lake never, and the audit (which reads the same timestamps) agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_judged_by_its_time_is_judged_the_same_when_read_again_later() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let mut h = Harness::new(1).await;
    let mut config = h.drain_only_config();
    config.kafka.exactly_once = true;
    config.validation.max_future_skew = Duration::from_secs(1);
    let faults = Arc::new(Faults::default());
    let pipeline = trstream::start(config.clone(), faults.clone()).await.unwrap();
    let stats = pipeline.stats.clone();
    h.produce(20);
    wait_for("the first records consumed", DONE, || Stats::get(&stats.consumed) >= 20).await;
    let (a, b, c) = (20, 21, 22); // the offsets of the records below
    faults.panic_at_offset(0, c);

    let record = |id: &str, event_time: chrono::DateTime<chrono::Utc>| {
        format!(
            r#"{{"transaction_id":"{id}","user_id":"u-{id}","account_id":"a","transaction_type":"DEBIT","amount":"1.00","currency":"USD","country":"US","channel":"ATM","status":"PENDING","event_time":"{}"}}"#,
            event_time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    };
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &h.kafka.bootstrap).create().unwrap();
    let send = |payload: &str, sent: chrono::DateTime<chrono::Utc>| {
        let r = BaseRecord::<str, str>::to(common::TOPIC).key("u").payload(payload).timestamp(sent.timestamp_millis());
        producer.send(r).map_err(|(e, _)| e).unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();
    };
    let now = chrono::Utc::now();
    let hour_ago = now - chrono::Duration::hours(1);
    send(&record("00000000-0000-4000-8000-00000000000a", hour_ago + chrono::Duration::minutes(1)), hour_ago);
    let b_time = now + chrono::Duration::milliseconds(2_500);
    send(&record("00000000-0000-4000-8000-00000000000b", b_time), now);
    wait_for("A and B consumed", DONE, || Stats::get(&stats.consumed) >= 22).await;
    wait_for("the wall clock passes B's event_time", DONE, || chrono::Utc::now() > b_time).await;
    send(&record("00000000-0000-4000-8000-00000000000c", chrono::Utc::now()), chrono::Utc::now());
    wait_for("the worker crashed at C and was restarted", DONE, || Stats::get(&stats.restarts) == 1).await;
    wait_for("A, B and C read again", DONE, || Stats::get(&stats.consumed) >= 22 + 23).await;
    pipeline.shutdown().await;
    assert_eq!(stats.committed().get(&0).copied(), Some(c + 1), "the drain committed everything");

    let in_lake: Vec<i64> = h.lake_rows().iter().map(|r| r.2).collect();
    assert!(in_lake.contains(&c), "C is in the lake: {in_lake:?}");
    for (name, offset) in [("A", a), ("B", b)] {
        assert!(!in_lake.contains(&offset), "{name} is not in the lake");
        let dead: Vec<_> = h.dlq_records().into_iter().filter(|d| d.3 == offset).collect();
        assert_eq!(dead.len(), 1, "{name} is in the DLQ once: {dead:?}");
        assert_eq!(dead[0].1, "event_time_out_of_range", "{name}");
    }
    let report = h.audit(&config).await;
    assert!(report.clean, "the audit classifies as the daemon did: {}", report.to_table());
}

/// Sends one record with `key` and `payload` to `partition`; returns its offset.
async fn send_raw(h: &Harness, partition: i32, key: &[u8], payload: &[u8]) -> i64 {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &h.kafka.bootstrap)
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    let record = FutureRecord::<[u8], [u8]>::to(common::TOPIC).partition(partition).key(key).payload(payload);
    let sent = producer.send(record, Duration::from_secs(30)).await;
    sent.map_err(|(e, _)| e).expect("the broker takes the record").offset
}

/// Letters that are each within the record size, but not their key or the `detail` quoting their
/// bad value, against a DLQ topic that takes 100 kB records (issue 12): before, both were
/// retried for ever (the key cannot be cut, the detail header was as large as the value) and
/// the partition stalled with `/readyz` 200. Now the key is dropped with a header naming its
/// length, the detail is cut, and the payload goes as its prefix.
async fn huge_keys_and_details_reach_a_capped_dlq_topic(exactly_once: bool) {
    let mut h = Harness::new(1).await;
    let mut config = h.config();
    config.kafka.exactly_once = exactly_once;
    config.kafka.properties.insert("message.max.bytes".into(), "100000".into());
    config.validation.max_record_bytes = 1 << 20;
    let pipeline = trstream::start(config, Arc::new(Faults::default())).await.unwrap();
    let stats = pipeline.stats.clone();
    h.produce(300);
    let huge_key = vec![b'k'; 150 * 1024];
    let keyed = send_raw(&h, 0, &huge_key, b"not json at all").await;
    let quoted = format!(
        r#"{{"transaction_id":"6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b","user_id":"u","account_id":"a","transaction_type":"{}","amount":"1.00","currency":"USD","country":"US","channel":"ATM","status":"PENDING","event_time":"2026-01-01T00:00:00Z"}}"#,
        "X".repeat(150 * 1024)
    );
    let detailed = send_raw(&h, 0, b"u", quoted.as_bytes()).await;
    h.produce(300);
    let end = h.end_offsets()[&0];
    wait_for("every offset committed past both", DONE, || stats.committed().get(&0) == Some(&end)).await;
    pipeline.shutdown().await;

    let dead = h.dlq_messages();
    let at = |offset: i64| {
        let found: Vec<_> = dead.iter().filter(|m| m.header("source_offset") == offset.to_string()).collect();
        assert_eq!(found.len(), 1, "offset {offset} is in the DLQ once");
        found[0]
    };
    let k = at(keyed);
    assert_eq!(k.key, None, "the key is dropped");
    assert_eq!(k.header("key_dropped_bytes"), (150 * 1024).to_string(), "and its length named");
    assert_eq!(k.payload, b"not json at all", "the payload is whole");
    assert_eq!(k.header("reason"), "malformed_json");
    let d = at(detailed);
    assert_eq!(d.header("reason"), "invalid_enum");
    assert_eq!(d.key.as_deref(), Some(&b"u"[..]));
    let detail = d.header("detail");
    assert!(detail.len() <= trstream::record::MAX_DETAIL_BYTES && detail.contains("cut from"), "{detail}");
    assert_eq!(d.payload.len(), trstream::dlq::TRUNCATED_PAYLOAD_BYTES, "the payload goes as its prefix");
    assert!(quoted.as_bytes().starts_with(&d.payload));
    assert_eq!(d.header("payload_truncated_from"), quoted.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_keys_and_details_reach_a_capped_dlq_topic_at_least_once() {
    huge_keys_and_details_reach_a_capped_dlq_topic(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_keys_and_details_reach_a_capped_dlq_topic_in_transactions() {
    huge_keys_and_details_reach_a_capped_dlq_topic(true).await;
}

/// A dead letter the DLQ refuses whatever is cut (a topic that takes 20 kB records, below the
/// 64 KiB prefix) parks its partition, loudly: `/readyz` 503 naming the partition, the offset and
/// what to change, `trstream_partitions_stopped` 1, nothing committed past the record, no restart
/// loop; the other partition goes on. Before, the send was retried for ever with `/readyz` 200.
async fn a_dead_letter_refused_for_good_parks_its_partition(exactly_once: bool) {
    let mut h = Harness::new(2).await;
    let mut config = h.config();
    config.kafka.exactly_once = exactly_once;
    config.kafka.properties.insert("message.max.bytes".into(), "20000".into());
    let pipeline = trstream::start(config, Arc::new(Faults::default())).await.unwrap();
    let (stats, addr) = (pipeline.stats.clone(), pipeline.http_addr.expect("http server"));
    h.produce(400);
    let big = vec![b'x'; 100_000];
    let refused = send_raw(&h, 0, b"big", &big).await;
    h.produce(400);
    wait_for("partition 0 parked", DONE, || pipeline.health.stopped.lock().unwrap().contains_key(&0)).await;
    let end = h.end_offsets();
    wait_for("partition 1 committed to its end", DONE, || stats.committed().get(&1) == end.get(&1)).await;
    let readyz = http_get(addr, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    let says = format!(
        "partition 0 stopped: partition 0: the DLQ topic transactions.dlq refuses the dead letter of offset {refused} (oversized) for good"
    );
    assert!(readyz.contains(&says) && readyz.contains("max.message.bytes"), "names it and what to do: {readyz}");
    assert_eq!(common::metric(addr, "trstream_partitions_stopped"), Some(1.0));
    assert!(
        stats.committed().get(&0).is_none_or(|&c| c <= refused),
        "nothing committed past it: {:?}",
        stats.committed()
    );
    assert_eq!(Stats::get(&stats.restarts), 0, "parked, not restarted");
    pipeline.shutdown().await;
    assert!(h.dlq_records().iter().all(|d| (d.2, d.3) != (0, refused)), "the record is not in the DLQ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_for_good_parks_its_partition_at_least_once() {
    a_dead_letter_refused_for_good_parks_its_partition(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_for_good_parks_its_partition_in_transactions() {
    a_dead_letter_refused_for_good_parks_its_partition(true).await;
}

/// A fatal consumer error (librdkafka's own, raised through its test hook, as a static member
/// fenced by another would get) stops the daemon at once, naming it: `/healthz` 503, no restart
/// loop. Before, the consumer was polled for ever with `/healthz` 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_consumer_error_stops_the_daemon_naming_the_cause() {
    let mut h = Harness::new(1).await;
    let faults = Arc::new(Faults::default());
    let mut pipeline = trstream::start(h.config(), faults.clone()).await.unwrap();
    let (stats, addr) = (pipeline.stats.clone(), pipeline.http_addr.expect("http server"));
    h.produce(200);
    wait_for("all offsets committed", DONE, || h.all_committed(GROUP)).await;
    faults.fatal_consumer_error();
    let reason = tokio::time::timeout(DONE, pipeline.stopped()).await.expect("the daemon stops");
    assert!(reason.contains("fatal error") && reason.contains("injected fault: a fatal consumer error"), "{reason}");
    assert!(http_get(addr, "/healthz").starts_with("HTTP/1.1 503"));
    assert_eq!(Stats::get(&stats.ingest_restarts), 0, "not restarted");
    pipeline.shutdown().await;
}

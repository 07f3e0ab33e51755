//! The one shared harness of the integration tests: the embedded mock cluster and s3s-fs, a
//! producer that remembers what it sent, and readers of the lake, the DLQ and the committed
//! offsets, so each test states only its scenario and its expectations.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use trstream::config::Config;
use trstream::embedded::{EmbeddedKafka, EmbeddedS3};
use trstream::lake::{HivePartition, RawFileName};
use trstream::produce::{Expect, GenOptions, Generated, Generator};
use trstream::record::RejectReason;

pub const TOPIC: &str = "transactions";
pub const DLQ: &str = "transactions.dlq";
pub const GROUP: &str = "trstream-test";

/// One DLQ record as a reader gets it.
#[derive(Debug)]
pub struct DlqMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl DlqMessage {
    /// A header's value ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).cloned().unwrap_or_default()
    }
}

pub struct Harness {
    pub kafka: EmbeddedKafka,
    pub s3: EmbeddedS3,
    pub dir: tempfile::TempDir,
    pub partitions: i32,
    pub produced: Vec<Generated>,
    generator: Generator,
}

impl Harness {
    pub async fn new(partitions: i32) -> Harness {
        let _ = tracing_subscriber_init();
        let kafka = EmbeddedKafka::start(1, &[(TOPIC, partitions), (DLQ, 1)]).expect("mock cluster");
        let dir = tempfile::tempdir().expect("tempdir");
        let s3 = EmbeddedS3::start(dir.path(), 0, &["raw-data"]).await.expect("s3s-fs");
        let generator =
            Generator::new(GenOptions { invalid_ratio: 0.01, oversize_bytes: 4097, seed: 7, ..Default::default() });
        Harness { kafka, s3, dir, partitions, produced: Vec::new(), generator }
    }

    /// A configuration for this harness: small flushes so tests see many files.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        self.kafka.configure(&mut c.kafka);
        c.kafka.group_id = GROUP.into();
        c.kafka.session_timeout = Duration::from_secs(10);
        c.shutdown.drain_timeout = Duration::from_secs(8);
        c.shutdown.timeout = Duration::from_secs(20);
        self.s3.configure(&mut c.s3);
        c.s3.create_bucket = true;
        c.s3.request_timeout = Duration::from_secs(2);
        c.flush.max_rows = 2_000;
        c.flush.max_age = Duration::from_millis(500);
        c.validation.max_record_bytes = 4096;
        c.upload.retry_max_backoff = Duration::from_millis(500);
        c.http.listen = "127.0.0.1:0".into();
        c.validate().expect("test config is valid");
        c
    }

    /// A configuration under which nothing flushes on its own for minutes: only a drain (revoke
    /// or shutdown) can write and commit.
    /// The partitioner and compactor at test speed: merges as soon as two files are small.
    pub fn lake_config(&self) -> Config {
        let mut c = self.config();
        c.partitioner.scan_interval = Duration::from_secs(1);
        c.compactor.interval = Duration::from_millis(300);
        c.compactor.min_files = 2;
        // Long enough for the late writes the tests inject (a few seconds), short enough that a
        // rolled-back merge does not hold compaction up for long.
        c.compactor.late_write_window = Duration::from_secs(5);
        c.compactor.small_file_bytes = 64 << 20;
        c.compactor.target_file_bytes = 256 << 20;
        c.validate().expect("test config is valid");
        c
    }

    /// Table files on disk: (Hive partition, source name).
    pub fn table_files(&self) -> Vec<(HivePartition, RawFileName)> {
        self.table_files_with_paths().into_iter().map(|(_, h, n)| (h, n)).collect()
    }

    /// The table's data files with their paths on disk.
    pub fn table_files_with_paths(&self) -> Vec<(PathBuf, HivePartition, RawFileName)> {
        let root = self.dir.path().join("tb-transactions");
        let mut out = Vec::new();
        walk(&root, &mut |p| {
            let key = p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
            if let Some((h, n)) = HivePartition::parse_key(&key) {
                out.push((p.to_path_buf(), h, n));
            }
        });
        out.sort();
        out
    }

    /// Whether every raw file is below its partition's watermark.
    pub fn partitioner_caught_up(&self) -> bool {
        self.partitioner_caught_up_on(TOPIC)
    }

    /// [`Harness::partitioner_caught_up`] for the files of one lake topic (`Config::lake_topic`).
    pub fn partitioner_caught_up_on(&self, lake_topic: &str) -> bool {
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for (n, _) in self.raw_files().into_iter().filter(|(n, _)| n.topic == lake_topic) {
            let e = last.entry(n.partition).or_insert(n.last_offset);
            *e = (*e).max(n.last_offset);
        }
        last.iter().all(|(&p, &end)| {
            let path =
                self.dir.path().join("tb-transactions").join(trstream::lake::table::watermark_key(lake_topic, p));
            std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<trstream::lake::table::Watermark>(&b).ok())
                .is_some_and(|w| w.last_offset == end)
        })
    }

    /// The most files any (Hive partition, Kafka partition) group holds.
    pub fn max_files_per_group(&self) -> usize {
        let mut groups: HashMap<(HivePartition, i32), usize> = HashMap::new();
        for (h, n) in self.table_files() {
            *groups.entry((h, n.partition)).or_default() += 1;
        }
        groups.values().copied().max().unwrap_or(0)
    }

    /// The most files any Hive partition holds.
    pub fn max_files_per_hive_partition(&self) -> usize {
        let mut groups: HashMap<HivePartition, usize> = HashMap::new();
        for (h, _) in self.table_files() {
            *groups.entry(h).or_default() += 1;
        }
        groups.values().copied().max().unwrap_or(0)
    }

    /// Intents left under `_trstream/compactions/`.
    pub fn open_intents(&self) -> usize {
        let mut n = 0;
        walk(&self.dir.path().join("tb-transactions").join("_trstream").join("compactions"), &mut |_| n += 1);
        n
    }

    pub async fn audit(&self, config: &Config) -> trstream::audit::AuditReport {
        let opts = trstream::audit::AuditOptions { raw: true, timeout: Duration::from_secs(30), progress: false };
        trstream::audit::audit(config, &opts).await.expect("audit runs")
    }

    /// Valid records produced so far.
    pub fn valid_produced(&self) -> u64 {
        self.produced.iter().filter(|g| matches!(g.expect, Expect::Valid(_))).count() as u64
    }

    pub fn drain_only_config(&self) -> Config {
        let mut c = self.config();
        c.flush.max_age = Duration::from_secs(300);
        c.flush.max_rows = 1_000_000;
        c
    }

    /// Produces `n` generated records (1% invalid, every reason) and waits for their acks.
    pub fn produce(&mut self, n: usize) {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.bootstrap)
            .set("linger.ms", "10")
            .set("compression.type", "lz4")
            .create()
            .expect("producer");
        for _ in 0..n {
            let g = self.generator.next_record();
            trstream::produce::send(&producer, TOPIC, &g).expect("enqueue a record");
            self.produced.push(g);
        }
        producer.flush(Duration::from_secs(30)).expect("all produced records acknowledged");
    }

    fn reader(&self, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer")
    }

    /// Log end offsets of the source topic.
    pub fn end_offsets(&self) -> BTreeMap<i32, i64> {
        let c = self.reader("harness-watermarks");
        (0..self.partitions)
            .map(|p| (p, c.fetch_watermarks(TOPIC, p, Duration::from_secs(5)).expect("watermarks").1))
            .collect()
    }

    /// Committed offsets of the daemon's group, as the broker has them.
    pub fn committed(&self, group: &str) -> BTreeMap<i32, i64> {
        let c = self.reader(group);
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(TOPIC, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(5)).expect("committed offsets");
        got.elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { o } else { -1 }))
            .collect()
    }

    pub fn all_committed(&self, group: &str) -> bool {
        self.committed(group) == self.end_offsets()
    }

    /// Every raw file on disk, parsed from its name.
    pub fn raw_files(&self) -> Vec<(RawFileName, PathBuf)> {
        let mut out = Vec::new();
        let quarantine = self.dir.path().join("raw-data").join("_trstream");
        walk(&self.dir.path().join("raw-data"), &mut |p| {
            if p.starts_with(&quarantine) {
                return; // moved aside (I10), or the owner records
            }
            if let Some(n) = p.file_name().and_then(|f| f.to_str()).and_then(RawFileName::parse) {
                out.push((n, p.to_path_buf()));
            }
        });
        out.sort();
        out
    }

    /// `(transaction_id, kafka_partition, kafka_offset)` of every row in `raw-data`.
    pub fn lake_rows(&self) -> Vec<(String, i32, i64)> {
        let mut rows = Vec::new();
        for (name, path) in self.raw_files() {
            let file = std::fs::File::open(&path).expect("open raw file");
            let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet").build().expect("reader");
            for batch in reader {
                let batch = batch.expect("batch");
                let ids = batch.column_by_name("transaction_id").unwrap();
                let ids = ids.as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
                let parts = batch.column_by_name("kafka_partition").unwrap();
                let parts = parts.as_any().downcast_ref::<arrow_array::Int32Array>().unwrap();
                let offs = batch.column_by_name("kafka_offset").unwrap();
                let offs = offs.as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
                for i in 0..batch.num_rows() {
                    assert_eq!(parts.value(i), name.partition, "row in the file of its partition");
                    assert!(
                        (name.first_offset..=name.last_offset).contains(&offs.value(i)),
                        "row inside the file's range"
                    );
                    rows.push((ids.value(i).to_string(), parts.value(i), offs.value(i)));
                }
            }
        }
        rows
    }

    /// `(payload, reason, source_partition, source_offset)` of every DLQ record.
    pub fn dlq_records(&self) -> Vec<(Vec<u8>, String, i32, i64)> {
        self.dlq_messages()
            .into_iter()
            .map(|m| {
                assert!(!m.header("detail").is_empty(), "every DLQ record explains itself");
                assert_eq!(m.header("source_topic"), TOPIC);
                let reason = m.header("reason");
                let partition = m.header("source_partition").parse().unwrap();
                let offset = m.header("source_offset").parse().unwrap();
                (m.payload, reason, partition, offset)
            })
            .collect()
    }

    /// Every DLQ record (committed ones: librdkafka reads `read_committed`), whole.
    pub fn dlq_messages(&self) -> Vec<DlqMessage> {
        let c = self.reader("harness-dlq");
        let (_, high) = c.fetch_watermarks(DLQ, 0, Duration::from_secs(5)).expect("dlq watermarks");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(DLQ, 0, Offset::Beginning).unwrap();
        c.assign(&tpl).expect("assign dlq");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (out.len() as i64) < high && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let h = m.headers().expect("DLQ records carry headers");
                let headers = h
                    .iter()
                    .map(|x| {
                        (
                            x.key.to_string(),
                            x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default(),
                        )
                    })
                    .collect();
                out.push(DlqMessage {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        out
    }

    /// The end state every scenario must reach: each valid id exactly once in raw-data, each
    /// invalid record in the DLQ with its reason (at least once; exactly once when
    /// `dlq_exactly_once`), committed offsets at the log end.
    pub fn assert_exactly_once(&self, group: &str, dlq_exactly_once: bool) {
        self.assert_lake_and_dlq(dlq_exactly_once);
        assert_eq!(self.committed(group), self.end_offsets(), "committed offsets at the log end");
    }

    /// [`Harness::assert_exactly_once`] but for the committed offsets.
    pub fn assert_lake_and_dlq(&self, dlq_exactly_once: bool) {
        let rows = self.lake_rows();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (id, _, _) in &rows {
            *counts.entry(id.as_str()).or_default() += 1;
        }
        let expected_valid: Vec<&str> = self
            .produced
            .iter()
            .filter_map(|g| match &g.expect {
                Expect::Valid(id) => Some(id.as_str()),
                Expect::Invalid(_) => None,
            })
            .collect();
        let missing = expected_valid.iter().filter(|id| !counts.contains_key(*id)).count();
        let duplicated = counts.values().filter(|c| **c > 1).count();
        let unexpected = counts.len() - (expected_valid.len() - missing);
        assert_eq!((missing, duplicated, unexpected), (0, 0, 0), "lake: missing, duplicated, unexpected ids");
        assert_eq!(rows.len(), expected_valid.len());

        let mut expected_invalid: Vec<(Vec<u8>, String)> = self
            .produced
            .iter()
            .filter_map(|g| match g.expect {
                Expect::Invalid(r) => Some((g.payload.clone(), r.as_str().to_string())),
                Expect::Valid(_) => None,
            })
            .collect();
        expected_invalid.sort();
        let dlq = self.dlq_records();
        let mut by_source: BTreeMap<(i32, i64), (Vec<u8>, String)> = BTreeMap::new();
        for (payload, reason, p, o) in &dlq {
            assert!(RejectReason::parse(reason).is_some(), "known reason {reason}");
            by_source.insert((*p, *o), (payload.clone(), reason.clone()));
        }
        if dlq_exactly_once {
            assert_eq!(dlq.len(), by_source.len(), "no DLQ duplicates");
        }
        let mut got: Vec<(Vec<u8>, String)> = by_source.into_values().collect();
        got.sort();
        assert_eq!(got.len(), expected_invalid.len(), "every invalid record dead-lettered");
        assert!(got == expected_invalid, "DLQ payloads and reasons match what was produced");
    }
}

/// `GET path` on a local HTTP server; the raw response (status line, headers, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Sum of a Prometheus series over its labels, from `/metrics` at `addr`; `None` when absent.
/// `name` may end in its first labels, `trstream_actor_restarts_total{actor="compactor"`.
pub fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics");
    let follows: &[char] = if name.contains('{') { &[',', '}'] } else { &['{', ' '] };
    let values: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(follows)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits for `cond` with a deadline, polling; panics naming `what` on timeout.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

fn tracing_subscriber_init() -> Result<(), ()> {
    if std::env::var_os("TRSTREAM_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::from_env("TRSTREAM_LOG");
        tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init().map_err(|_| ())
    } else {
        Ok(())
    }
}

/// `trstream run` on `config`, as a process of its own.
pub fn spawn_daemon(h: &Harness, config: &Config) -> std::process::Child {
    let file = h.dir.path().join("trstream.toml");
    std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_trstream"))
        .args(["run", "--config", file.to_str().unwrap()])
        .env("TRSTREAM_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("trstream run starts")
}

/// SIGTERM, then the exit, within a minute.
pub async fn stop_daemon(mut child: std::process::Child) {
    assert!(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s:?}");
            return;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within 60s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Chaos against real, separately running services: Tansu as the broker, Garage as the store,
//! trstream daemons as OS processes, killed for real. Each scenario produces a known set of
//! transactions (1% invalid, every reason), injects its faults while ingestion runs, lets the
//! system recover, and ends with `trstream audit --raw`: nothing missing, nothing duplicated,
//! the DLQ holding exactly the invalid records.
//!
//! `CHAOS_SEED=<n>` replays a run: the seed decides the records and every fault's moment.

mod common;
mod real;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use real::{DLQ, Daemon, GROUP, Garage, TOPIC, Tansu, wait_until};
use trstream::config::Config;
use trstream::produce::{Expect, GenOptions, Generator};

const PARTITIONS: i32 = 4;

fn seed() -> u64 {
    std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// The broker, the store, the records produced, and the daemon's settings for one scenario.
struct Scenario {
    name: &'static str,
    seed: u64,
    rng: StdRng,
    dir: Keep,
    tansu: Tansu,
    garage: Garage,
    config: Config,
    faults: u64,
    started: Instant,
}

/// The scenario's folder (logs, configs, the broker's and the store's data): deleted after a
/// pass, kept and named after a failure.
struct Keep(Option<tempfile::TempDir>);

impl Keep {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.0.take()
        {
            eprintln!("kept for inspection (logs, configs, data): {}", d.keep().display());
        }
    }
}

/// A service the harness kills and restarts.
enum Service {
    Broker,
    Store,
}

/// What a producer thread sent.
#[derive(Default)]
struct Sent {
    valid: AtomicU64,
    invalid: AtomicU64,
    done: AtomicBool,
}

impl Scenario {
    fn new(name: &'static str) -> Scenario {
        let seed = seed();
        eprintln!("[{name}] seed {seed} (replay with CHAOS_SEED={seed})");
        let dir = Keep(Some(tempfile::Builder::new().prefix("trstream-chaos-").tempdir().unwrap()));
        let tansu = Tansu::start(&dir.path().join("tansu"));
        tansu.create_topic(TOPIC, PARTITIONS);
        tansu.create_topic(DLQ, PARTITIONS);
        let garage = Garage::start(&dir.path().join("garage"));
        let mut config = Config::default();
        config.kafka.brokers = tansu.bootstrap.clone();
        config.kafka.group_id = GROUP.into();
        config.kafka.session_timeout = Duration::from_secs(10);
        config.shutdown.drain_timeout = Duration::from_secs(8);
        config.shutdown.timeout = Duration::from_secs(20);
        garage.configure(&mut config.s3);
        config.s3.request_timeout = Duration::from_secs(3);
        config.flush.max_rows = 2_000;
        config.flush.max_age = Duration::from_millis(700);
        config.upload.retry_max_backoff = Duration::from_secs(1);
        config.partitioner.scan_interval = Duration::from_secs(1);
        config.compactor.interval = Duration::from_millis(500);
        config.compactor.min_files = 2;
        config.validation.max_record_bytes = 4096;
        config.validate().expect("chaos config is valid");
        Scenario {
            name,
            seed,
            rng: StdRng::seed_from_u64(seed),
            dir,
            tansu,
            garage,
            config,
            faults: 0,
            started: Instant::now(),
        }
    }

    /// Produces `count` records at `rate`/s on a thread (retrying through broker outages).
    fn produce(&self, count: u64, rate: u64) -> (std::thread::JoinHandle<()>, Arc<Sent>) {
        let sent = Arc::new(Sent::default());
        let (sent2, bootstrap, seed) = (sent.clone(), self.tansu.bootstrap.clone(), self.seed);
        let handle = std::thread::spawn(move || {
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("linger.ms", "20")
                .set("message.timeout.ms", "300000")
                .create()
                .expect("producer");
            let mut g =
                Generator::new(GenOptions { invalid_ratio: 0.01, oversize_bytes: 4097, seed, ..Default::default() });
            let start = Instant::now();
            for i in 0..count {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let r = g.next_record();
                trstream::produce::send(&producer, TOPIC, &r).expect("enqueue");
                match r.expect {
                    Expect::Valid(_) => sent2.valid.fetch_add(1, Ordering::Relaxed),
                    Expect::Invalid(_) => sent2.invalid.fetch_add(1, Ordering::Relaxed),
                };
            }
            producer.flush(Duration::from_secs(300)).expect("every record acknowledged");
            sent2.done.store(true, Ordering::Relaxed);
        });
        (handle, sent)
    }

    /// A random moment in `range` (seconds), from the seed.
    fn pause(&mut self, range: std::ops::Range<f64>) -> Duration {
        Duration::from_secs_f64(self.rng.random_range(range))
    }

    /// After a random wait in `after`, SIGKILLs `service`, keeps it down for a random time in
    /// `down` (seconds), and restarts it with its data.
    fn outage(&mut self, service: Service, after: std::ops::Range<f64>, down: std::ops::Range<f64>) {
        std::thread::sleep(self.pause(after));
        match service {
            Service::Broker => self.tansu.kill(),
            Service::Store => self.garage.kill(),
        }
        self.faults += 1;
        std::thread::sleep(self.pause(down));
        match service {
            Service::Broker => self.tansu.restart(),
            Service::Store => self.garage.restart(),
        }
    }

    /// Waits until `daemon` has committed the whole topic, stops it gracefully (the partitioner
    /// catches up on the way out), and audits. Prints the scenario's line and asserts it clean.
    fn finish(self, mut daemon: Daemon, sent: &Sent, restarts: u64) {
        let end = self.tansu.end_offsets(TOPIC, PARTITIONS);
        wait_until("the daemon to commit the whole topic", Duration::from_secs(180), || {
            daemon.assert_running();
            self.tansu.committed(GROUP, TOPIC, PARTITIONS) == end
        });
        wait_until("the partitioner to catch up", Duration::from_secs(120), || {
            daemon.metric("trstream_partitioner_lag_files") == Some(0.0)
        });
        // Supervisor restarts inside the last daemon (workers whose commit or upload failed...).
        let actor_restarts = daemon.metric("trstream_actor_restarts_total").unwrap_or(0.0) as u64;
        assert!(daemon.terminate(Duration::from_secs(60)), "the last daemon exits 0 on SIGTERM");
        let a = real::audit(self.dir.path(), &self.config);
        let produced = sent.valid.load(Ordering::Relaxed) + sent.invalid.load(Ordering::Relaxed);
        eprintln!(
            "[{}] produced {produced} ({} invalid; {} in the log), faults injected {}, restarts observed: {restarts} daemon, {actor_restarts} actor (last daemon), missing {}, duplicated {}, raw missing {}, raw duplicated {}, unexpected {}, in {:.0?} (seed {})",
            self.name,
            sent.invalid.load(Ordering::Relaxed),
            a.records,
            self.faults,
            a.missing,
            a.duplicated,
            a.raw_missing,
            a.raw_duplicated,
            a.unexpected,
            self.started.elapsed(),
            self.seed,
        );
        // A producer retrying through a broker kill may have written a batch twice: each copy
        // is its own offset, which trstream must ingest exactly once like any other.
        assert!(a.records >= produced, "the audit read every record produced: {} < {produced}", a.records);
        assert!(a.invalid >= sent.invalid.load(Ordering::Relaxed));
        assert_eq!(a.in_dlq, a.invalid, "the DLQ holds exactly the invalid records");
        assert_eq!((a.missing, a.duplicated, a.unexpected), (0, 0, 0), "{a:?}");
        assert_eq!((a.raw_missing, a.raw_duplicated), (0, 0), "{a:?}");
        assert!(a.clean, "{a:?}");
    }
}

#[test]
#[ignore = "Tansu 0.6's group coordinator strands the partitions of SIGKILLed members, even with \
            static membership under load (supervision.md, known limits); run with --ignored"]
fn sigkill_of_the_daemon_at_random_moments_loses_and_duplicates_nothing() {
    let mut s = Scenario::new("daemon SIGKILL");
    // Static membership: the restarted daemon takes the killed one's place in the group at once.
    // Without it, Tansu 0.6 leaves the killed members' partitions assigned to them (see README).
    s.config.kafka.properties.insert("group.instance.id".into(), "chaos-daemon".into());
    let (producer, sent) = s.produce(40_000, 2_500);
    let mut daemon = Daemon::start(s.dir.path(), "daemon", &s.config);
    // Kill it six times at random moments, 1 to 4 s apart: with 0.7 s flushes that lands
    // mid-buffer, mid-upload and between upload and commit, and sometimes mid-recovery.
    for _ in 0..6 {
        let wait = s.pause(1.0..4.0);
        std::thread::sleep(wait);
        daemon.assert_running();
        daemon.kill();
        s.faults += 1;
        daemon = Daemon::start(s.dir.path(), "daemon", &s.config);
    }
    producer.join().unwrap();
    assert!(sent.done.load(Ordering::Relaxed));
    let restarts = s.faults;
    s.finish(daemon, &sent, restarts);
}

#[test]
fn sigkill_of_the_broker_then_restart_loses_and_duplicates_nothing() {
    let mut s = Scenario::new("broker SIGKILL");
    let (producer, sent) = s.produce(30_000, 2_500);
    let mut daemon = Daemon::start(s.dir.path(), "daemon", &s.config);
    for _ in 0..2 {
        s.outage(Service::Broker, 2.0..4.0, 3.0..6.0);
    }
    producer.join().unwrap();
    assert!(sent.done.load(Ordering::Relaxed));
    daemon.assert_running();
    s.finish(daemon, &sent, 0);
}

#[test]
fn sigkill_of_the_store_for_seconds_loses_nothing_and_memory_stays_capped() {
    let mut s = Scenario::new("store SIGKILL");
    // Small caps, so that an outage of seconds fills them and back-pressure has to hold.
    s.config.memory.partition_max_buffered_bytes = 1 << 20;
    s.config.memory.total_max_buffered_bytes = 3 << 20;
    s.config.flush.max_bytes = 512 << 10;
    s.config.validate().unwrap();
    let cap = s.config.memory.total_max_buffered_bytes as f64;
    let (producer, sent) = s.produce(30_000, 2_500);
    let daemon = Daemon::start(s.dir.path(), "daemon", &s.config);
    let (stop, peak_buffered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let watcher = {
        let (stop, peak, http) = (stop.clone(), peak_buffered.clone(), daemon.http);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = common::metric(http, "trstream_buffered_bytes") {
                    peak.fetch_max(b as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    for _ in 0..2 {
        // Far longer than the first upload backoff (100 ms): retries reach their ceiling.
        s.outage(Service::Store, 1.5..3.0, 4.0..8.0);
    }
    producer.join().unwrap();
    assert!(sent.done.load(Ordering::Relaxed));
    let peak = peak_buffered.load(Ordering::Relaxed) as f64;
    eprintln!("[store SIGKILL] peak buffered {peak} bytes of a {cap} byte cap");
    assert!(peak > 0.0, "buffered bytes were observed");
    // A routing round ends at the record that crosses the cap; a round's first record may cross
    // it again while the partitions are being paused: a few records (here at most 4 KiB each).
    let slack = (8 * (s.config.validation.max_record_bytes + 1024)) as f64;
    assert!(
        peak <= cap + slack,
        "buffered bytes stayed under memory.total_max_buffered_bytes: {peak} > {cap} + {slack}"
    );
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    s.finish(daemon, &sent, 0);
}

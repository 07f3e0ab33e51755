//! Fault injection, for tests only. Nothing in the configuration can turn it on.
//!
//! Two ways in:
//! - In-process tests arm a [`Faults`] directly: a worker panics at an offset, a flush fails
//!   after its upload, the partitioner or compactor fails at a [`FaultPoint`].
//! - The chaos tests, which run `trstream run` as a process, set `TRSTREAM_FAULTS` (parsed by
//!   [`Faults::from_spec`]): actors panic, or the process SIGKILLs itself, at random moments
//!   drawn from a seed. The daemon logs a warning at start-up when it is set.
//!
//! Unarmed, every check is one relaxed atomic load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::lake::{LakeStore, Precondition, StoreError, WorkError};

/// The environment variable of [`Faults::from_spec`].
pub const ENV: &str = "TRSTREAM_FAULTS";

/// Test-only fault hooks; see the module documentation.
#[derive(Debug, Default)]
pub struct Faults {
    /// Any fault set at all: keeps the per-record check to one relaxed load in production.
    armed: AtomicBool,
    panic_at: Mutex<HashMap<i32, i64>>,
    crash_after_upload: Mutex<HashMap<i32, u32>>,
    points: Mutex<HashMap<FaultPoint, u32>>,
    outages: Mutex<HashMap<FaultPoint, u32>>,
    /// Partitions whose next recovery waits between its scan and its spawn,
    /// whether [`Faults::release_recoveries`] was called, and how many are waiting.
    recovery_gate: Mutex<(std::collections::HashSet<i32>, bool)>,
    recoveries_held: AtomicU32,
    /// Late writes struck and not landed yet.
    late_pending: std::sync::Arc<AtomicU32>,
    random: Option<RandomFaults>,
    fatal_consumer_error: AtomicBool,
}

/// Steps of the partitioner and the compactor where a test can make the actor fail (I6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// The partitioner wrote the first table file of a raw file, not the others nor the watermark.
    PartitionerAfterFirstOutput,
    /// The partitioner wrote every table file of a raw file, not the watermark.
    PartitionerBeforeWatermark,
    /// The partitioner wrote the watermark (with [`Faults::outage_at`]: and never heard back).
    PartitionerAfterWatermark,
    /// The compactor wrote its intent, not the merged file.
    CompactorAfterIntent,
    /// The compactor wrote the merged file, deleted no input.
    CompactorAfterOutput,
    /// The compactor deleted the first input, not the others nor the intent.
    CompactorMidDeletes,
}

impl FaultPoint {
    fn kind(self) -> Kind {
        match self {
            FaultPoint::PartitionerAfterFirstOutput
            | FaultPoint::PartitionerBeforeWatermark
            | FaultPoint::PartitionerAfterWatermark => Kind::Partitioner,
            _ => Kind::Compactor,
        }
    }
}

/// The actor kinds a random panic can strike (`panic.<kind>` in `TRSTREAM_FAULTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PartitionWorker,
    ConsumerDriver,
    Partitioner,
    Compactor,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::PartitionWorker, Kind::ConsumerDriver, Kind::Partitioner, Kind::Compactor];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PartitionWorker => "partition_worker",
            Kind::ConsumerDriver => "consumer_driver",
            Kind::Partitioner => "partitioner",
            Kind::Compactor => "compactor",
        }
    }
}

/// Moments of a flush at which the process can SIGKILL itself (`kill.<moment>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// Records of an open window are buffered, nothing of them uploaded.
    MidBuffer,
    /// The file's PUT is in flight.
    MidUpload,
    /// The file is in the lake, its offsets are not committed.
    AfterUpload,
}

impl Moment {
    const ALL: [Moment; 3] = [Moment::MidBuffer, Moment::MidUpload, Moment::AfterUpload];

    pub fn as_str(self) -> &'static str {
        match self {
            Moment::MidBuffer => "mid_buffer",
            Moment::MidUpload => "mid_upload",
            Moment::AfterUpload => "after_upload",
        }
    }
}

/// The writes a late-write fault can strike (`late.<kind>`): a PUT that fails at the client
/// (it returns a retryable error) and that the store commits anyway a few seconds later, the way
/// a request that timed out at the client can still be applied (issue 11, part 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A worker's raw file.
    Raw,
    /// A partitioner output in the table.
    Table,
    /// A partitioner watermark.
    Watermark,
    /// A compactor's merged file.
    Merged,
    /// A compactor's intent.
    Intent,
}

impl WriteKind {
    const ALL: [WriteKind; 5] =
        [WriteKind::Raw, WriteKind::Table, WriteKind::Watermark, WriteKind::Merged, WriteKind::Intent];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Raw => "raw",
            WriteKind::Table => "table",
            WriteKind::Watermark => "watermark",
            WriteKind::Merged => "merged",
            WriteKind::Intent => "intent",
        }
    }
}

/// How a late write is sent when it lands: as the writer sent it.
pub(crate) enum Write<'a> {
    /// [`LakeStore::put`] with this content type.
    Plain(&'a str),
    /// [`LakeStore::put_if_absent`].
    IfAbsent,
    /// [`LakeStore::put_conditional`] with this content type and precondition: a store that
    /// honours preconditions checks it when the write lands, not when it was sent.
    Conditional(&'a str, &'a Precondition),
}

/// The gauge of late writes struck and not landed yet (only exported when faults are set).
pub const LATE_WRITES_PENDING: &str = "trstream_faults_late_writes_pending";
/// The counter of late writes struck, by kind (only exported when faults are set).
pub const LATE_WRITES: &str = "trstream_faults_late_writes_total";

/// `TRSTREAM_FAULTS`: probabilities per pass through an injection point, from a seed.
#[derive(Debug)]
struct RandomFaults {
    rng: Mutex<u64>,
    panic: [f64; 4],
    /// Panics each kind may still take (`panic.max`), so that supervision's restart intensity
    /// is tested, not exhausted.
    panics_left: [AtomicU32; 4],
    kill: [f64; 3],
    late: [f64; 5],
    /// The longest a late write takes to land (it lands after half of this to all of it).
    late_delay: Duration,
    /// Late writes that may still strike (`late.max`).
    late_left: AtomicU32,
    /// Striking: from the start, or from the first SIGUSR1 (`arm=usr1`), so that a test can
    /// let the daemon settle (and measure its recovery) first.
    live: AtomicBool,
    on_usr1: bool,
}

impl RandomFaults {
    /// splitmix64: enough randomness for picking moments, and reproducible from the seed.
    fn next(&self) -> f64 {
        let mut s = self.rng.lock().unwrap();
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

impl Faults {
    /// Parses `TRSTREAM_FAULTS`: comma-separated `key=value`, where the keys are `seed` (u64),
    /// `panic.<partition_worker|consumer_driver|partitioner|compactor>`,
    /// `kill.<mid_buffer|mid_upload|after_upload>` and `late.<raw|table|watermark|merged|intent>`
    /// (a probability per pass through the point, 0 to 1), `panic.max` (panics per kind,
    /// default 3), `late.delay_ms` (the longest a late write takes to land, default 3000),
    /// `late.max` (late writes in all, default no limit), and
    /// `arm` (`start`, the default, or `usr1`: nothing strikes before the process receives
    /// SIGUSR1). Nothing strikes after `trstream run` receives SIGUSR2.
    pub fn from_spec(spec: &str) -> Result<Faults, String> {
        let mut random = RandomFaults {
            rng: Mutex::new(0),
            panic: [0.0; 4],
            panics_left: Default::default(),
            kill: [0.0; 3],
            late: [0.0; 5],
            late_delay: Duration::from_secs(3),
            late_left: AtomicU32::new(u32::MAX),
            live: AtomicBool::new(true),
            on_usr1: false,
        };
        let mut max = 3;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) =
                item.split_once('=').ok_or_else(|| format!("{ENV}: expected key=value, got {item:?}"))?;
            let prob = || -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("{ENV}: {key} must be a probability from 0 to 1, got {value:?}"))
            };
            let int = || value.parse::<u64>().map_err(|_| format!("{ENV}: {key} must be an integer, got {value:?}"));
            if key == "arm" {
                random.on_usr1 = match value {
                    "start" => false,
                    "usr1" => true,
                    _ => return Err(format!("{ENV}: arm must be start or usr1, got {value:?}")),
                };
                random.live.store(!random.on_usr1, Ordering::Relaxed);
            } else if key == "seed" {
                *random.rng.lock().unwrap() = int()?;
            } else if key == "panic.max" {
                max = u32::try_from(int()?).map_err(|_| format!("{ENV}: panic.max is too large"))?;
            } else if let Some(i) =
                key.strip_prefix("panic.").and_then(|k| Kind::ALL.iter().position(|x| x.as_str() == k))
            {
                random.panic[i] = prob()?;
            } else if let Some(i) =
                key.strip_prefix("kill.").and_then(|k| Moment::ALL.iter().position(|x| x.as_str() == k))
            {
                random.kill[i] = prob()?;
            } else if key == "late.max" {
                random.late_left.store(u32::try_from(int()?).unwrap_or(u32::MAX), Ordering::Relaxed);
            } else if key == "late.delay_ms" {
                random.late_delay = Duration::from_millis(int()?);
            } else if let Some(i) =
                key.strip_prefix("late.").and_then(|k| WriteKind::ALL.iter().position(|x| x.as_str() == k))
            {
                random.late[i] = prob()?;
            } else {
                return Err(format!(
                    "{ENV}: unknown key {key:?} (expected seed, arm, panic.max, panic.<{}>, kill.<{}>, late.<{}>, late.delay_ms, late.max)",
                    Kind::ALL.map(Kind::as_str).join("|"),
                    Moment::ALL.map(Moment::as_str).join("|"),
                    WriteKind::ALL.map(WriteKind::as_str).join("|")
                ));
            }
        }
        for left in &random.panics_left {
            left.store(max, Ordering::Relaxed);
        }
        Ok(Faults { armed: AtomicBool::new(true), random: Some(random), ..Default::default() })
    }

    /// Whether the random faults wait for SIGUSR1 (`arm=usr1`).
    pub fn arms_on_usr1(&self) -> bool {
        self.random.as_ref().is_some_and(|r| r.on_usr1)
    }

    /// The random faults start striking.
    pub fn arm_random(&self) {
        if let Some(r) = &self.random {
            r.live.store(true, Ordering::Relaxed);
        }
    }

    /// The random faults strike no more (`trstream run`: on SIGUSR2).
    pub fn disarm_random(&self) {
        if let Some(r) = &self.random {
            r.live.store(false, Ordering::Relaxed);
        }
    }

    /// The worker of `partition` panics once, on the first record at or after `offset`.
    pub fn panic_at_offset(&self, partition: i32, offset: i64) {
        self.arm(&self.panic_at, partition, offset);
    }

    /// The consumer meets a fatal error (librdkafka's own, raised through its test hook) at the
    /// driver's next round.
    pub fn fatal_consumer_error(&self) {
        self.fatal_consumer_error.store(true, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn take_fatal_consumer_error(&self) -> bool {
        self.armed.load(Ordering::Relaxed) && self.fatal_consumer_error.swap(false, Ordering::Relaxed)
    }

    /// The next `times` flushes of `partition` fail after the upload and before the commit.
    pub fn crash_after_upload(&self, partition: i32, times: u32) {
        self.arm(&self.crash_after_upload, partition, times);
    }

    /// The next recovery of `partition` (on an assignment, or after a worker died) stops after
    /// its scan, before it spawns the new worker, until [`Faults::release_recoveries`]: a test can revoke the partition
    /// meanwhile. Later recoveries of it are not held.
    pub fn hold_next_recovery(&self, partition: i32) {
        self.recovery_gate.lock().unwrap().0.insert(partition);
        self.armed.store(true, Ordering::Relaxed);
    }

    pub fn release_recoveries(&self) {
        self.recovery_gate.lock().unwrap().1 = true;
    }

    /// Recoveries waiting at the gate of [`Faults::hold_next_recovery`].
    pub fn recoveries_held(&self) -> u32 {
        self.recoveries_held.load(Ordering::Relaxed)
    }

    pub(crate) async fn recovery_gate(&self, partition: i32) {
        if !self.armed.load(Ordering::Relaxed) || !self.recovery_gate.lock().unwrap().0.remove(&partition) {
            return;
        }
        self.recoveries_held.fetch_add(1, Ordering::Relaxed);
        while !self.recovery_gate.lock().unwrap().1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.recoveries_held.fetch_sub(1, Ordering::Relaxed);
    }

    /// The next `times` passes through `point` fail (the actor returns an error and is restarted).
    pub fn fail_at(&self, point: FaultPoint, times: u32) {
        self.arm(&self.points, point, times);
    }

    /// The next `times` passes through `point` meet a store outage: a retryable store error,
    /// as if the store had died right there (the actor backs off, it is not restarted).
    pub fn outage_at(&self, point: FaultPoint, times: u32) {
        self.arm(&self.outages, point, times);
    }

    fn arm<K: std::hash::Hash + Eq, V>(&self, faults: &Mutex<HashMap<K, V>>, key: K, value: V) {
        faults.lock().unwrap().insert(key, value);
        self.armed.store(true, Ordering::Relaxed);
    }

    /// Uses up one of the armed `times` at `key`; whether there was one.
    fn take<K: std::hash::Hash + Eq>(faults: &Mutex<HashMap<K, u32>>, key: &K) -> bool {
        match faults.lock().unwrap().get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// How many armed failures and outages of `point` have not fired yet.
    pub fn pending(&self, point: FaultPoint) -> u32 {
        [&self.points, &self.outages].iter().map(|m| m.lock().unwrap().get(&point).copied().unwrap_or(0)).sum()
    }

    /// `Err` when a failure or an outage is armed at `point` (and uses it up); a random panic
    /// may strike.
    pub(crate) fn check(&self, point: FaultPoint) -> Result<(), WorkError> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.maybe_panic(point.kind(), &format!("{point:?}"));
        if Self::take(&self.points, &point) {
            return Err(WorkError::Other(format!("injected fault at {point:?}")));
        }
        if Self::take(&self.outages, &point) {
            return Err(WorkError::Store(StoreError::Retryable {
                op: "injected outage",
                target: format!("{point:?}"),
                detail: "the store went away".into(),
            }));
        }
        Ok(())
    }

    /// Late writes struck and not landed yet.
    pub fn late_writes_pending(&self) -> u32 {
        self.late_pending.load(Ordering::Relaxed)
    }

    /// Whether a write of `kind` may be made late ([`Faults::late_write`]): a writer that does
    /// not hold the whole body (a multipart upload) fetches it only then.
    pub(crate) fn late_writes_possible(&self, kind: WriteKind) -> bool {
        self.armed.load(Ordering::Relaxed)
            && self.random.as_ref().is_some_and(|r| r.live.load(Ordering::Relaxed) && r.late[kind as usize] > 0.0)
    }

    /// A late write of `kind` (`late.<kind>` in `TRSTREAM_FAULTS`): when one strikes, the write
    /// of `body` under `key` is sent `how` a few seconds from now, and this returns the error
    /// the writer sees now, as if its request had failed.
    pub(crate) fn late_write(
        &self,
        kind: WriteKind,
        store: &LakeStore,
        key: &str,
        body: &bytes::Bytes,
        how: Write<'_>,
    ) -> Result<(), StoreError> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(r) = self.random.as_ref().filter(|r| r.live.load(Ordering::Relaxed)) else { return Ok(()) };
        let p = r.late[kind as usize];
        if p == 0.0
            || r.next() >= p
            || r.late_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err()
        {
            return Ok(());
        }
        let delay = r.late_delay.mul_f64(0.5 + r.next() / 2.0);
        metrics::counter!(LATE_WRITES, "kind" => kind.as_str()).increment(1);
        let pending = self.late_pending.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(LATE_WRITES_PENDING).set(pending as f64);
        tracing::warn!(kind = kind.as_str(), key, ?delay, "injected late write ({ENV}): fails now, lands later");
        let (store, late_key, body) = (store.clone(), key.to_string(), body.clone());
        let how = match how {
            Write::Plain(ct) => (ct.to_string(), None, false),
            Write::IfAbsent => (String::new(), None, true),
            Write::Conditional(ct, pre) => (ct.to_string(), Some(pre.clone()), false),
        };
        let counter = self.late_pending.clone();
        tokio::spawn(async move {
            let key = late_key;
            tokio::time::sleep(delay).await;
            let landed = match how {
                (_, None, true) => store.put_if_absent(&key, body).await.map(|o| format!("{o:?}")),
                (ct, Some(pre), _) => store.put_conditional(&key, body, &ct, &pre).await.map(|o| format!("{o:?}")),
                (ct, None, false) => store.put(&key, body, &ct).await.map(|()| "Written".to_string()),
            };
            let pending = counter.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::gauge!(LATE_WRITES_PENDING).set(pending as f64);
            match landed {
                Ok(outcome) => tracing::warn!(key, outcome, "injected late write landed"),
                Err(e) => tracing::warn!(key, error = %e, "injected late write did not land"),
            }
        });
        Err(StoreError::Retryable {
            op: "PutObject",
            target: key.to_string(),
            detail: format!("injected late write ({ENV}): the request fails here and lands in {delay:?}"),
        })
    }

    /// A random panic of `kind` (`TRSTREAM_FAULTS`), at the point named `at`.
    pub(crate) fn maybe_panic(&self, kind: Kind, at: &str) {
        if !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let Some(r) = self.random.as_ref().filter(|r| r.live.load(Ordering::Relaxed)) else { return };
        let i = kind as usize;
        if r.panic[i] > 0.0
            && r.next() < r.panic[i]
            && r.panics_left[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
        {
            tracing::warn!(actor = kind.as_str(), at, "injected panic ({ENV})");
            panic!("injected panic ({ENV}): {} at {at}", kind.as_str());
        }
    }

    /// A random SIGKILL of this very process (`TRSTREAM_FAULTS`) at `moment`. For
    /// [`Moment::MidUpload`] the signal comes from a thread a few milliseconds later, while the
    /// PUT is in flight.
    pub(crate) fn maybe_kill(&self, moment: Moment) {
        if !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let Some(r) = self.random.as_ref().filter(|r| r.live.load(Ordering::Relaxed)) else { return };
        let p = r.kill[moment as usize];
        if p == 0.0 || r.next() >= p {
            return;
        }
        tracing::warn!(moment = moment.as_str(), "injected SIGKILL ({ENV})");
        let kill = || {
            // SAFETY: kill(2) on our own pid; no memory is involved.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        };
        if moment == Moment::MidUpload {
            let delay = Duration::from_micros((r.next() * 5_000.0) as u64);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                kill();
            });
        } else {
            kill();
        }
    }

    pub(crate) fn should_panic(&self, partition: i32, offset: i64) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        let mut map = self.panic_at.lock().unwrap();
        match map.get(&partition) {
            Some(&at) if offset >= at => {
                map.remove(&partition);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn take_crash_after_upload(&self, partition: i32) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        Self::take(&self.crash_after_upload, &partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_name_the_bad_part() {
        let e = Faults::from_spec("panic.partitioner=2").unwrap_err();
        assert!(e.contains("panic.partitioner") && e.contains("probability"), "{e}");
        let e = Faults::from_spec("panic.parser=0.5").unwrap_err();
        assert!(e.contains("unknown key \"panic.parser\"") && e.contains("partition_worker"), "{e}");
        let e = Faults::from_spec("seed").unwrap_err();
        assert!(e.contains("key=value"), "{e}");
        let e = Faults::from_spec("arm=later").unwrap_err();
        assert!(e.contains("arm must be start or usr1"), "{e}");
        let e = Faults::from_spec("seed=x").unwrap_err();
        assert!(e.contains("seed must be an integer"), "{e}");
    }

    #[test]
    fn random_panics_follow_the_seed_and_stop_at_the_max() {
        let strikes = |seed: u64| {
            let f = Faults::from_spec(&format!("seed={seed},panic.compactor=0.3,panic.max=2")).unwrap();
            (0..100).filter(|_| std::panic::catch_unwind(|| f.maybe_panic(Kind::Compactor, "test")).is_err()).count()
        };
        assert_eq!(strikes(7), 2, "panic.max bounds the panics of a kind");
        // Nothing strikes before SIGUSR1 with arm=usr1.
        let f = Faults::from_spec("arm=usr1,panic.compactor=1").unwrap();
        assert!(f.arms_on_usr1());
        f.maybe_panic(Kind::Compactor, "test");
        f.arm_random();
        assert!(std::panic::catch_unwind(|| f.maybe_panic(Kind::Compactor, "test")).is_err());
        // Other kinds are untouched.
        let f = Faults::from_spec("seed=1,panic.compactor=1").unwrap();
        f.maybe_panic(Kind::Partitioner, "test");
        assert!(f.check(FaultPoint::PartitionerBeforeWatermark).is_ok());
        assert!(std::panic::catch_unwind(|| f.check(FaultPoint::CompactorAfterIntent)).is_err());
        // The same seed draws the same moments.
        let draws = |seed| {
            let f = Faults::from_spec(&format!("seed={seed}")).unwrap();
            let r = f.random.as_ref().unwrap();
            (0..5).map(|_| r.next()).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
    }
}

//! Notices when the whole process was stopped (SIGSTOP, `docker pause`, a frozen VM, a host
//! swapping it out), for the fence's lease (I9, [`crate::context::PipelineCtx::check_fence`]).
//!
//! The lease trusts an owner record seen current within `kafka.session_timeout / 3` because the
//! group cannot move a partition from a member that keeps heartbeating. A process that was
//! stopped has not heartbeated: its session may have expired, and the next owner may be
//! claiming its partitions right after it wakes, so a check it makes then, even a fresh one, says
//! nothing about a moment later. After a stall, [`Stalls::recent`] is true for a session
//! timeout (by then the group has either moved the partitions, which the store shows, or kept
//! them), and every fence check asks the store.
//!
//! A thread that sleeps [`TICK`] and notes when it woke: a wake-up later than [`STALL`] after
//! the one before is a stall. Its own clock is the monotonic one, which runs while the process
//! is stopped.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics as m;

/// How often the watch wakes.
pub const TICK: Duration = Duration::from_millis(50);
/// A gap between two wake-ups longer than this is a stall.
pub const STALL: Duration = Duration::from_millis(250);

/// The process's stall watch (one per process: a stop stops every pipeline in it).
pub struct Stalls {
    origin: Instant,
    /// Nanoseconds from `origin` of the watch's last wake-up.
    last_tick: AtomicU64,
    /// Nanoseconds from `origin` of the end of the last stall (0: none seen).
    last_stall_end: AtomicU64,
    /// Stalls seen so far.
    count: AtomicU64,
}

impl Stalls {
    /// The watch, started on first use.
    pub fn get() -> &'static Stalls {
        static WATCH: OnceLock<&'static Stalls> = OnceLock::new();
        WATCH.get_or_init(|| {
            let watch: &'static Stalls = Box::leak(Box::new(Stalls {
                origin: Instant::now(),
                last_tick: AtomicU64::new(0),
                last_stall_end: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }));
            std::thread::Builder::new()
                .name("trstream-stall-watch".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(TICK);
                        watch.tick();
                    }
                })
                .expect("spawning the stall watch thread");
            watch
        })
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn tick(&self) {
        let now = self.now();
        let gap = Duration::from_nanos(now.saturating_sub(self.last_tick.swap(now, Ordering::Relaxed)));
        if gap > STALL {
            self.last_stall_end.store(now, Ordering::Relaxed);
            self.count.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::PROCESS_STALLS).increment(1);
            tracing::warn!(
                stalled_ms = gap.as_millis() as u64,
                "the process was stopped or starved (SIGSTOP, docker pause, a frozen VM?); fences are checked in the store for a session timeout"
            );
        }
    }

    /// Records a stall that ends now, as if the watch had seen one (for tests, which cannot
    /// stop their own process).
    pub fn note(&self) {
        self.last_stall_end.store(self.now().max(1), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// An opaque mark: [`Stalls::since`] tells whether the process stalled after it was taken
    /// (or is stalled now, as far as the watch knows).
    pub fn mark(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether the process stalled since `mark` was taken, or its watch is overdue now.
    pub fn since(&self, mark: u64) -> bool {
        self.overdue() || self.count.load(Ordering::Relaxed) != mark
    }

    fn overdue(&self) -> bool {
        Duration::from_nanos(self.now().saturating_sub(self.last_tick.load(Ordering::Relaxed))) > STALL
    }

    /// Whether the process stalled within the last `window`, or is in a stall the watch has
    /// not woken from yet (its last wake-up is overdue).
    pub fn recent(&self, window: Duration) -> bool {
        let now = self.now();
        let end = self.last_stall_end.load(Ordering::Relaxed);
        self.overdue() || (end > 0 && Duration::from_nanos(now - end.min(now)) < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Stalls {
        Stalls {
            origin: Instant::now(),
            last_tick: AtomicU64::new(0),
            last_stall_end: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_gap_between_ticks_longer_than_a_stall_is_one_for_the_window_after_it() {
        let w = watch();
        w.tick();
        assert!(!w.recent(Duration::from_secs(60)), "ticking on time is no stall");
        // The watch thread did not run for longer than STALL: overdue, so a stall in progress.
        std::thread::sleep(STALL + Duration::from_millis(50));
        assert!(w.recent(Duration::from_secs(60)), "an overdue tick is a stall in progress");
        w.tick();
        assert!(w.recent(Duration::from_secs(60)), "within the window after it");
        assert!(!w.recent(Duration::ZERO), "not after the window");
        let mark = w.mark();
        w.tick();
        assert!(!w.since(mark), "no stall since the mark");
        w.note();
        assert!(w.since(mark), "a stall since the mark");
    }
}

//! One app's counters: a page of atomics that workers bump and corrald
//! reads (requests, errors, latencies, instances, guest output dropped),
//! and the app's guest-log rate window, which its workers share.
//!
//! Workers are sandboxed (no files, no sockets) and may die at any time.
//! So corrald creates one page per app ([`create_page`]) in a sealed
//! memfd, and hands the fd to each zygote it starts; the zygote maps it
//! ([`map_page`]) before it enters the sandbox and closes the fd, and its
//! workers inherit the mapping through fork. A worker can write its own
//! app's page only: a compromised worker can forge its app's numbers,
//! nothing else. The memfd is sealed against shrinking, so nobody can make
//! corrald's reads fault.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds (the
/// `+Inf` bucket comes on top).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One app's counters, shared by corrald, its zygote and its workers.
/// Only atomics (all-zero is a valid value of each); `repr(C)` because
/// processes that map it agree on the layout by being the same binary.
#[derive(Debug, Default)]
#[repr(C)]
pub struct AppCounters {
    /// http requests, stdio connections, command runs (workers).
    pub requests: AtomicU64,
    /// Of those, failed: an http response with status >= 500 (the guest's
    /// own, or corral's for a trap or limit), a stdio or command instance
    /// that trapped, hit a limit or exited non-zero (workers).
    pub errors: AtomicU64,
    /// Wasm instances created (workers).
    pub instances: AtomicU64,
    /// Latency observations per bucket (not cumulative), `+Inf` last.
    pub latency: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the observed latencies, in microseconds.
    pub latency_sum_us: AtomicU64,
    /// Artifact cache lookups when the app was prepared (corrald).
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Workers killed by seccomp (corrald, from the zygote's report).
    pub sandbox_kills: AtomicU64,
    /// Bytes of guest stdout/stderr not logged: past an instance's
    /// `limits.stdout`, or over the app's log rate (workers).
    pub log_dropped_bytes: AtomicU64,
    /// The app's log rate window: the second (of the wall clock, the same
    /// in every process) it counts, and the bytes logged in it.
    log_window: AtomicU64,
    log_window_bytes: AtomicU64,
    /// The second the rate limit was last said in the log, plus one (0:
    /// never).
    log_rate_noted: AtomicU64,
}

impl AppCounters {
    /// One request (or connection) that took `took`; `failed` counts it as
    /// an error too.
    pub fn observe(&self, took: Duration, failed: bool) {
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request (or connection, or run) begins in a fresh instance.
    pub fn begin(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.instances.fetch_add(1, Ordering::Relaxed);
    }

    /// Of `bytes` of guest output, how many the app may still log this
    /// second at `rate` bytes a second (every worker of the app together);
    /// the rest is counted as dropped.
    pub fn admit_log(&self, bytes: u64, rate: u64) -> u64 {
        let now = clock_seconds();
        let window = self.log_window.load(Ordering::Relaxed);
        if window != now
            && self
                .log_window
                .compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.log_window_bytes.store(0, Ordering::Relaxed);
        }
        let used = self.log_window_bytes.fetch_add(bytes, Ordering::Relaxed);
        let admitted = rate.saturating_sub(used).min(bytes);
        self.drop_log(bytes - admitted);
        admitted
    }

    /// Count `bytes` of guest output as dropped.
    pub fn drop_log(&self, bytes: u64) {
        if bytes > 0 {
            self.log_dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Whether this process is the one to say that the app's log rate cut
    /// its output: true at most once a minute per app, in one process.
    pub fn note_log_rate(&self) -> bool {
        let now = clock_seconds() + 1;
        let last = self.log_rate_noted.load(Ordering::Relaxed);
        (last == 0 || now >= last + 60)
            && self
                .log_rate_noted
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A zeroed page that no other process sees: for a zygote started
    /// without one (it still runs; its numbers are lost).
    pub fn private() -> &'static AppCounters {
        Box::leak(Box::default())
    }
}

/// Whole seconds of the wall clock: one clock for every process of the
/// machine, so workers of an app share its rate windows (a clock step only
/// starts a new window early). Not rustix's `clock_gettime`: its first call
/// reads /proc/self/auxv, which the worker's sandbox refuses.
fn clock_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// corrald: a sealed memfd holding a zeroed [`AppCounters`] page, and
/// corrald's own mapping of it.
pub fn create_page() -> std::io::Result<(OwnedFd, &'static AppCounters)> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "corral-metrics",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, crate::sys::COUNTERS_LEN as u64)?;
    // Nobody who gets the fd can shrink the file under a mapping (a read
    // past its end would be SIGBUS), grow it, or lift the seals.
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    let counters = map_page(&fd)?;
    Ok((fd, counters))
}

/// Map an app's metrics page (made by [`create_page`]) shared and
/// writable, for the life of the process: corrald, and a zygote before it
/// enters the sandbox (its workers inherit the mapping).
pub fn map_page(fd: &impl AsFd) -> std::io::Result<&'static AppCounters> {
    crate::sys::map_counters(fd)
}

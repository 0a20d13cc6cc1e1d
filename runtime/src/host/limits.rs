//! Per-store resource limits: linear memory, instance/table/memory counts
//! (a [`wasmtime::ResourceLimiter`]) and the wall-clock deadline (epoch
//! interruption, driven by an [`EpochTicker`] thread).
//!
//! Invariant: every limit a guest hits surfaces as a [`LimitExceeded`] error
//! inside the trap, so callers can tell limits from other traps with
//! `downcast_ref` and the message always names the policy key.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral_policy::Limits;
use wasmtime::{Engine, Store, UpdateDeadline};

/// How often the ticker thread advances the engine's epoch. The timeout is
/// enforced with this granularity, and running guests yield to the async
/// executor this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A guest went over one of its `limits.*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("corral: limits.memory ({}) exceeded: the guest asked for {}", fmt_bytes(*limit), fmt_bytes(*requested))]
    Memory { limit: u64, requested: u64 },
    #[error("corral: limits.timeout ({}) exceeded", humantime::format_duration(*limit))]
    Timeout { limit: Duration },
    #[error("corral: limits.instances ({limit}) exceeded")]
    Instances { limit: u32 },
    #[error("corral: limits.tables ({limit}) exceeded")]
    Tables { limit: u32 },
}

impl LimitExceeded {
    /// Find the limit behind a trap or instantiation error, including
    /// wasmtime's own count checks (which report plain strings).
    pub fn find(err: &wasmtime::Error, limits: &Limits) -> Option<LimitExceeded> {
        if let Some(l) = err.downcast_ref::<LimitExceeded>() {
            return Some(l.clone());
        }
        LimitExceeded::from_message(&format!("{err:#}"), limits)
    }

    /// The limit named by wasmtime's message `text`: a count check of the
    /// [`Limiter`] at instantiation, or the pooling allocator refusing, when
    /// it loads a module, more tables per instance than `limits.tables`
    /// (its `max_tables_per_module`).
    pub fn from_message(text: &str, limits: &Limits) -> Option<LimitExceeded> {
        if text.contains("resource limit exceeded: instance count too high")
            || text.contains("resource limit exceeded: memory count too high")
        {
            return Some(LimitExceeded::Instances {
                limit: limits.instances,
            });
        }
        if text.contains("resource limit exceeded: table count too high")
            || text.contains("defined tables count of")
        {
            return Some(LimitExceeded::Tables {
                limit: limits.tables,
            });
        }
        None
    }
}

/// `64 MiB` for whole mebibytes, else bytes.
fn fmt_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// The [`wasmtime::ResourceLimiter`] of one store, from `limits.*`.
#[derive(Debug, Clone)]
pub struct Limiter {
    memory: u64,
    instances: u32,
    tables: u32,
}

impl Limiter {
    pub fn new(limits: &Limits) -> Limiter {
        Limiter {
            memory: limits.memory,
            instances: limits.instances,
            tables: limits.tables,
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory {
            // An error (not `Ok(false)`) so the guest traps with the limit's
            // name instead of seeing `memory.grow` return -1.
            return Err(LimitExceeded::Memory {
                limit: self.memory,
                requested: desired,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Table elements are bounded by the engine (the pooling allocator's
        // `table_elements`); the policy limits the number of tables.
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances as usize
    }

    fn tables(&self) -> usize {
        self.tables as usize
    }

    fn memories(&self) -> usize {
        // One linear memory per core instance is what toolchains emit.
        self.instances as usize
    }
}

/// Arm `store` with the wall-clock deadline `timeout` (none: no deadline).
///
/// The store must run on an engine with epoch interruption and an
/// [`EpochTicker`]. Each tick the guest yields to the async executor (so
/// guests sharing a thread take turns); past the deadline it traps with
/// [`LimitExceeded::Timeout`].
///
/// The yield is tokio's `yield_now`, not wasmtime's plain `Yield`: that one
/// wakes the task at once, and a current-thread runtime whose queue is
/// never empty polls its I/O driver only every 61 tasks, so a guest
/// spinning in 10 ms slices kept its worker's sockets unread for about
/// 600 ms at a time (issue 15: good requests beside a spinner waited
/// 760 ms at p50). `yield_now` wakes the task only after the driver has
/// been polled.
pub fn arm_deadline<T: 'static>(store: &mut Store<T>, timeout: Option<Duration>) {
    arm_movable_deadline(store, timeout, &MovableDeadline::new(timeout));
}

/// A deadline that can be moved after the store is armed: an instance
/// reused for several requests (`pool.reuse`) gets `limits.timeout` from
/// the start of each request, not from its instantiation.
#[derive(Debug, Clone)]
pub struct MovableDeadline(Arc<std::sync::Mutex<Option<Instant>>>);

impl MovableDeadline {
    /// `timeout` from now (`None`: no deadline).
    pub fn new(timeout: Option<Duration>) -> MovableDeadline {
        MovableDeadline(Arc::new(std::sync::Mutex::new(
            timeout.map(|t| Instant::now() + t),
        )))
    }

    /// Move the deadline to `timeout` from now.
    pub fn restart(&self, timeout: Option<Duration>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = timeout.map(|t| Instant::now() + t);
    }

    fn passed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| Instant::now() >= at)
    }
}

/// [`arm_deadline`] with a deadline the caller may move later.
pub fn arm_movable_deadline<T: 'static>(
    store: &mut Store<T>,
    limit: Option<Duration>,
    deadline: &MovableDeadline,
) {
    let deadline = deadline.clone();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| match limit {
        Some(limit) if deadline.passed() => Err(LimitExceeded::Timeout { limit }.into()),
        _ => Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        )),
    });
}

/// Run a guest call under `timeout`, with a wall-clock backstop a little
/// after the epoch deadline: a guest blocked inside a host call (where the
/// epoch deadline cannot fire) still ends, as [`LimitExceeded::Timeout`].
pub async fn with_backstop<T>(
    timeout: Option<Duration>,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match timeout {
        Some(limit) => match tokio::time::timeout(limit + EPOCH_TICK * 10, call).await {
            Ok(r) => r,
            Err(_) => Err(LimitExceeded::Timeout { limit }.into()),
        },
        None => call.await,
    }
}

/// A thread that increments an engine's epoch every [`EPOCH_TICK`] until
/// dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for EpochTicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochTicker").finish_non_exhaustive()
    }
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> std::io::Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.weak();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("corral-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    // Parked rather than asleep, so that drop can wake it:
                    // a guest that exits must not wait out a tick.
                    std::thread::park_timeout(EPOCH_TICK);
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_message_names_the_limit() {
        let e = LimitExceeded::Memory {
            limit: 64 * 1024 * 1024,
            requested: 64 * 1024 * 1024 + 65536,
        };
        assert_eq!(
            e.to_string(),
            "corral: limits.memory (64 MiB) exceeded: the guest asked for 65600 KiB"
        );
        let t = LimitExceeded::Timeout {
            limit: Duration::from_millis(1500),
        };
        assert_eq!(t.to_string(), "corral: limits.timeout (1s 500ms) exceeded");
    }

    #[test]
    fn wasmtime_count_messages_map_to_their_limit() {
        let limits = corral_policy::defaults::limits(corral_policy::AppKind::Stdio);
        let tables = Some(LimitExceeded::Tables {
            limit: limits.tables,
        });
        assert_eq!(
            LimitExceeded::from_message(
                "resource limit exceeded: table count too high at 4",
                &limits
            ),
            tables
        );
        assert_eq!(
            LimitExceeded::from_message(
                "module table does not fit in pooling allocator requirements: \
                 defined tables count of 4 exceeds the per-instance limit of 3",
                &limits
            ),
            tables
        );
        assert_eq!(
            LimitExceeded::from_message(
                "resource limit exceeded: instance count too high at 3",
                &limits
            ),
            Some(LimitExceeded::Instances {
                limit: limits.instances
            })
        );
        // A table too large at its minimum is not a count.
        assert_eq!(
            LimitExceeded::from_message(
                "table index 0 has a minimum element size of 30000 which exceeds the limit of 20000",
                &limits
            ),
            None
        );
    }
}

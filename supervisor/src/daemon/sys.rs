//! The daemon's raw OS calls and all of its `unsafe`: forking the
//! zygote's workers and the memory the zygote shares with them.

use std::sync::atomic::{AtomicU32, AtomicU64};

use super::metrics::AppCounters;

/// What [`fork`] returned in this process.
#[derive(Debug)]
pub(crate) enum Forked {
    /// This is the new worker.
    Child,
    /// This is the zygote; the worker has this pid.
    Parent(i32),
}

/// `fork(2)` the calling process.
///
/// Only the zygote calls it, and only while it has a single thread: the
/// sandbox refused to be entered otherwise (`SandboxPlan::enter` checks
/// the thread count) and the zygote starts no thread afterwards, so the
/// child gets a consistent copy of every lock and allocator.
pub(crate) fn fork() -> std::io::Result<Forked> {
    // SAFETY: the process is single-threaded (see above), so no lock can be
    // held by a thread that does not exist in the child; the child goes on
    // running ordinary Rust code, which is sound after fork in a
    // single-threaded process.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// One worker's place in the shared pool state.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct Slot {
    /// `pool.concurrency` permits in use right now: one per connection
    /// (http, stdio), one more per HTTP/2 stream beyond its connection's first.
    pub(crate) in_flight: AtomicU32,
    /// 1 once the worker has taken itself out of `live` (idle or
    /// max-requests retirement): it accepts nothing more.
    pub(crate) retiring: AtomicU32,
    /// Requests (http) or connections (stdio) served.
    pub(crate) served: AtomicU64,
}

/// The head of the shared pool state.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct PoolHeader {
    /// Workers that accept (forked and not retiring).
    pub(crate) live: AtomicU32,
    /// 1: every worker stops accepting and exits when done.
    pub(crate) draining: AtomicU32,
}

/// A `MAP_SHARED` anonymous mapping holding a [`PoolHeader`] and `slots`
/// [`Slot`]s, created by the zygote before it forks, so that it and all
/// its workers see the same atomics. Never unmapped: it lives as long as
/// the process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedPool {
    header: &'static PoolHeader,
    slots: &'static [Slot],
}

impl SharedPool {
    pub(crate) fn new(slots: usize) -> std::io::Result<SharedPool> {
        use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous};
        let header_len = std::mem::size_of::<PoolHeader>().next_multiple_of(64);
        let len = header_len + slots * std::mem::size_of::<Slot>();
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // cannot alias any existing Rust object.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )?
        };
        let base = base.cast::<u8>();
        // SAFETY: the mapping is page-aligned (so aligned for both types),
        // `len` bytes long (room for the header and `slots` slots after the
        // 64-byte-rounded header), zero-filled by the kernel (all-zero bits
        // are a valid value of every atomic in them), never unmapped (so
        // `'static` holds), and only ever accessed through atomics (so
        // sharing it between processes is no data race).
        let (header, slots) = unsafe {
            (
                &*base.cast::<PoolHeader>(),
                std::slice::from_raw_parts(base.add(header_len).cast::<Slot>(), slots),
            )
        };
        Ok(SharedPool { header, slots })
    }

    pub(crate) fn header(&self) -> &'static PoolHeader {
        self.header
    }

    pub(crate) fn slots(&self) -> &'static [Slot] {
        self.slots
    }
}

/// The size of an app's metrics page (one page holds [`AppCounters`]).
const COUNTERS_LEN: usize = 4096;
const _: () = assert!(std::mem::size_of::<AppCounters>() <= COUNTERS_LEN);

/// corrald: a sealed memfd holding a zeroed [`AppCounters`] page, and
/// corrald's own mapping of it (see `metrics.rs`).
pub(crate) fn create_counters() -> std::io::Result<(std::os::fd::OwnedFd, &'static AppCounters)> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "corral-metrics",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, COUNTERS_LEN as u64)?;
    // Nobody who gets the fd can shrink the file under a mapping (a read
    // past its end would be SIGBUS), grow it, or lift the seals.
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    let counters = map_counters(&fd)?;
    Ok((fd, counters))
}

/// Map an app's metrics page (made by [`create_counters`]) shared and
/// writable, for the life of the process: corrald, and a zygote before it
/// enters the sandbox (its workers inherit the mapping).
pub(crate) fn map_counters(fd: &impl std::os::fd::AsFd) -> std::io::Result<&'static AppCounters> {
    use rustix::mm::{MapFlags, ProtFlags, mmap};
    let len = rustix::fs::fstat(fd)?.st_size;
    if len < COUNTERS_LEN as i64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("metrics page is {len} bytes, expected {COUNTERS_LEN}"),
        ));
    }
    // SAFETY: a fresh mapping at an address the kernel picks cannot alias
    // any existing Rust object; `fd` is a file at least COUNTERS_LEN long.
    let base = unsafe {
        mmap(
            std::ptr::null_mut(),
            COUNTERS_LEN,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )?
    };
    // SAFETY: the mapping is page-aligned and COUNTERS_LEN bytes long, room
    // for one AppCounters (checked at compile time above); its bytes are
    // zeros or were written only through AppCounters' atomics (memfd pages
    // start zeroed, all-zero is a valid value of every atomic in it); the
    // file cannot shrink (sealed by create_counters, and checked to be long
    // enough here), so the memory stays valid; it is never unmapped, so
    // `'static` holds; and it is only accessed through atomics, so sharing
    // it between processes is no data race.
    Ok(unsafe { &*base.cast::<AppCounters>() })
}

/// The signals corrald handles on a thread of its own with `sigwait`.
pub(crate) const HANDLED_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set(signals: &[i32]) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set it is given a pointer to, and
    // sigaddset only writes into that initialized set; the numbers are
    // valid signals.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &sig in signals {
            libc::sigaddset(set.as_mut_ptr(), sig);
        }
        set.assume_init()
    }
}

/// Block [`HANDLED_SIGNALS`] in the calling thread (`block`) or unblock
/// them. Called before corrald starts any thread, so every thread inherits
/// the mask and the signals wait for [`wait_for_signal`]; a zygote (which
/// inherits the mask across exec) unblocks them first thing.
pub(crate) fn set_signals_blocked(block: bool) -> std::io::Result<()> {
    let set = signal_set(&HANDLED_SIGNALS);
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: `set` is an initialized signal set that outlives the call; the
    // old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Wait for one of [`HANDLED_SIGNALS`] (blocked beforehand) and return it.
pub(crate) fn wait_for_signal() -> std::io::Result<i32> {
    let set = signal_set(&HANDLED_SIGNALS);
    let mut sig: libc::c_int = 0;
    // SAFETY: both pointers point to live locals for the duration of the
    // call; sigwait writes the signal number into `sig`.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc == 0 {
        Ok(sig)
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Register `fd` with the current tokio runtime's reactor, for reading.
pub(crate) fn register_readable(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays
    // open and names the same file description until the AsyncFd is dropped,
    // and an OwnedFd's `as_raw_fd` always returns that same number.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?)
}

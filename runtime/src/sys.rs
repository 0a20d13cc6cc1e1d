//! The runtime's raw OS calls and all of its `unsafe` outside the sandbox
//! module: forking workers, the memory a zygote shares with its workers
//! and with corrald, and the signal mask a zygote starts from.

use std::sync::atomic::Ordering;

use crate::counters::AppCounters;
use crate::pool::{PoolHeader, Slot};

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

/// Fork the calling process so that the child is a child of the caller's
/// *parent* (`clone(CLONE_PARENT | SIGCHLD)`): the zygote template's way of
/// making a zygote that corrald owns (waits for, kills, reaps) exactly as
/// if corrald had spawned it itself.
///
/// Only the template calls it, single-threaded (it checks before each
/// call). Unlike `libc::fork`, glibc's fork handlers do not run and the
/// child's thread descriptor keeps the template's thread id (glibc asks
/// the kernel to write the new one only in its own `fork`); with one
/// thread and no lock held across the call neither matters: every lock is
/// free in the child, and the stale id, used only as the owner of glibc's
/// recursive locks, is the same at every lock and unlock and belongs to
/// no other thread of the child (a worker forked from the zygote with
/// `libc::fork` gets its own again).
pub(crate) fn fork_beside_parent() -> std::io::Result<Forked> {
    // SAFETY: as for `fork` above (single-threaded caller; see the doc for
    // what differs). With a null stack the child runs on a copy of the
    // caller's stack, exactly as after fork; the remaining arguments
    // (parent/child tid pointers, TLS) are unused without the flags that
    // read them.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// Overwrite this process's command line (what `ps` and
/// `/proc/PID/cmdline` show) with `words`, as far as the original's space
/// allows; the rest is filled with NULs. A zygote forked from the template
/// (exec'd as `corrald template`) says `corrald zygote`, as one exec'd does.
pub(crate) fn set_command_line(words: &[&str]) -> std::io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised name start at field 3; arg_start and
    // arg_end are fields 48 and 49 (proc(5)).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("no name in /proc/self/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let parse = |i: usize| -> std::io::Result<usize> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("field {i} of /proc/self/stat")))
    };
    let (start, end) = (parse(48)?, parse(49)?);
    if start == 0 || end <= start {
        return Err(std::io::Error::other("no argument area"));
    }
    let mut title = words.join("\0").into_bytes();
    title.truncate(end - start - 1);
    title.resize(end - start, 0);
    // SAFETY: [arg_start, arg_end) is the argument strings the kernel
    // copied to the top of this process's stack at exec, writable and
    // mapped for the process's life; nothing in this process holds a Rust
    // reference into them (clap copied the arguments at start, and nothing
    // reads `std::env::args` afterwards). `title` is exactly that long.
    unsafe {
        std::ptr::copy_nonoverlapping(title.as_ptr(), start as *mut u8, title.len());
    }
    Ok(())
}

/// A `MAP_SHARED` anonymous mapping holding a [`PoolHeader`] and `slots`
/// [`Slot`]s, so that a zygote and all the workers it forks afterwards see
/// the same atomics. Never unmapped: it lives as long as the process.
pub(crate) fn map_pool(slots: usize) -> std::io::Result<(&'static PoolHeader, &'static [Slot])> {
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
    Ok(unsafe {
        (
            &*base.cast::<PoolHeader>(),
            std::slice::from_raw_parts(base.add(header_len).cast::<Slot>(), slots),
        )
    })
}

/// The size of an app's metrics page (one page holds [`AppCounters`]).
pub(crate) const COUNTERS_LEN: usize = 4096;
const _: () = assert!(std::mem::size_of::<AppCounters>() <= COUNTERS_LEN);

/// Map an app's metrics page (a file at least [`COUNTERS_LEN`] long, made
/// by `counters::create_page`) shared and writable, for the life of the
/// process.
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
    // file cannot shrink (sealed by its maker, and checked to be long
    // enough here), so the memory stays valid; it is never unmapped, so
    // `'static` holds; and it is only accessed through atomics, so sharing
    // it between processes is no data race.
    Ok(unsafe { &*base.cast::<AppCounters>() })
}

/// Unblock every signal in the calling thread. corrald blocks the signals
/// it waits for with `sigwait`, and a blocked mask survives exec: a zygote
/// starts from an empty one.
pub fn unblock_all_signals() -> std::io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set it is given a pointer to;
    // pthread_sigmask reads that initialized set and does not ask for the
    // old mask (null).
    let rc = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Set by [`on_stop_signals_drain`]'s handler; read by a serve loop.
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// For a serve loop with no zygote above it (`corral run --serve`, the
/// shim's task): SIGTERM and SIGINT only set a flag ([`stop_requested`]),
/// which the loop turns into a drain. Installed before the sandbox; the
/// handler makes no system call.
pub(crate) fn on_stop_signals_drain() -> std::io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is plain data (zeroed is valid); the handler
        // is an `extern "C" fn(c_int)` that only stores to an atomic,
        // which is async-signal-safe; the old action is not asked for.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGTERM or SIGINT arrived since [`on_stop_signals_drain`].
pub(crate) fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
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

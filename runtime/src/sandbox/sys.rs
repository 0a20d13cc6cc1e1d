//! The raw OS calls of the sandbox, and all of its `unsafe`: the ones that
//! neither rustix nor the landlock and seccompiler crates wrap.

use std::io;
use std::os::fd::RawFd;

/// The landlock ABI version the kernel offers: `Ok(n)` with n >= 1, or the
/// errno of `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`
/// (`EOPNOTSUPP`: built in but disabled at boot; `ENOSYS`: not built in).
pub(super) fn landlock_abi() -> Result<u32, io::Error> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer and size 0 and the VERSION
    // flag, the kernel reads no memory and returns the ABI or an error.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v as u32)
    }
}

/// Whether the kernel has seccomp filters and the `KILL_PROCESS` action:
/// `seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &SECCOMP_RET_KILL_PROCESS)`.
pub(super) fn seccomp_kill_process_available() -> Result<(), io::Error> {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_uint = 2;
    let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: the kernel reads one u32 through the pointer, which points to
    // a live local for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0u32,
            &action as *const u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes every fd from 3 up except those in `keep`, with `close_range(2)`
/// over the gaps (one call per gap, not one per possible fd).
pub(super) fn close_fds_except(keep: &[RawFd]) -> Result<(), io::Error> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first: u32 = 3;
    for &fd in &keep {
        let fd = fd as u32;
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd + 1;
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<(), io::Error> {
    // SAFETY: close_range only closes descriptors; the callers own every fd
    // in the range (the sandbox plan lists the ones anybody still uses), and
    // no Rust object that would later use one of them survives `enter`
    // except those in the keep list.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many threads this process has (`/proc/self/status`, `Threads:`).
pub(super) fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

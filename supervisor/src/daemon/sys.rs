//! corrald's raw OS calls and their `unsafe`: the signals it waits for on
//! a thread of its own, the sockets systemd passed, and fds registered
//! with tokio's reactor.

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

/// Take the sockets systemd passed to corrald (`LISTEN_FDS`, with their
/// `LISTEN_FDNAMES`). Called once, at start.
pub(crate) fn take_listen_fds() -> anyhow::Result<Vec<(std::os::fd::OwnedFd, String)>> {
    use anyhow::Context as _;
    use std::os::fd::FromRawFd as _;
    let fds = sd_notify::listen_fds_with_names().context("reading LISTEN_FDS")?;
    Ok(fds
        .into_iter()
        .map(|(fd, name)| {
            // SAFETY: systemd passed `fd` to this process for us (LISTEN_PID
            // is ours, checked by sd-notify); nothing else in corrald owns or
            // closes it, and it is taken here once.
            (unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect())
}

/// Register `fd` with the current tokio runtime's reactor.
pub(crate) fn register(
    fd: std::os::fd::OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays
    // open and names the same file description until the AsyncFd is dropped,
    // and an OwnedFd's `as_raw_fd` always returns that same number.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }?)
}

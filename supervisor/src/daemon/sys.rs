//! corrald's raw OS calls and their `unsafe`: the signals it waits for on
//! a thread of its own.

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

//! The shim's raw OS calls and their `unsafe`: what rustix does not wrap
//! (or wraps as `unsafe`) for the task process's namespaces, its start
//! pipe, the start fd handed over at exec, and the rootfs unmount.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

/// Take the fd the shim handed over as `fd` at exec (the task process's
/// start pipe). Called once, first thing, by the task process.
pub(crate) fn take_inherited_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // Only an open fd may be owned: F_GETFD fails with EBADF otherwise.
    // SAFETY: fcntl(F_GETFD) takes no pointer; on a closed fd it only fails.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above); the shim hands it to this
    // process at exec and nothing else in the process owns it, and this
    // is the one place that takes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// At `cmd`'s exec, `fd` (open here, close-on-exec or not) becomes the
/// child's `target`, without close-on-exec.
pub(crate) fn hand_over_fd(cmd: &mut std::process::Command, fd: RawFd, target: RawFd) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: between fork and exec only async-signal-safe calls (dup2,
    // fcntl) on fds the forked child owns; no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// unshare(2) the namespaces of `flags`. The caller must be the process's
/// only thread (the task process calls it before it starts any).
pub(crate) fn unshare_single_threaded(flags: rustix::thread::UnshareFlags) -> std::io::Result<()> {
    // SAFETY: rustix marks unshare unsafe because unsharing (CLONE_FILES,
    // CLONE_FS, ...) under other threads breaks their assumptions; the
    // task process is single-threaded here (freshly executed, no runtime,
    // no engine yet), which its one caller documents.
    unsafe { rustix::thread::unshare_unsafe(flags) }?;
    Ok(())
}

/// `mount --make-rprivate /`: nothing mounted in the new namespace
/// reaches the host.
pub(crate) fn make_mounts_private() -> std::io::Result<()> {
    // SAFETY: NUL-terminated string literals and null data; the kernel
    // only reads them.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Set IFF_UP on the interface `name` (`lo` of a new network namespace),
/// through `sock`, any socket of that namespace.
pub(crate) fn set_interface_up(sock: &std::net::UdpSocket, name: &str) -> std::io::Result<()> {
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own
    // (NUL-terminated name: zeroed and shorter than the field), on a
    // socket we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lazily unmount `path` (umount2 with MNT_DETACH).
pub(crate) fn unmount_detach(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path we own; umount2 only reads it.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

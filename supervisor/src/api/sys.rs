//! The socket API's raw OS calls: who is on the other end of a Unix
//! socket (`SO_PEERCRED`, `SO_PEERGROUPS`).

use std::os::fd::{AsFd, AsRawFd as _};

use crate::manager::Caller;

/// The peer of a connected Unix stream socket, as the kernel recorded it
/// at `connect(2)`: its uid, gid and pid, and its supplementary groups.
pub(crate) fn peer(fd: impl AsFd) -> std::io::Result<Caller> {
    let cred = peer_cred(fd.as_fd())?;
    Ok(Caller {
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(fd.as_fd())?,
        // 0 for a peer outside this process's pid namespace.
        pid: u32::try_from(cred.pid).ok().filter(|pid| *pid != 0),
        via: "socket",
    })
}

/// `SO_PEERCRED`, read as plain integers: the pid is 0 when the peer is in
/// a pid namespace this process cannot see into (corrald in a container,
/// its socket reached from the host), which rustix's `UCred` (a non-zero
/// `Pid`) cannot hold.
fn peer_cred(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: `fd` is an open socket for the call; `cred` is a writable
    // ucred and `len` its size; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups.
fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `fd` is an open socket for the call; `groups` is writable
        // for `len` bytes and `len` is a valid, writable socklen_t; the
        // kernel writes at most `len` bytes and stores the size it needs
        // (or wrote) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small; `len` says how big it must be.
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_a_socketpair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let caller = peer(&a).unwrap();
        assert_eq!(caller.uid, rustix::process::getuid().as_raw());
        assert_eq!(caller.gid, rustix::process::getgid().as_raw());
        assert_eq!(caller.pid, Some(std::process::id()));
        let mut ours: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = caller.groups.clone();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(theirs, ours);
    }
}

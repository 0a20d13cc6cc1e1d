//! The apps' listening sockets: bound by corrald (non-blocking, backlog
//! [`BACKLOG`]) or taken from systemd (`LISTEN_FDS`/`LISTEN_FDNAMES`, for
//! `listen = ["systemd:NAME"]`).

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use anyhow::Context as _;
use corral_policy::ListenAddr;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// Connections that may wait in the kernel for a worker (or, at zero
/// workers, for the zygote to start).
pub(crate) const BACKLOG: i32 = 1024;

/// Sockets systemd passed, by `FileDescriptorName=`.
#[derive(Debug, Default)]
pub struct SystemdSockets(HashMap<String, OwnedFd>);

impl SystemdSockets {
    /// Take the sockets of `LISTEN_FDS`.
    pub(crate) fn from_env() -> anyhow::Result<SystemdSockets> {
        let mut by_name = HashMap::new();
        for (owned, name) in super::sys::take_listen_fds()? {
            rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
            by_name.insert(name, owned);
        }
        // The variables stay set (changing the environment of a threaded
        // process is unsound); zygotes are started without them.
        Ok(SystemdSockets(by_name))
    }

    /// Every socket systemd passed, with its `FileDescriptorName=`.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &OwnedFd)> {
        self.0.iter().map(|(name, fd)| (name.as_str(), fd))
    }

    fn take(&self, name: &str) -> anyhow::Result<OwnedFd> {
        let fd = self.0.get(name).with_context(|| {
            let names: Vec<&str> = self.0.keys().map(String::as_str).collect();
            format!(
                "listen = \"systemd:{name}\": systemd passed no socket named {name} (it passed: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )
        })?;
        Ok(fd.try_clone()?)
    }
}

/// Bind (or take) the socket for `addr`, non-blocking and listening.
pub(crate) fn open(addr: &ListenAddr, systemd: &SystemdSockets) -> anyhow::Result<OwnedFd> {
    let fd = match addr {
        ListenAddr::Tcp(sa) => {
            let family = if sa.is_ipv4() {
                AddressFamily::INET
            } else {
                AddressFamily::INET6
            };
            let fd = rustix::net::socket_with(
                family,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )?;
            rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
            rustix::net::bind(&fd, sa).with_context(|| format!("binding {sa}"))?;
            fd
        }
        ListenAddr::Unix(path) => {
            // A socket file left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            listener.set_nonblocking(true)?;
            OwnedFd::from(listener)
        }
        ListenAddr::Systemd(name) => {
            let fd = systemd.take(name)?;
            rustix::fs::fcntl_setfl(&fd, rustix::fs::OFlags::NONBLOCK)?;
            return Ok(fd);
        }
    };
    rustix::net::listen(&fd, BACKLOG).with_context(|| format!("listening on {addr}"))?;
    Ok(fd)
}

//! The control protocol between corrald and a zygote.
//!
//! One `SOCK_SEQPACKET` socketpair per zygote, the zygote's end as its
//! stdin. Every message is one packet of JSON (at most [`MAX_MESSAGE`]
//! bytes); file descriptors travel with a packet as `SCM_RIGHTS`.
//!
//! - corrald → zygote: [`ToZygote::Start`] first, carrying the listening
//!   sockets (in [`Start::listeners`] order), then the artifact's file,
//!   then (when [`Start::metrics`]) the app's metrics page (a memfd, see
//!   `metrics.rs`); later [`ToZygote::Drain`]. An app with `tls` gets its
//!   certificate and key as bytes in [`Start::tls`].
//! - zygote → corrald: [`FromZygote::Ready`] once it is sandboxed and has
//!   forked its first workers (or [`FromZygote::Failed`]), then pool
//!   events; [`FromZygote::Idle`] right before it exits because its last
//!   worker retired (scale to zero).
//!
//! corrald and the zygote template (`corrald template`, see
//! `crate::template`) talk the same way over their own socketpair:
//! [`ToTemplate::Warm`] names the engines to build ahead,
//! [`ToTemplate::Fork`] carries the new zygote's control socket (the end a
//! zygote would have as stdin) and names its engine; each `Fork` gets one
//! [`FromTemplate`] answer, in order.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::Context as _;
use corral_compiler::Handoff;
use corral_policy::AppSpec;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The largest packet either side sends.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// The most fds one packet carries.
const MAX_FDS: usize = 32;

/// What corrald tells a zygote.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToZygote {
    Start(Box<Start>),
    /// Stop accepting; exit once every worker has finished.
    Drain,
}

/// Everything a zygote needs; the fds come with the packet.
#[derive(Debug, Serialize, Deserialize)]
pub struct Start {
    pub app: AppSpec,
    /// What each listening fd is, for logs (`127.0.0.1:8080`, `systemd:web`).
    pub listeners: Vec<String>,
    pub artifact: Handoff,
    /// The app's metrics page comes last among the fds.
    #[serde(default)]
    pub metrics: bool,
    /// The app's certificate chain and key (`tls` in its policy), read by
    /// corrald: the zygote never opens the files.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsMaterial>,
}

/// What a zygote tells corrald.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromZygote {
    /// Sandboxed, pre-instantiated, first workers forked.
    Ready {
        /// The sandbox layers in force, one line.
        layers: String,
        /// Layers missing under `best-effort`.
        missing: Vec<String>,
    },
    /// It could not start; it exits right after.
    Failed { error: String },
    /// The artifact it was handed failed its size or digest check, or did
    /// not load (damaged on disk after corrald checked it): corrald
    /// rebuilds the cache entry and starts a zygote on the new one. A
    /// `Failed` follows, and the exit.
    ArtifactDamaged { error: String },
    /// The pool changed.
    Workers { live: u32, busy: u32 },
    /// A worker ended; `how` is ready to log. `status` is the raw wait
    /// status, for corrald to name the system call of a seccomp kill from
    /// the kernel's audit record (which the sandboxed zygote cannot read).
    WorkerExited {
        pid: i32,
        how: String,
        crashed: bool,
        status: i32,
    },
    /// A `command` app's instance ended (`success`: exit code 0); the
    /// zygote exits.
    Finished { how: String, success: bool },
    /// The last worker retired; the zygote exits (scale to zero).
    Idle,
}

/// What corrald tells the zygote template.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToTemplate {
    /// Build these engines now, if not built yet, so that no wake waits
    /// for one; forget built engines not in the list.
    Warm {
        engines: Vec<corral_compiler::EngineOptions>,
    },
    /// Fork a zygote (a child of corrald's, `CLONE_PARENT`) holding this
    /// engine and the control socket that comes with the packet.
    Fork {
        engine: corral_compiler::EngineOptions,
    },
}

/// The template's answer to a [`ToTemplate::Fork`].
#[derive(Debug, Serialize, Deserialize)]
pub enum FromTemplate {
    /// The zygote runs, as corrald's child; it waits for its
    /// [`ToZygote::Start`] on the control socket.
    Forked { pid: i32 },
    /// No zygote: corrald starts one by exec.
    Refused { error: String },
}

/// A packet of JSON plus fds, blocking or not depending on the socket.
pub fn send<T: Serialize>(
    socket: impl AsFd,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(msg)?;
    anyhow::ensure!(bytes.len() <= MAX_MESSAGE, "control message too large");
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        anyhow::ensure!(
            control.push(SendAncillaryMessage::ScmRights(fds)),
            "too many fds"
        );
    }
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .context("sending on the control socket")?;
    Ok(())
}

/// One packet: `Ok(None)` at end of stream (the peer is gone).
pub fn recv<T: for<'de> Deserialize<'de>>(
    socket: impl AsFd,
    flags: RecvFlags,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..got.bytes])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds)))
}

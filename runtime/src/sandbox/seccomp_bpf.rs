//! The seccomp programs of every architecture, app kind and network
//! setting, compiled from `seccomp.toml` by `build.rs`: entering a sandbox
//! looks them up instead of parsing the list and generating BPF each time.
//! `seccomp::tests` checks they are what the run-time compiler builds.

use corral_policy::AppKind;
use seccompiler::sock_filter;

use super::syscalls::Arch;

/// One app filter, as `build.rs` compiled it.
#[derive(Debug)]
pub(super) struct Precompiled {
    pub arch: Arch,
    pub kind: AppKind,
    pub network: bool,
    /// Granted its own listening sockets (`corral run --listen`).
    pub listen: bool,
    /// `AppFilter::allowed_count` of the list.
    pub allowed_calls: usize,
    /// The stacked programs, in installation order (`AppFilter::compile`).
    pub programs: &'static [&'static [sock_filter]],
}

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

static ALL: &[Precompiled] = include!(concat!(env!("OUT_DIR"), "/seccomp_bpf.rs"));

/// The filter of an app of `kind`, with or without outbound network and
/// listening sockets of its own, on `arch`. `build.rs` compiles every
/// combination, so this is `None` only if that stops being true (a unit
/// test checks it).
pub(super) fn find(
    arch: Arch,
    kind: AppKind,
    network: bool,
    listen: bool,
) -> Option<&'static Precompiled> {
    ALL.iter()
        .find(|p| p.arch == arch && p.kind == kind && p.network == network && p.listen == listen)
}

//! The seccomp layer: the allow-list in `seccomp.toml` (data, one reason
//! per system call), compiled per app kind and architecture into BPF with
//! seccompiler, and installed on every thread of the process.
//!
//! The compiling happens in `build.rs` (which includes this module), for
//! every kind, network setting and architecture; entering a sandbox takes
//! the result from `seccomp_bpf`. [`AppFilter`] is the same compiler at run
//! time, for the tests and for tools that list the calls.
//!
//! A filter set is up to three stacked programs, because a seccompiler
//! filter has one action on match, installed in this order:
//! 1. one program per errno (`EPERM`, `ENOSYS`): the `[errno]` calls, and
//!    the calls of `[allow]` entries with `otherwise` whose arguments fail
//!    the checks, return that errno (the allow-list lets them through);
//! 2. last, the allow-list: listed calls (with their argument checks) pass,
//!    everything else is `SECCOMP_RET_KILL_PROCESS`. It forbids
//!    `seccomp(2)`, so nothing can be installed after it.
//!
//! The kernel runs every program and keeps the most restrictive answer
//! (kill > errno > allow), so the stack means what the file says.

use std::collections::BTreeMap;

use corral_policy::AppKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

use super::syscalls::{Arch, syscall_number};

/// The allow-list file, compiled in.
pub const ALLOW_LIST: &str = include_str!("seccomp.toml");

/// A problem in the allow-list file or in compiling it; a bug in corral,
/// caught by the unit tests, never an operator's mistake.
#[derive(Debug, thiserror::Error)]
pub enum SeccompBuildError {
    #[error("seccomp.toml: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("seccomp.toml: {section}.{name}: {problem}")]
    Entry {
        section: &'static str,
        name: String,
        problem: String,
    },
    #[error(
        "no seccomp filter was compiled for {kind:?} apps (network: {network}, listen: {listen}) on {arch}"
    )]
    NotPrecompiled {
        arch: Arch,
        kind: AppKind,
        network: bool,
        listen: bool,
    },
    #[error("compiling the seccomp filter for {arch}")]
    Compile {
        arch: Arch,
        #[source]
        source: seccompiler::BackendError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowListFile {
    allow: BTreeMap<String, AllowEntry>,
    errno: BTreeMap<String, ErrnoEntry>,
    never: BTreeMap<String, NeverEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowEntry {
    why: String,
    kinds: Option<Vec<String>>,
    #[serde(default)]
    network: bool,
    /// Granted with a listen grant (`corral run --listen`): alone, only
    /// then; with `kinds`, to those kinds and also then.
    #[serde(default)]
    listen: bool,
    arch: Option<String>,
    #[serde(default)]
    args: Vec<ArgCheck>,
    otherwise: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrnoEntry {
    why: String,
    errno: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NeverEntry {
    why: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgCheck {
    arg: u8,
    eq: u64,
    mask: Option<u64>,
    /// A second condition that must hold too.
    and: Option<AndCheck>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct AndCheck {
    arg: u8,
    eq: u64,
}

/// What the filter does with one system call, for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed when one of these rules holds; a rule is a list of
    /// `(arg, mask, value)` conditions that must all hold.
    AllowIf(Vec<Vec<(u8, Option<u64>, u64)>>),
    Errno(i32),
    Kill,
}

/// One line of the compiled list: a call, the verdict and the reason.
#[derive(Debug, Clone)]
pub struct ListedCall {
    pub name: String,
    pub verdict: Verdict,
    /// What a call that fails the argument checks gets (`AllowIf` only).
    pub otherwise: Option<i32>,
    pub why: String,
}

/// The allow-list as it applies to one app: kind, network, listening
/// sockets of its own, architecture.
#[derive(Debug, Clone)]
pub struct AppFilter {
    pub arch: Arch,
    pub calls: Vec<ListedCall>,
}

fn errno_value(name: &str) -> Option<i32> {
    match name {
        "EPERM" => Some(libc::EPERM),
        "ENOSYS" => Some(libc::ENOSYS),
        "EACCES" => Some(libc::EACCES),
        _ => None,
    }
}

fn parse_file() -> Result<AllowListFile, SeccompBuildError> {
    Ok(toml::from_str(ALLOW_LIST)?)
}

impl AppFilter {
    /// The list for an app of `kind`, with or without outbound network and
    /// listening sockets of its own (`corral run --listen`), on `arch`.
    pub fn for_app(
        kind: AppKind,
        network: bool,
        listen: bool,
        arch: Arch,
    ) -> Result<Self, SeccompBuildError> {
        let file = parse_file()?;
        let mut calls = Vec::new();
        for (name, e) in &file.allow {
            let bad = |problem: String| SeccompBuildError::Entry {
                section: "allow",
                name: name.clone(),
                problem,
            };
            if let Some(only) = &e.arch {
                if Arch::from_name(only).is_none() {
                    return Err(bad(format!("unknown arch {only:?}")));
                }
                if only != arch.as_str() {
                    continue;
                }
            }
            let otherwise = match &e.otherwise {
                None => None,
                Some(errno) => Some(
                    errno_value(errno).ok_or_else(|| bad(format!("unknown errno {errno:?}")))?,
                ),
            };
            if otherwise.is_some()
                && (e.args.is_empty() && e.kinds.is_none() && !e.network && !e.listen)
            {
                return Err(bad(
                    "`otherwise` needs `args`, `kinds`, `network` or `listen`".into(),
                ));
            }
            if otherwise.is_some() && e.args.iter().any(|c| c.mask.is_some() || c.and.is_some()) {
                return Err(bad(
                    "`otherwise` can't be combined with `mask` or `and` checks".into(),
                ));
            }
            if let Some(kinds) = &e.kinds
                && let Some(k) = kinds
                    .iter()
                    .find(|k| !AppKind::ALL.iter().any(|a| a.as_str() == k.as_str()))
            {
                return Err(bad(format!("unknown app kind {k:?}")));
            }
            let by_kind = match &e.kinds {
                Some(ks) => ks.iter().any(|k| k == kind.as_str()),
                None => !e.listen,
            };
            let granted = (by_kind || (e.listen && listen)) && (!e.network || network);
            let verdict = match (granted, e.args.is_empty(), otherwise) {
                (false, _, Some(errno)) => Verdict::Errno(errno),
                (false, _, None) => Verdict::Kill,
                (true, true, _) => Verdict::Allow,
                (true, false, _) => Verdict::AllowIf(
                    e.args
                        .iter()
                        .map(|c| {
                            let mut rule = vec![(c.arg, c.mask, c.eq)];
                            rule.extend(c.and.map(|a| (a.arg, None, a.eq)));
                            rule
                        })
                        .collect(),
                ),
            };
            calls.push(ListedCall {
                name: name.clone(),
                verdict,
                otherwise,
                why: e.why.clone(),
            });
        }
        for (name, e) in &file.errno {
            let errno = errno_value(&e.errno).ok_or_else(|| SeccompBuildError::Entry {
                section: "errno",
                name: name.clone(),
                problem: format!("unknown errno {:?}", e.errno),
            })?;
            calls.push(ListedCall {
                name: name.clone(),
                verdict: Verdict::Errno(errno),
                otherwise: None,
                why: e.why.clone(),
            });
        }
        for (name, e) in &file.never {
            calls.push(ListedCall {
                name: name.clone(),
                verdict: Verdict::Kill,
                otherwise: None,
                why: e.why.clone(),
            });
        }
        Ok(AppFilter { arch, calls })
    }

    /// How many calls pass (unconditionally or with argument checks).
    pub fn allowed_count(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Allow | Verdict::AllowIf(_)))
            .count()
    }

    /// The stacked BPF programs, in installation order.
    pub fn compile(&self) -> Result<Vec<BpfProgram>, SeccompBuildError> {
        let arch = self.arch;
        let number = |name: &str| {
            syscall_number(arch, name).ok_or_else(|| SeccompBuildError::Entry {
                section: "allow",
                name: name.to_owned(),
                problem: format!("no such system call on {arch}"),
            })
        };
        let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        let compile_err = |source| SeccompBuildError::Compile { arch, source };
        for call in &self.calls {
            match &call.verdict {
                Verdict::Kill => {
                    // `never` entries may name calls an arch lacks (e.g. no
                    // plain `open` on aarch64); they kill by default anyway.
                }
                Verdict::Allow => {
                    allow.insert(number(&call.name)?, Vec::new());
                }
                Verdict::AllowIf(checks) => {
                    let nr = number(&call.name)?;
                    let rules = checks
                        .iter()
                        .map(|rule| {
                            let conds = rule
                                .iter()
                                .map(|&(arg, mask, eq)| {
                                    let op = match mask {
                                        Some(m) => SeccompCmpOp::MaskedEq(m),
                                        None => SeccompCmpOp::Eq,
                                    };
                                    SeccompCondition::new(arg, arg_len(&call.name, arg), op, eq)
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            SeccompRule::new(conds)
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(compile_err)?;
                    if let Some(errno) = call.otherwise {
                        // Program 1 passes the call; the errno program
                        // answers when every check fails.
                        allow.insert(nr, Vec::new());
                        // Validated: one unmasked condition per rule.
                        let conds = checks
                            .iter()
                            .map(|rule| {
                                let (arg, _, eq) = rule[0];
                                SeccompCondition::new(
                                    arg,
                                    arg_len(&call.name, arg),
                                    SeccompCmpOp::Ne,
                                    eq,
                                )
                            })
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(compile_err)?;
                        let rule = SeccompRule::new(conds).map_err(compile_err)?;
                        by_errno.entry(errno).or_default().insert(nr, vec![rule]);
                    } else {
                        allow.insert(nr, rules);
                    }
                }
                Verdict::Errno(errno) => {
                    let nr = number(&call.name)?;
                    allow.insert(nr, Vec::new());
                    by_errno.entry(*errno).or_default().insert(nr, Vec::new());
                }
            }
        }
        let target = match arch {
            Arch::x86_64 => TargetArch::x86_64,
            Arch::aarch64 => TargetArch::aarch64,
        };
        let mut programs = Vec::new();
        for (errno, rules) in by_errno {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                target,
            )
            .map_err(compile_err)?;
            programs.push(BpfProgram::try_from(filter).map_err(compile_err)?);
        }
        // Last: once it is in, `seccomp(2)` itself is forbidden.
        let filter = SeccompFilter::new(
            allow,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            target,
        )
        .map_err(compile_err)?;
        programs.push(BpfProgram::try_from(filter).map_err(compile_err)?);
        Ok(programs)
    }
}

/// Flag words and pointers are 64-bit; the checks on ints (signal numbers,
/// socket families, prctl options, ioctl requests) compare 32 bits.
fn arg_len(name: &str, arg: u8) -> SeccompCmpArgLen {
    match (name, arg) {
        ("clone", 0) | ("prlimit64", 2) => SeccompCmpArgLen::Qword,
        _ => SeccompCmpArgLen::Dword,
    }
}

/// Installs `programs` on every thread (`SECCOMP_FILTER_FLAG_TSYNC`), in
/// order. `no_new_privs` must already be set.
pub(super) fn install(programs: &[&[seccompiler::sock_filter]]) -> Result<(), seccompiler::Error> {
    for program in programs {
        seccompiler::apply_filter_all_threads(program)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_exists_and_every_entry_has_a_reason() {
        let file = parse_file().unwrap();
        for arch in Arch::ALL {
            for (name, e) in &file.allow {
                assert!(!e.why.trim().is_empty(), "allow.{name} has no reason");
                if e.arch.as_deref().is_none_or(|a| a == arch.as_str()) {
                    assert!(syscall_number(arch, name).is_some(), "{arch}: {name}");
                }
            }
            for (name, e) in &file.errno {
                assert!(!e.why.trim().is_empty(), "errno.{name} has no reason");
                assert!(syscall_number(arch, name).is_some(), "{arch}: {name}");
            }
        }
    }

    #[test]
    fn nothing_in_never_is_allowed_or_in_errno() {
        let file = parse_file().unwrap();
        for name in file.never.keys() {
            assert!(
                !file.allow.contains_key(name),
                "{name} is in allow and never"
            );
            assert!(
                !file.errno.contains_key(name),
                "{name} is in errno and never"
            );
        }
        for required in [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "keyctl",
        ] {
            assert!(
                file.never.contains_key(required),
                "{required} must be in never"
            );
        }
    }

    /// What `SandboxPlan` asks for (a listen grant implies network), as
    /// build.rs compiles them.
    const NETWORK_SETTINGS: [(bool, bool); 3] = [(false, false), (true, false), (true, true)];

    #[test]
    fn every_kind_compiles_on_every_arch() {
        for arch in Arch::ALL {
            for kind in AppKind::ALL {
                for (network, listen) in NETWORK_SETTINGS {
                    let f = AppFilter::for_app(kind, network, listen, arch).unwrap();
                    let programs = f.compile().unwrap();
                    assert!(!programs.is_empty() && programs.len() <= 3);
                }
            }
        }
    }

    #[test]
    fn build_rs_compiled_what_the_list_says() {
        for arch in Arch::ALL {
            for kind in AppKind::ALL {
                for (network, listen) in NETWORK_SETTINGS {
                    let f = AppFilter::for_app(kind, network, listen, arch).unwrap();
                    let built = super::super::seccomp_bpf::find(arch, kind, network, listen)
                        .unwrap_or_else(|| {
                            panic!("{kind:?} {network} {listen} {arch} not precompiled")
                        });
                    assert_eq!(built.allowed_calls, f.allowed_count());
                    let programs: Vec<BpfProgram> =
                        built.programs.iter().map(|p| p.to_vec()).collect();
                    assert_eq!(programs, f.compile().unwrap(), "{kind:?} {network} {arch}");
                }
            }
        }
    }

    /// The verdict on `name` for an app of `kind` on x86_64.
    fn verdict(kind: AppKind, network: bool, listen: bool, name: &str) -> Verdict {
        AppFilter::for_app(kind, network, listen, Arch::x86_64)
            .unwrap()
            .calls
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .verdict
    }

    #[test]
    fn sockets_only_with_network_and_accept_only_for_servers() {
        let verdict = |kind, network, name: &str| verdict(kind, network, false, name);
        assert_eq!(
            verdict(AppKind::Http, false, "socket"),
            Verdict::Errno(libc::EPERM)
        );
        assert!(matches!(
            verdict(AppKind::Http, true, "socket"),
            Verdict::AllowIf(_)
        ));
        assert_eq!(verdict(AppKind::Command, false, "accept4"), Verdict::Kill);
        assert_eq!(verdict(AppKind::Stdio, false, "accept4"), Verdict::Allow);
        assert_eq!(verdict(AppKind::Http, true, "execve"), Verdict::Kill);
    }

    #[test]
    fn bind_listen_and_accept_only_with_a_listen_grant() {
        for kind in AppKind::ALL {
            for call in ["bind", "listen"] {
                assert_eq!(
                    verdict(kind, true, false, call),
                    Verdict::Errno(libc::EPERM),
                    "{kind:?} {call}"
                );
                assert_eq!(verdict(kind, true, true, call), Verdict::Allow);
            }
            assert_eq!(verdict(kind, true, true, "accept4"), Verdict::Allow);
            assert_eq!(verdict(kind, true, true, "execve"), Verdict::Kill);
        }
        assert_eq!(
            verdict(AppKind::Command, true, false, "accept4"),
            Verdict::Kill
        );
    }
}

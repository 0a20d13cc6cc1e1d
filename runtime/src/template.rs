//! The zygote template: one process per corrald (`corrald template`,
//! control socket on stdin) from which app zygotes are forked when an app
//! wakes, so that a cold start is a fork, not an exec.
//!
//! What it holds: corrald's own image, already loaded, relocated and
//! paged in; logging set up; and one built wasmtime engine per distinct
//! [`EngineOptions`] corrald named (`ToTemplate::Warm`), each with its
//! pooling allocator's reservations made. That is every step of a zygote's
//! start that does not depend on which app it serves.
//!
//! Why a forked zygote inherits nothing of another app: the template is
//! never sent an app. It gets engine options (sizes and CPU features, no
//! names, paths or bytes), never a spec, an artifact, a socket of an app,
//! a certificate or a metrics page, and it never loads a module or runs
//! guest code (its engines have never instantiated anything: their pools
//! are untouched reservations). A zygote learns its app only after the
//! fork, from corrald, on its own control socket. It runs with the same
//! privileges as an exec'd zygote before its sandbox (corrald's user, no
//! sandbox yet), and enters the app's sandbox before its first worker, as
//! an exec'd zygote does.
//!
//! How it forks: `clone(CLONE_PARENT)`, so that the zygote is corrald's
//! child like an exec'd one (corrald places it in the app's cgroup, sends
//! it the app, reaps it, kills its process group); the template keeps no
//! children. Then, in the child: its own process group, the template's
//! control socket and the engines it does not need closed and dropped,
//! `corrald zygote` as its command line, and `zygote::serve` with the
//! engine, as after an exec. It stays single-threaded, which both forks
//! (this one and the zygote's of its workers) rely on; each fork checks it.
//!
//! If it dies, corrald restarts it (with backoff) and starts zygotes by
//! exec meanwhile; if corrald goes, it sees its control socket close and
//! exits.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::ExitCode;

use corral_compiler::EngineOptions;
use rustix::net::RecvFlags;

use crate::protocol::{self, FromTemplate, ToTemplate};
use crate::sys::{self, Forked};
use crate::zygote::{self, Origin, Prebuilt};

/// Engines kept at most: more distinct engine options than this (a policy
/// with many different `limits.memory` or `pool.concurrency` values) are
/// built at the fork, as an exec'd zygote would.
const MAX_ENGINES: usize = 64;

/// `corrald template`: serves fork requests until corrald goes away.
pub fn main() -> ExitCode {
    if let Err(e) = sys::unblock_all_signals() {
        eprintln!("corrald template: unblocking signals: {e}");
        return ExitCode::FAILURE;
    }
    // What exec left open (stdin, stdout, stderr): what a zygote "inherits"
    // in the sense of `zygote::main`.
    let inherited = crate::sandbox::open_fds();
    // `None` only in a forked zygote, which closes it first thing.
    let mut control = match zygote::take_stdin() {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("corrald template: the control socket on stdin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut engines: HashMap<EngineOptions, corral_compiler::BuiltEngine> = HashMap::new();
    while let Some(socket) = &control {
        let (msg, fds) = match protocol::recv::<ToTemplate>(socket, RecvFlags::empty()) {
            Ok(Some(got)) => got,
            // corrald is gone.
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("zygote template: reading the control socket: {e}");
                return ExitCode::FAILURE;
            }
        };
        match msg {
            ToTemplate::Warm { engines: wanted } => {
                engines.retain(|options, _| wanted.contains(options));
                for options in &wanted {
                    hold_engine(&mut engines, options);
                }
            }
            ToTemplate::Fork { engine } => {
                let answer = match fds.into_iter().next() {
                    None => FromTemplate::Refused {
                        error: "no control socket came with the fork request".into(),
                    },
                    Some(zygote_control) => fork_zygote(
                        &mut control,
                        zygote_control,
                        &inherited,
                        &mut engines,
                        engine,
                    ),
                };
                let Some(socket) = &control else {
                    unreachable!("only a forked zygote closes it, and it never returns here")
                };
                if let Err(e) = protocol::send(socket, &answer, &[]) {
                    tracing::error!("zygote template: answering corrald: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::FAILURE
}

/// Build the engine for `options` unless it is held already or the cap is
/// reached (then the zygote builds its own, as an exec'd one does). A
/// build that fails is left to the zygote too, which reports the error as
/// its app's.
fn hold_engine(
    engines: &mut HashMap<EngineOptions, corral_compiler::BuiltEngine>,
    options: &EngineOptions,
) {
    if engines.contains_key(options) || engines.len() >= MAX_ENGINES {
        return;
    }
    match corral_compiler::build_engine(options, None) {
        Ok(built) => {
            engines.insert(options.clone(), built);
        }
        Err(e) => tracing::warn!("zygote template: building an engine: {e}"),
    }
}

/// Fork one zygote; in the child, never returns.
fn fork_zygote(
    control: &mut Option<OwnedFd>,
    zygote_control: OwnedFd,
    inherited: &[std::os::fd::RawFd],
    engines: &mut HashMap<EngineOptions, corral_compiler::BuiltEngine>,
    options: EngineOptions,
) -> FromTemplate {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count);
    if threads != 1 {
        return FromTemplate::Refused {
            error: format!("the template has {threads} threads; it forks only with one"),
        };
    }
    // An engine not built ahead (not named in a Warm) is built here.
    hold_engine(engines, &options);
    match sys::fork_beside_parent() {
        Ok(Forked::Child) => {
            // The template's socket to corrald: a zygote must not be able
            // to ask for forks (closed in this process only).
            drop(control.take());
            let prebuilt = engines.remove(&options).map(|engine| Prebuilt {
                options: options.clone(),
                engine,
            });
            // Other apps' engines: nothing of an app, but nothing this
            // zygote needs either (their reservations go).
            engines.clear();
            // Its own process group, as an exec'd zygote has: corrald
            // kills an app's processes by group.
            if let Err(e) = rustix::process::setpgid(None, None) {
                tracing::warn!("zygote: its own process group: {e}");
            }
            let _ = sys::set_command_line(&["corrald", "zygote"]);
            let code = zygote::serve(zygote_control, inherited, Origin::Template(prebuilt));
            std::process::exit(i32::from(code));
        }
        Ok(Forked::Parent(pid)) => {
            drop(zygote_control);
            tracing::debug!(pid, "zygote forked from the template");
            FromTemplate::Forked { pid }
        }
        Err(e) => FromTemplate::Refused {
            error: format!("fork: {e}"),
        },
    }
}

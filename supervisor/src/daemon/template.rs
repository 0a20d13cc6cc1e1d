//! corrald's side of the zygote template (`corrald template`,
//! `corral_runtime::template`): start it once, keep it running (restart
//! with backoff when it dies), tell it which engines the policy's apps
//! need, and ask it for zygotes. Every app task holds a [`Template`]
//! handle; when the template is off (`daemon.template = false`), down, or
//! refuses, [`Template::fork`] says so and the app starts its zygote by
//! exec, as before the template existed.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::EngineOptions;
use corral_runtime::protocol::{self, FromTemplate, ToTemplate};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::manager::{Registry, TemplateInfo};

/// How long a fork request waits for the template's answer before the
/// template is taken for hung (killed, restarted) and the zygote is
/// exec'd instead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Restart backoff after the template dies: doubling from the first to
/// the second; a template that ran longer than the reset time starts over.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));
const BACKOFF_RESET: Duration = Duration::from_secs(60);

enum Request {
    Warm(Vec<EngineOptions>),
    Fork {
        engine: EngineOptions,
        control: OwnedFd,
        reply: oneshot::Sender<Result<i32, String>>,
    },
}

/// A handle on the template; cheap to clone.
#[derive(Clone)]
pub(super) struct Template {
    /// `None`: `daemon.template = false`.
    tx: Option<mpsc::UnboundedSender<Request>>,
}

impl Template {
    /// Start the template's task (and the template) unless `enabled` is
    /// false. Must be called inside corrald's runtime.
    pub(super) fn start(enabled: bool, registry: Arc<Registry>) -> Template {
        if !enabled {
            registry.set_template(TemplateInfo::off());
            return Template { tx: None };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, registry));
        Template { tx: Some(tx) }
    }

    /// The engines the apps being served need: built ahead by the template
    /// (and those it holds that no app needs are dropped).
    pub(super) fn warm(&self, engines: Vec<EngineOptions>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Warm(engines));
        }
    }

    /// A zygote forked from the template with `control` as its control
    /// socket: its pid (a child of corrald's), or why there is none (the
    /// caller then execs one).
    pub(super) async fn fork(
        &self,
        engine: EngineOptions,
        control: OwnedFd,
    ) -> Result<i32, String> {
        let Some(tx) = &self.tx else {
            return Err("the template is off (daemon.template = false)".into());
        };
        let (reply, answer) = oneshot::channel();
        tx.send(Request::Fork {
            engine,
            control,
            reply,
        })
        .map_err(|_| "corrald is stopping".to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the template's task ended".into()))
    }
}

/// The running template process.
struct Process {
    child: std::process::Child,
    control: AsyncFd<OwnedFd>,
    exited: AsyncFd<OwnedFd>,
    started: Instant,
}

impl Process {
    fn spawn() -> anyhow::Result<Process> {
        let (ours, theirs) = super::app::control_socketpair()
            .context("creating the template's control socketpair")?;
        let child = super::app::corrald_child("template", theirs)?
            .spawn()
            .context("starting `corrald template`")?;
        // Its own cgroup (it is no app's, and not corrald's); it runs only
        // corrald's code, so a moment in corrald's first does no harm.
        if let Ok(tree) = crate::cgroup::tree()
            && let Err(why) = crate::cgroup::place(&tree.template, child.id())
        {
            tracing::warn!(
                "placing the zygote template in {}: {why}",
                tree.template.display()
            );
        }
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        );
        let process = Process {
            control: super::sys::register(ours, tokio::io::Interest::READABLE)?,
            exited: match pidfd {
                Ok(fd) => super::sys::register(fd, tokio::io::Interest::READABLE)?,
                Err(e) => {
                    let mut child = child;
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e).context("pidfd_open of the template");
                }
            },
            child,
            started: Instant::now(),
        };
        rustix::io::ioctl_fionbio(process.control.get_ref(), true)?;
        Ok(process)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL it; its exit is then seen on `exited`.
    fn kill(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// Tell it which engines to hold (a failure shows at the next fork).
    fn warm(&self, engines: &[EngineOptions]) {
        let msg = ToTemplate::Warm {
            engines: engines.to_vec(),
        };
        if let Err(e) = protocol::send(self.control.get_ref(), &msg, &[]) {
            tracing::warn!("zygote template: {e:#}");
        }
    }

    async fn fork(&self, engine: EngineOptions, control: OwnedFd) -> Result<i32, Refusal> {
        protocol::send(
            self.control.get_ref(),
            &ToTemplate::Fork { engine },
            &[control.as_fd()],
        )
        .map_err(|e| Refusal::Said(format!("{e:#}")))?;
        drop(control); // the zygote (or nobody) holds it now
        let answer = tokio::time::timeout(
            ANSWER_TIMEOUT,
            super::app::recv_from::<FromTemplate>(&self.control),
        )
        .await;
        match answer {
            Ok(Ok(Some(FromTemplate::Forked { pid }))) => Ok(pid),
            Ok(Ok(Some(FromTemplate::Refused { error }))) => Err(Refusal::Said(error)),
            Ok(Ok(None)) => Err(Refusal::Said(
                "the template closed its control socket".into(),
            )),
            Ok(Err(e)) => Err(Refusal::Hung(format!("reading the template's answer: {e}"))),
            Err(_) => Err(Refusal::Hung(format!(
                "the template did not answer within {}",
                humantime::format_duration(ANSWER_TIMEOUT)
            ))),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(mut requests: mpsc::UnboundedReceiver<Request>, registry: Arc<Registry>) {
    let mut engines: Vec<EngineOptions> = Vec::new();
    let mut backoff = BACKOFF.0;
    let mut restarts = 0u64;
    let mut process: Option<Process> = None;
    // When to (re)start it; `None` while it runs.
    let mut start_at = Some(tokio::time::Instant::now());
    loop {
        if let Some(at) = start_at
            && at <= tokio::time::Instant::now()
        {
            start_at = None;
            match Process::spawn() {
                Ok(p) => {
                    tracing::debug!(pid = p.pid(), "zygote template started");
                    p.warm(&engines);
                    registry.set_template(TemplateInfo::running(p.pid(), restarts));
                    process = Some(p);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(
                        "{why}; zygotes start by exec; trying again in {}",
                        humantime::format_duration(backoff)
                    );
                    registry.set_template(TemplateInfo::down(why, restarts));
                    start_at = Some(restart_after(&mut backoff));
                }
            }
        }
        let restart_sleep = tokio::time::sleep_until(
            start_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400)),
        );
        let event = tokio::select! {
            request = requests.recv() => Event::Request(request),
            guard = async { process.as_ref().expect("guarded").exited.readable().await }, if process.is_some() => {
                drop(guard);
                Event::Exited
            }
            () = restart_sleep, if start_at.is_some() => Event::Restart,
        };
        match event {
            // corrald is stopping: dropping the process kills it.
            Event::Request(None) => return,
            Event::Request(Some(Request::Warm(list))) => {
                let mut distinct = Vec::new();
                for e in list {
                    if !distinct.contains(&e) {
                        distinct.push(e);
                    }
                }
                if distinct != engines {
                    engines = distinct;
                    if let Some(p) = &process {
                        p.warm(&engines);
                    }
                }
            }
            Event::Request(Some(Request::Fork {
                engine,
                control,
                reply,
            })) => {
                let result = match &process {
                    Some(p) => p.fork(engine, control).await,
                    None => Err(Refusal::Said("the template is restarting".into())),
                };
                if let (Err(Refusal::Hung(why)), Some(p)) = (&result, &process) {
                    tracing::warn!(pid = p.pid(), "zygote template: {why}; killing it");
                    // Its exit is seen as any other.
                    p.kill();
                }
                let _ = reply.send(result.map_err(Refusal::into_string));
            }
            Event::Exited => {
                let Some(mut p) = process.take() else {
                    continue;
                };
                let status = p.child.wait();
                let lived = p.started.elapsed();
                drop(p);
                if lived > BACKOFF_RESET {
                    backoff = BACKOFF.0;
                }
                restarts += 1;
                let how = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown status ({e})"),
                };
                tracing::warn!(
                    "the zygote template exited ({how}); zygotes start by exec until it is back, in {}",
                    humantime::format_duration(backoff)
                );
                registry.set_template(TemplateInfo::down(format!("exited ({how})"), restarts));
                start_at = Some(restart_after(&mut backoff));
            }
            Event::Restart => {}
        }
    }
}

/// When to start the template again: after `backoff`, which doubles (up
/// to its ceiling) for the next time.
fn restart_after(backoff: &mut Duration) -> tokio::time::Instant {
    let at = tokio::time::Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(BACKOFF.1);
    at
}

enum Event {
    Request(Option<Request>),
    Exited,
    Restart,
}

/// Why a fork request got no zygote.
enum Refusal {
    /// The template said why, or is not there.
    Said(String),
    /// It did not answer in time: it is killed and restarted.
    Hung(String),
}

impl Refusal {
    fn into_string(self) -> String {
        match self {
            Refusal::Said(s) | Refusal::Hung(s) => s,
        }
    }
}

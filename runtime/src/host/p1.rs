//! WASI preview1 command modules: instantiate, call `_start`, report how
//! it ended. A fresh store (and instance) per run.

use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::limits::{Limiter, arm_deadline};
use super::{GuestCaps, RunOutcome};

/// The store data of a preview1 guest.
pub struct P1State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
}

impl std::fmt::Debug for P1State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P1State").finish_non_exhaustive()
    }
}

/// A linker with all of WASI preview1, reusable across runs.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<P1State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut P1State| &mut s.wasi)?;
    Ok(linker)
}

/// Run `module`'s `_start` once with `caps`.
///
/// `Err` only when the guest could not be started for a reason that is
/// not the guest's doing at run time (a missing import, no `_start`, a
/// preopen that cannot be opened); everything after is a [`RunOutcome`].
pub async fn run(
    engine: &Engine,
    linker: &Linker<P1State>,
    module: &Module,
    caps: &GuestCaps,
    blocking: bool,
) -> anyhow::Result<RunOutcome> {
    let state = P1State {
        wasi: caps.wasi_builder(blocking)?.build_p1(),
        limiter: Limiter::new(&caps.limits),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    arm_deadline(&mut store, caps.limits.timeout);

    let instance = match linker.instantiate_async(&mut store, module).await {
        Ok(instance) => instance,
        Err(err) => return instantiate_failure(err, caps),
    };
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|e| anyhow::Error::from(e).context("not a WASI command: no `_start` export"))?;
    let call = start.call_async(&mut store, ());
    let result = super::limits::with_backstop(caps.limits.timeout, call).await;
    Ok(RunOutcome::from_result(result.map(|()| 0), &caps.limits))
}

/// An instantiation error is the guest's outcome when it is a limit or a
/// trap in its start function; otherwise the host could not run it.
pub(crate) fn instantiate_failure(
    err: wasmtime::Error,
    caps: &GuestCaps,
) -> anyhow::Result<RunOutcome> {
    let outcome = RunOutcome::from_result(Err(err), &caps.limits);
    match outcome {
        RunOutcome::Trapped(err) if err.downcast_ref::<wasmtime::Trap>().is_none() => {
            Err(anyhow::Error::from(err).context("instantiating the guest"))
        }
        other => Ok(other),
    }
}

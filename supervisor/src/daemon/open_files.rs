//! corrald's file descriptors: how many a policy needs, and the limit it
//! gets (`RLIMIT_NOFILE`).
//!
//! corrald holds a handful of descriptors per app for as long as it runs
//! (the listening sockets, the artifact, the metrics page, and while the
//! app has processes its zygote's control socket and pidfd), so thousands
//! of apps need more than the soft limit of 1,024 that most systems give a
//! process. corrald raises its soft limit to the hard limit first thing
//! ([`raise_soft_limit`]; `units/corrald.service` sets `LimitNOFILE=`),
//! and `corral check` and corrald's start warn when the policy needs more
//! than the hard limit allows ([`shortfall`]).

use corral_policy::Policy;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors corrald holds whatever the policy: the runtime's epoll and
/// wake-ups, the API socket and its clients, D-Bus, logging, the metrics
/// listener, a compile in flight.
const BASE: u64 = 128;

/// Descriptors per listening socket: the bound socket corrald keeps across
/// reloads, the app task's copy, and one more while corrald watches it for
/// a waiting connection (`pool.min = 0`).
const PER_LISTEN_ADDRESS: u64 = 3;

/// Descriptors per app besides its sockets: the open artifact, the metrics
/// page, and while its zygote runs the control socket and the pidfd.
const PER_APP: u64 = 4;

/// About how many descriptors corrald needs to serve `policy`.
pub(crate) fn needed(policy: &Policy) -> u64 {
    policy
        .apps
        .values()
        .map(|app| PER_APP + PER_LISTEN_ADDRESS * app.listen.len() as u64)
        .sum::<u64>()
        + BASE
}

/// The limit corrald runs with: the hard `RLIMIT_NOFILE` (corrald raises
/// its soft limit to it), `None` when unlimited.
pub(crate) fn hard_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).maximum
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns the new soft
/// limit (`None`: unlimited). The zygotes inherit it and set their own
/// (the sandbox's `open_files`).
pub(crate) fn raise_soft_limit() -> std::io::Result<Option<u64>> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum)
}

/// The warning for a policy that needs more descriptors than `limit`
/// allows, or `None` when it fits.
pub(crate) fn shortfall(policy: &Policy, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let needed = needed(policy);
    if needed <= limit {
        return None;
    }
    let sockets: usize = policy.apps.values().map(|a| a.listen.len()).sum();
    Some(format!(
        "this policy needs about {needed} open files in corrald ({} apps, {sockets} listening \
         sockets) but the limit is {limit} (RLIMIT_NOFILE): apps will fail with \"Too many open \
         files\"; raise LimitNOFILE= in corrald.service (a drop-in: systemctl edit corrald) or \
         the hard limit corrald starts with (ulimit -Hn)",
        policy.apps.len()
    ))
}

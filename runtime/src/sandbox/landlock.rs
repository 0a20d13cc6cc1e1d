//! The landlock layer: filesystem access only below the plan's read-only
//! and read-write paths, TCP connect only to its ports and TCP bind only to
//! its listen ports, none for an app (ABI 4+), and no signals or abstract unix sockets outside the domain
//! (ABI 6+).
//!
//! The ruleset targets ABI 7, the newest this code was tested against; the
//! crate drops what an older kernel lacks (best effort), and [`restrict`]
//! reports what was enforced from the kernel's ABI. Whether a missing part
//! is acceptable is decided by `SandboxPlan::enter` before anything is
//! changed.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};

use super::{LandlockLayer, SandboxError};

/// The ABI whose access rights the ruleset asks for.
pub(super) const TARGET_ABI: ABI = ABI::V7;

/// What one landlock ruleset grants.
#[derive(Debug)]
pub(super) struct FsNetRules<'a> {
    pub read_only: &'a [PathBuf],
    pub read_write: &'a [PathBuf],
    /// TCP connect only to these ports; `None`: any port.
    pub connect_ports: Option<&'a [u16]>,
    /// TCP bind only to these ports (none: no bind); `None`: any port.
    pub bind_ports: Option<&'a [u16]>,
}

/// Read below a read-only path: files and directory listings, no execute.
fn read_access() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

/// Read and write below a read-write path: everything a WASI guest can do
/// to files, but no execute and no device, socket or fifo nodes.
fn read_write_access() -> BitFlags<AccessFs> {
    AccessFs::from_all(TARGET_ABI)
        & !(AccessFs::Execute
            | AccessFs::MakeChar
            | AccessFs::MakeBlock
            | AccessFs::MakeSock
            | AccessFs::MakeFifo
            | AccessFs::IoctlDev)
}

/// Builds the ruleset and restricts the calling thread (and the threads
/// and processes it later creates). `kernel_abi` is what the kernel
/// reported; it decides which parts the returned layer says are active.
pub(super) fn restrict(
    rules: &FsNetRules<'_>,
    kernel_abi: u32,
) -> Result<LandlockLayer, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(Box::new(e));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(err)?;
    // Restrict connect and bind unless the plan grants any port.
    let mut net = BitFlags::<AccessNet>::empty();
    if rules.connect_ports.is_some() {
        net |= AccessNet::ConnectTcp;
    }
    if rules.bind_ports.is_some() {
        net |= AccessNet::BindTcp;
    }
    if kernel_abi >= 4 && !net.is_empty() {
        ruleset = ruleset.handle_access(net).map_err(err)?;
    }
    if kernel_abi >= 6 {
        ruleset = ruleset.scope(Scope::from_all(TARGET_ABI)).map_err(err)?;
    }
    let mut created = ruleset.create().map_err(err)?;
    for (paths, access) in [
        (rules.read_only, read_access()),
        (rules.read_write, read_write_access()),
    ] {
        for path in paths {
            // One at a time so that an error names the path.
            let rule = path_beneath_rules([path], access)
                .next()
                .expect("one path gives one rule")
                .map_err(|e| SandboxError::Path {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
            created = created.add_rule(rule).map_err(err)?;
        }
    }
    if kernel_abi >= 4 {
        for (ports, access) in [
            (rules.connect_ports, AccessNet::ConnectTcp),
            (rules.bind_ports, AccessNet::BindTcp),
        ] {
            for &port in ports.unwrap_or_default() {
                created = created.add_rule(NetPort::new(port, access)).map_err(err)?;
            }
        }
    }
    // no_new_privs is already set by `enter`; the crate sets it again.
    let status = created.restrict_self().map_err(err)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::LandlockNotEnforced);
    }
    Ok(LandlockLayer {
        abi: kernel_abi,
        filesystem: true,
        tcp: kernel_abi >= 4,
        scoping: kernel_abi >= 6,
    })
}

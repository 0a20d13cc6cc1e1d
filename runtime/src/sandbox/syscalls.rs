//! System call numbers and names, per architecture, as data
//! (`syscalls/<arch>.txt`, generated from the libc crate), and the report of
//! a worker killed by the seccomp filter.
//!
//! The same tables serve both directions: the seccomp module turns the
//! names of its allow-list into numbers, and the supervisor turns the number
//! of a violating call (from the kernel's audit record or a SIGSYS siginfo)
//! back into a name for the log.

use std::collections::HashMap;
use std::fmt;
use std::process::ExitStatus;
use std::sync::OnceLock;

use serde::Serialize;

/// An architecture corral builds seccomp filters for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(non_camel_case_types, reason = "named as Rust's target_arch values")]
pub enum Arch {
    x86_64,
    aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::x86_64, Arch::aarch64];

    /// The architecture this binary runs on, if corral supports it.
    pub fn current() -> Option<Arch> {
        Arch::from_name(std::env::consts::ARCH)
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "x86_64" => Some(Arch::x86_64),
            "aarch64" => Some(Arch::aarch64),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::x86_64 => "x86_64",
            Arch::aarch64 => "aarch64",
        }
    }

    /// The `AUDIT_ARCH_*` value the kernel puts in audit records and
    /// `siginfo.si_arch`.
    pub fn audit_arch(self) -> u32 {
        match self {
            Arch::x86_64 => 0xc000_003e,
            Arch::aarch64 => 0xc000_00b7,
        }
    }

    fn from_audit_arch(value: u32) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.audit_arch() == value)
    }

    fn table(self) -> &'static Table {
        static X86_64: OnceLock<Table> = OnceLock::new();
        static AARCH64: OnceLock<Table> = OnceLock::new();
        match self {
            Arch::x86_64 => {
                X86_64.get_or_init(|| Table::parse(include_str!("syscalls/x86_64.txt")))
            }
            Arch::aarch64 => {
                AARCH64.get_or_init(|| Table::parse(include_str!("syscalls/aarch64.txt")))
            }
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Table {
    by_name: HashMap<&'static str, i64>,
    by_number: HashMap<i64, &'static str>,
}

impl Table {
    /// `NUMBER NAME` lines; `#` starts a comment. The file is ours and
    /// checked by a unit test, so a malformed line is a bug: skip it.
    fn parse(text: &'static str) -> Table {
        let mut by_name = HashMap::new();
        let mut by_number = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            if let (Some(nr), Some(name)) = (parts.next(), parts.next())
                && let Ok(nr) = nr.parse::<i64>()
            {
                by_name.insert(name, nr);
                by_number.insert(nr, name);
            }
        }
        Table { by_name, by_number }
    }
}

/// The number of system call `name` on `arch`, if it exists there.
pub fn syscall_number(arch: Arch, name: &str) -> Option<i64> {
    arch.table().by_name.get(name).copied()
}

/// The name of system call `nr` on `arch`, if the table knows it.
pub fn syscall_name(arch: Arch, nr: i64) -> Option<&'static str> {
    arch.table().by_number.get(&nr).copied()
}

/// A process killed by the seccomp filter, as the supervisor logs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompKill {
    pub pid: Option<u32>,
    pub arch: Option<Arch>,
    /// The system call number, when known (audit record or siginfo).
    pub syscall: Option<i64>,
}

impl SeccompKill {
    /// The syscall's name, when the number and the architecture are known.
    pub fn syscall_name(&self) -> Option<&'static str> {
        syscall_name(self.arch?, self.syscall?)
    }

    /// The log line for a worker of `app` killed by the filter.
    pub fn describe(&self, app: &str) -> String {
        let who = match self.pid {
            Some(pid) => format!("worker {pid}"),
            None => "worker".to_owned(),
        };
        let call = match (self.syscall_name(), self.syscall) {
            (Some(name), Some(nr)) => format!("system call {name} ({nr})"),
            (None, Some(nr)) => format!("system call number {nr}"),
            _ => "a forbidden system call (number unknown: no audit record)".to_owned(),
        };
        format!("app {app}: {who} killed by the seccomp sandbox (SIGSYS) for {call}")
    }
}

/// Whether a child's exit status is death by SIGSYS, the signal of
/// `SECCOMP_RET_KILL_PROCESS`. The status carries no syscall number; find
/// it with [`parse_audit_record`] (kernel log) or a SIGSYS siginfo.
pub fn killed_by_seccomp(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGSYS)
}

/// What the supervisor logs when child `pid` exited with `status`: `None`
/// unless it died of SIGSYS; then the call from the kernel's audit record
/// when the kernel log is readable, or a report without a number.
pub fn seccomp_kill(pid: u32, status: ExitStatus) -> Option<SeccompKill> {
    if !killed_by_seccomp(status) {
        return None;
    }
    Some(find_audit_record(pid).unwrap_or(SeccompKill {
        pid: Some(pid),
        arch: Arch::current(),
        syscall: None,
    }))
}

/// The report from a SIGSYS `siginfo_t`'s fields (`si_syscall`,
/// `si_arch`), as a parent gets them from a trapped child or a handler.
pub fn from_siginfo(pid: Option<u32>, si_arch: u32, si_syscall: i32) -> SeccompKill {
    SeccompKill {
        pid,
        arch: Arch::from_audit_arch(si_arch),
        syscall: Some(i64::from(si_syscall)),
    }
}

/// Parses the kernel's seccomp audit record (type 1326, `AUDIT_SECCOMP`),
/// as found in the kernel log or the journal:
/// `audit: type=1326 audit(…): auid=… uid=0 … pid=4242 comm="x" exe="…"
/// sig=31 arch=c000003e syscall=59 compat=0 ip=… code=0x80000000`.
pub fn parse_audit_record(line: &str) -> Option<SeccompKill> {
    if !line.contains("type=1326") && !line.contains("SECCOMP") {
        return None;
    }
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
    };
    let syscall = field("syscall")?.parse().ok()?;
    let arch = field("arch").and_then(|a| u32::from_str_radix(a, 16).ok());
    Some(SeccompKill {
        pid: field("pid").and_then(|p| p.parse().ok()),
        arch: arch.and_then(Arch::from_audit_arch),
        syscall: Some(syscall),
    })
}

/// Looks for the audit record of `pid` in the kernel log (`/dev/kmsg`,
/// readable by root or with `CAP_SYSLOG`); `None` when it can't be read or
/// holds no record for that pid.
pub fn find_audit_record(pid: u32) -> Option<SeccompKill> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut found = None;
    // /dev/kmsg returns one record per read and EAGAIN at the end.
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = kmsg.read(&mut buf) {
        if n == 0 {
            break;
        }
        let record = String::from_utf8_lossy(&buf[..n]);
        if let Some(kill) = parse_audit_record(&record)
            && kill.pid == Some(pid)
        {
            found = Some(kill);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_know_the_calls_the_sandbox_names() {
        for arch in Arch::ALL {
            for name in [
                "read", "write", "mmap", "futex", "openat", "clone", "socket",
            ] {
                let nr = syscall_number(arch, name).unwrap_or_else(|| panic!("{arch} {name}"));
                assert_eq!(syscall_name(arch, nr), Some(name));
            }
        }
        assert_eq!(syscall_number(Arch::x86_64, "execve"), Some(59));
        assert_eq!(syscall_number(Arch::aarch64, "execve"), Some(221));
        assert_eq!(syscall_number(Arch::aarch64, "open"), None);
    }

    #[test]
    fn audit_record_names_the_call() {
        let line = "6,1234,5678,-;audit: type=1326 audit(1700000000.123:42): auid=4294967295 \
                    uid=0 gid=0 ses=4294967295 pid=4242 comm=\"probe\" exe=\"/x\" sig=31 \
                    arch=c000003e syscall=59 compat=0 ip=0x7f code=0x80000000";
        let kill = parse_audit_record(line).unwrap();
        assert_eq!(kill.pid, Some(4242));
        assert_eq!(kill.syscall_name(), Some("execve"));
        assert_eq!(
            kill.describe("web"),
            "app web: worker 4242 killed by the seccomp sandbox (SIGSYS) for system call execve (59)"
        );
        assert_eq!(parse_audit_record("usb 1-1: new device"), None);
    }

    #[test]
    fn siginfo_names_the_call_on_aarch64() {
        let kill = from_siginfo(Some(7), Arch::aarch64.audit_arch(), 117);
        assert_eq!(kill.syscall_name(), Some("ptrace"));
    }
}

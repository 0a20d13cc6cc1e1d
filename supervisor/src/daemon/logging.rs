//! corrald's logs: journald fields when systemd connected stderr to the
//! journal (`JOURNAL_STREAM` names stderr's device and inode), plain text
//! on stderr otherwise. Filter with `CORRAL_LOG` (tracing's `EnvFilter`
//! syntax; default `info`).
//!
//! In the journal, an event's fields get the `CORRAL_` prefix: `app = ..`
//! becomes `CORRAL_APP=`, `worker = ..` `CORRAL_WORKER=`; the level becomes
//! `PRIORITY=` the way syslog(3) names them (error 3, warn 4, info 6,
//! debug and trace 7), not tracing-journald's default (info as notice 5,
//! debug as info 6), so `journalctl -p info` leaves out the debug events. Zygotes and workers always write plain text to the
//! inherited stderr (the journal stream under systemd): their sandbox
//! allows no new socket to journald.

use std::os::fd::AsFd as _;

use tracing_subscriber::prelude::*;

/// Which process is logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Daemon,
    Zygote,
}

/// Install the global subscriber for `role`.
pub fn init(role: Role) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if role == Role::Daemon && stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some("CORRAL".into()))
                    .with_syslog_identifier("corrald".into())
                    .with_priority_mappings(syslog_priorities());
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter()))
                    .init();
                return;
            }
            Err(e) => eprintln!("corrald: journald unavailable ({e}); logging plain text"),
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter())
        .init();
}

/// tracing levels as syslog(3) priorities (see the module's comment).
fn syslog_priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// `JOURNAL_STREAM=DEV:INODE` matches our stderr (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}

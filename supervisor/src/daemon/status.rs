//! corrald's `STATUS=` line for systemd (`systemctl status` shows it).
//!
//! Invariant: every notification corrald sends is far below the 4,096
//! bytes at which systemd drops a notify datagram ("exceeded maximum
//! size"), whatever the number of apps: the line names every app only
//! while that fits in [`STATUS_MAX`] bytes, and otherwise counts the apps
//! per state and names only those that need an operator (failed first,
//! then restarting) as far as they fit. `READY=1` goes with such a line.
//!
//! State changes do not each send a line: [`follow`] sends the line when
//! it changed, at most every [`STATUS_EVERY`], so that starting thousands
//! of apps costs one summary per period, not one per app.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::manager::{AppState, Registry};

/// The longest `STATUS=` value corrald sends.
pub(crate) const STATUS_MAX: usize = 1024;

/// How often at most a changed `STATUS=` goes out.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// One line about every app: `4 apps: a idle, b 2w/1 busy, c FAILED`, or
/// with many apps `600 apps: 3 running (5 workers, 1 busy), 595 idle,
/// 2 FAILED (x, y)`; never longer than [`STATUS_MAX`].
pub(crate) fn summarize(states: &[(String, AppState, u32, u32)]) -> String {
    let mut line = format!("{} apps: ", states.len());
    let parts: Vec<String> = states
        .iter()
        .map(|(name, state, workers, busy)| match state {
            AppState::Running => format!("{name} {workers}w/{busy} busy"),
            AppState::Restarting => format!("{name} restarting"),
            AppState::Failed => format!("{name} FAILED"),
            other => format!("{name} {other}"),
        })
        .collect();
    let every_app = parts.join(", ");
    if line.len() + every_app.len() <= STATUS_MAX {
        line.push_str(&every_app);
        return line;
    }
    let count = |s: AppState| states.iter().filter(|(_, st, _, _)| *st == s).count();
    let (workers, busy) = states
        .iter()
        .filter(|(_, s, _, _)| *s == AppState::Running)
        .fold((0u64, 0u64), |(w, b), (_, _, ws, bs)| {
            (w + u64::from(*ws), b + u64::from(*bs))
        });
    let mut counts = Vec::new();
    for state in [
        AppState::Running,
        AppState::Starting,
        AppState::Idle,
        AppState::Stopped,
        AppState::Finished,
        AppState::Restarting,
        AppState::Failed,
    ] {
        let n = count(state);
        if n == 0 {
            continue;
        }
        counts.push(match state {
            AppState::Running => format!("{n} running ({workers} workers, {busy} busy)"),
            AppState::Failed => format!("{n} FAILED"),
            other => format!("{n} {other}"),
        });
    }
    line.push_str(&counts.join(", "));
    // Those an operator should look at, as far as they fit.
    let attention: Vec<&str> = [AppState::Failed, AppState::Restarting]
        .iter()
        .flat_map(|want| {
            states
                .iter()
                .filter(move |(_, s, _, _)| s == want)
                .map(|(name, _, _, _)| name.as_str())
        })
        .collect();
    if !attention.is_empty() {
        line.push_str("; look at: ");
        for (i, name) in attention.iter().enumerate() {
            let rest = attention.len() - i;
            let more = format!(" and {rest} more");
            let sep = if i == 0 { "" } else { ", " };
            if line.len() + sep.len() + name.len() + " and 99999 more".len() > STATUS_MAX {
                line.push_str(&more);
                break;
            }
            let _ = write!(line, "{sep}{name}");
        }
    }
    // Names are bounded by the policy, not here: cut at a char boundary.
    if line.len() > STATUS_MAX {
        let mut end = STATUS_MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

/// Send `STATUS=` whenever the registry says a state changed, at most
/// every [`STATUS_EVERY`], and only when the line differs from the last.
pub(crate) async fn follow(registry: Arc<Registry>) {
    let mut last = String::new();
    loop {
        registry.status_changed.notified().await;
        let line = summarize(&registry.states());
        if line != last {
            let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
            last = line;
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_app_while_that_fits() {
        let states = [
            ("a".to_string(), AppState::Idle, 0, 0),
            ("b".to_string(), AppState::Running, 2, 1),
            ("c".to_string(), AppState::Failed, 0, 0),
            ("d".to_string(), AppState::Stopped, 0, 0),
        ];
        assert_eq!(
            summarize(&states),
            "4 apps: a idle, b 2w/1 busy, c FAILED, d stopped"
        );
    }

    #[test]
    fn counts_many_apps_and_names_those_that_need_an_operator() {
        let mut states: Vec<_> = (0..20_000)
            .map(|i| (format!("app-with-a-long-name-{i:05}"), AppState::Idle, 0, 0))
            .collect();
        states[7].1 = AppState::Failed;
        states[9] = (states[9].0.clone(), AppState::Running, 3, 1);
        for s in &mut states[100..400] {
            s.1 = AppState::Restarting;
        }
        let line = summarize(&states);
        assert!(line.len() <= STATUS_MAX, "{} bytes", line.len());
        assert!(
            line.starts_with(
                "20000 apps: 1 running (3 workers, 1 busy), 19698 idle, 300 restarting, 1 FAILED; \
                 look at: app-with-a-long-name-00007, app-with-a-long-name-00100"
            ),
            "{line}"
        );
        assert!(line.ends_with(" more"), "{line}");
    }
}

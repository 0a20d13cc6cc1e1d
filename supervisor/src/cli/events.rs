//! `corral events`: follow corrald's app state changes as they happen.

use std::io::Write as _;
use std::process::ExitCode;

use super::client::Target;

/// Follow app state changes (until interrupted, or corrald goes away).
#[derive(Debug, clap::Args)]
pub struct EventsCommand {
    /// Stop after this many events (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    #[command(flatten)]
    pub target: Target,
}

impl EventsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let json = self.target.json;
        let mut left = self.count;
        let result = self.target.follow_events(&mut |event| {
            let line = if json {
                event.to_string()
            } else {
                let at = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(event["time"].as_u64().unwrap_or(0));
                let mut line = format!(
                    "{} {}: {} -> {} ({} workers)",
                    humantime::format_rfc3339_millis(at),
                    event["app"].as_str().unwrap_or("?"),
                    event["old"].as_str().unwrap_or("-"),
                    event["state"].as_str().unwrap_or("?"),
                    event["workers"]
                );
                if let Some(detail) = event["detail"].as_str() {
                    line.push_str(&format!(": {detail}"));
                }
                line
            };
            let mut out = std::io::stdout().lock();
            // A closed stdout (`corral events | head`) ends the command.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return false;
            }
            match &mut left {
                Some(n) => {
                    *n -= 1;
                    *n > 0
                }
                None => true,
            }
        });
        Ok(match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.report(),
        })
    }
}

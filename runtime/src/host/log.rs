//! Guest stdout and stderr as log lines (served apps): every line an
//! instance writes becomes one log event tagged with the app, the worker's
//! pid, the request's number within that worker and the stream. Two bounds
//! keep a guest from filling corrald's log (issue 15: a stdio guest looping
//! on stderr wrote 98 MB in 4 s):
//! - an instance's output is bounded by `limits.stdout` bytes (stdout and
//!   stderr together; a stdio app's stdout is its connection, so there it is
//!   stderr alone); past it the rest is dropped and that is said once;
//! - an app's instances together log at most [`APP_LOG_RATE`] bytes a
//!   second (every worker counts in the app's shared page); past it the
//!   rest of that second is dropped, said at most once a minute.
//!
//! Both drops are counted in the app's `log_dropped_bytes`
//! (`corral_app_guest_log_dropped_bytes_total`). The guest never sees an
//! error from its output: dropping is the limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::AsyncStdoutStream;

use crate::counters::AppCounters;

/// The longest line logged as one event; longer ones are split.
const MAX_LINE: usize = 16 * 1024;

/// Bytes of guest output one app may log per second, all of its instances
/// and workers together.
pub const APP_LOG_RATE: u64 = 1 << 20;

/// Where one app's instances log; cheap to clone, one per app.
#[derive(Debug, Clone)]
pub struct GuestLog {
    app: Arc<str>,
    /// Instances started by this process (a request number per worker).
    instances: Arc<AtomicU64>,
    limit: u64,
    /// The app's page: the shared rate window and the dropped bytes.
    counters: &'static AppCounters,
}

impl GuestLog {
    /// The log of `app`'s guests, `limit` bytes per instance
    /// (`limits.stdout`), at most [`APP_LOG_RATE`] a second counted in
    /// `counters` (the app's page, shared by its workers).
    pub fn new(app: &str, limit: u64, counters: &'static AppCounters) -> GuestLog {
        GuestLog {
            app: app.into(),
            instances: Arc::default(),
            limit,
            counters,
        }
    }

    /// The stdout and stderr of one new instance.
    pub(crate) fn streams(&self) -> (AsyncStdoutStream, AsyncStdoutStream) {
        let tag = Arc::new(Tag {
            app: self.app.clone(),
            worker: rustix::process::getpid().as_raw_nonzero().get(),
            request: self.instances.fetch_add(1, Ordering::Relaxed) + 1,
            left: AtomicU64::new(self.limit),
            counters: self.counters,
        });
        let stream = |name| AsyncStdoutStream::new(64 * 1024, LineWriter::new(tag.clone(), name));
        (stream("stdout"), stream("stderr"))
    }
}

/// What every line of one instance is tagged with.
#[derive(Debug)]
struct Tag {
    app: Arc<str>,
    worker: i32,
    request: u64,
    /// Bytes still allowed (stdout and stderr together).
    left: AtomicU64,
    counters: &'static AppCounters,
}

/// Splits what a guest writes into lines and logs them.
#[derive(Debug)]
struct LineWriter {
    tag: Arc<Tag>,
    stream: &'static str,
    line: Vec<u8>,
}

impl LineWriter {
    fn new(tag: Arc<Tag>, stream: &'static str) -> LineWriter {
        LineWriter {
            tag,
            stream,
            line: Vec::new(),
        }
    }

    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        tracing::info!(
            target: "guest",
            app = %self.tag.app,
            worker = self.tag.worker,
            request = self.tag.request,
            stream = self.stream,
            "{text}"
        );
        self.line.clear();
    }

    fn write(&mut self, buf: &[u8]) {
        let counters = self.tag.counters;
        let left = self.tag.left.load(Ordering::Relaxed);
        if left == 0 {
            counters.drop_log(buf.len() as u64);
            return;
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.tag.left.fetch_sub(take as u64, Ordering::Relaxed);
        counters.drop_log((buf.len() - take) as u64);
        // What the app's rate lets through this second.
        let admitted = counters.admit_log(take as u64, APP_LOG_RATE) as usize;
        for &byte in &buf[..admitted] {
            self.line.push(byte);
            if byte == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
            }
        }
        if admitted < take {
            self.emit();
            if counters.note_log_rate() {
                tracing::warn!(
                    target: "guest",
                    app = %self.tag.app,
                    worker = self.tag.worker,
                    request = self.tag.request,
                    "guest output over {} KiB/s for this app: the rest is dropped \
                     (counted in corral_app_guest_log_dropped_bytes_total; said once a minute)",
                    APP_LOG_RATE / 1024
                );
            }
        }
        if take < buf.len() {
            self.emit();
            tracing::warn!(
                target: "guest",
                app = %self.tag.app,
                worker = self.tag.worker,
                request = self.tag.request,
                "limits.stdout reached: the rest of this instance's output is dropped"
            );
        }
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().emit();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.emit(); // a last line without a newline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_counts_both_streams_and_cuts() {
        let counters = AppCounters::private();
        let tag = Arc::new(Tag {
            app: "a".into(),
            worker: 1,
            request: 1,
            left: AtomicU64::new(10),
            counters,
        });
        let mut out = LineWriter::new(tag.clone(), "stdout");
        let mut err = LineWriter::new(tag.clone(), "stderr");
        out.write(b"12345\n");
        assert!(out.line.is_empty(), "a whole line is logged at once");
        err.write(b"abcdefgh");
        assert_eq!(err.line, b"", "cut at the limit and logged");
        assert_eq!(tag.left.load(Ordering::Relaxed), 0);
        err.write(b"more\n");
        assert!(err.line.is_empty(), "nothing past the limit");
        assert_eq!(counters.log_dropped_bytes.load(Ordering::Relaxed), 4 + 5);
    }

    #[test]
    fn an_app_logs_at_most_its_rate_a_second() {
        let counters = AppCounters::private();
        let tag = Arc::new(Tag {
            app: "a".into(),
            worker: 1,
            request: 1,
            left: AtomicU64::new(u64::MAX),
            counters,
        });
        let mut err = LineWriter::new(tag, "stderr");
        let line = [b'x'; 1024];
        // Four times the rate at once: at most a second's worth (two when
        // the second turns over during the loop) gets through.
        for _ in 0..4 * APP_LOG_RATE / 1024 {
            err.write(&line);
        }
        let dropped = counters.log_dropped_bytes.load(Ordering::Relaxed);
        assert!(dropped >= 2 * APP_LOG_RATE, "{dropped}");
        assert!(
            !counters.note_log_rate(),
            "said once, then not for a minute"
        );
    }
}

//! Guest stdout and stderr as log lines (served apps): every line an
//! instance writes becomes one log event tagged with the app, the worker's
//! pid, the request's number within that worker and the stream, and an
//! instance's output is bounded by `limits.stdout` bytes (stdout and stderr
//! together); past it the rest is dropped and that is said once.
//!
//! The guest never sees an error from its output: dropping is the limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::AsyncStdoutStream;

/// The longest line logged as one event; longer ones are split.
const MAX_LINE: usize = 16 * 1024;

/// Where one app's instances log; cheap to clone, one per app.
#[derive(Debug, Clone)]
pub struct GuestLog {
    app: Arc<str>,
    /// Instances started by this process (a request number per worker).
    instances: Arc<AtomicU64>,
    limit: u64,
}

impl GuestLog {
    /// The log of `app`'s guests, `limit` bytes per instance
    /// (`limits.stdout`).
    pub fn new(app: &str, limit: u64) -> GuestLog {
        GuestLog {
            app: app.into(),
            instances: Arc::default(),
            limit,
        }
    }

    /// The stdout and stderr of one new instance.
    pub(crate) fn streams(&self) -> (AsyncStdoutStream, AsyncStdoutStream) {
        let tag = Arc::new(Tag {
            app: self.app.clone(),
            worker: rustix::process::getpid().as_raw_nonzero().get(),
            request: self.instances.fetch_add(1, Ordering::Relaxed) + 1,
            left: AtomicU64::new(self.limit),
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
        let left = self.tag.left.load(Ordering::Relaxed);
        if left == 0 {
            return;
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.tag.left.fetch_sub(take as u64, Ordering::Relaxed);
        for &byte in &buf[..take] {
            self.line.push(byte);
            if byte == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
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
        let tag = Arc::new(Tag {
            app: "a".into(),
            worker: 1,
            request: 1,
            left: AtomicU64::new(10),
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
    }
}

//! What the end-to-end tests of corrald, `corral` and the shim share:
//! a free loopback port, polling until something holds, a child's log
//! read on a thread of its own, the process tree below a pid, and the
//! folder of the guest fixtures. A dev-dependency only: nothing here is
//! part of a shipped binary.

use std::io::Read;

pub mod serve;
pub mod tar;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository's `tests/guests` folder (the built guest fixtures).
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests")
}

/// A guest fixture by file name, in [`guests_dir`].
pub fn guest(name: &str) -> PathBuf {
    guests_dir().join(name)
}

/// A loopback port nobody listens on right now, and one this test process
/// has not handed out before: the kernel may give the same free port to
/// two binds in a row once the first is closed, and a test that asked for
/// eight ports for eight apps once got one twice (a policy error, "already
/// used by app", in supervisor/tests/oci.rs).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Poll `check` until it returns `Some`, or panic after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child's output (say its stderr pipe), collected by a thread of its
/// own so the child never blocks on a full pipe.
#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// Read `pipe` to its end on a new thread.
    pub fn collect(mut pipe: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let text = log.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        log
    }

    /// What was read so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle`, or panic (showing the log)
    /// after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in the log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first complete line of `child`'s log containing `needle`, once there;
    /// panics (showing the log) if the child exits first or after
    /// `timeout`.
    pub fn wait_for_line(
        &self,
        child: &mut std::process::Child,
        needle: &str,
        timeout: Duration,
    ) -> String {
        wait_for(&format!("{needle:?} in the log"), timeout, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the process exited ({status}):\n{}", self.text());
            }
            // Complete lines only: the reader may be mid-line.
            let text = self.text();
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            complete
                .lines()
                .find(|l| l.contains(needle))
                .map(String::from)
        })
    }
}

/// Every process below `root`, from the parent pids in /proc, but a
/// zygote template (`corrald template`: one per corrald, whatever its apps
/// do; [`template_of`] finds it): what tests count is the apps' processes.
pub fn descendants_of(root: i32) -> Vec<i32> {
    all_descendants_of(root)
        .into_iter()
        .filter(|&pid| !is_template(pid))
        .collect()
}

/// Whether `pid` is a zygote template (`corrald template`; the zygotes it
/// forks say `corrald zygote`).
pub fn is_template(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(b"template"))
}

/// The zygote template below corrald `root`, if it runs.
pub fn template_of(root: i32) -> Option<i32> {
    all_descendants_of(root)
        .into_iter()
        .find(|&pid| is_template(pid) && parent_of(pid) == Some(root))
}

/// Every process below `root`, from the parent pids in /proc.
pub fn all_descendants_of(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces and parens.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue; // exited, not yet reaped
        }
        if let Some(ppid) = fields.get(1).and_then(|p| p.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Kill `child` and every process below it (SIGKILL; the tree is read
/// first, so orphans reparented by the kill are not missed) and reap it.
pub fn kill_tree(child: &mut std::process::Child) {
    let tree = all_descendants_of(child.id() as i32);
    let _ = child.kill();
    let _ = child.wait();
    for pid in tree {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The parent pid of `pid` (None: it is gone).
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// A `NOTIFY_SOCKET` for a child (`sd_notify` messages), its lines
/// collected by a thread of their own.
#[derive(Debug, Clone)]
pub struct Notes(Arc<Mutex<Vec<String>>>);

impl Notes {
    /// Bind a datagram socket at `path` (give it to the child as
    /// `NOTIFY_SOCKET`) and collect what arrives.
    pub fn bind(path: &Path) -> Notes {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        let notes = Notes(Arc::default());
        let lines = notes.0.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                lines.lock().unwrap().extend(text.lines().map(String::from));
            }
        });
        notes
    }

    /// Every line received so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The first line received starting with `prefix`, if any yet.
    pub fn find(&self, prefix: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
    }
}

/// `program` on `PATH`, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Start `cmd` with stdin and stdout on /dev/null and its stderr
/// collected into a [`Log`].
pub fn spawn_logged(cmd: &mut std::process::Command) -> (std::process::Child, Log) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::collect(child.stderr.take().unwrap());
    (child, log)
}

#!/usr/bin/env python3
"""corral's benchmark scenarios (docs/bench.md), run by tests/bench/run.

Each scenario measures corral and its peer in the same run on 127.0.0.1 and
records (figure, peer figure, ratio). Every process started here is stopped
when the script ends, however it ends: corrald gets SIGTERM (it drains and
stops its zygotes and workers), and whatever is left below it is killed.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GUESTS = os.path.join(ROOT, "tests", "guests")
OUT = os.path.join(ROOT, "target", "bench")
# The binaries measured: tests/bench/run builds them in target/release;
# CORRAL_BENCH_BIN=target/debug points at others (a quick look, not figures).
BIN = os.path.join(ROOT, os.environ.get("CORRAL_BENCH_BIN", os.path.join("target", "release")))
CORRALD = os.path.join(BIN, "corrald")
CORRAL = os.path.join(BIN, "corral")
NATIVE_HELLO = os.path.join(BIN, "examples", "native-hello")
CACHE_BENCH = os.path.join(BIN, "examples", "cache-bench")

started = []  # Popen objects, stopped at exit


def is_template(pid):
    """`corrald template` (zygotes forked from it say `corrald zygote`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[1:2] == [b"template"]
    except OSError:
        return False


def descendants(root):
    """Every process below `root`, from the parent pids in /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(p):
    if p.poll() is not None:
        return
    below = descendants(p.pid)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for pid in below + descendants(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_all():
    while started:
        stop(started.pop())


atexit.register(stop_all)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda s, f: sys.exit(128 + s))


def spawn(args, **kw):
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
    started.append(p)
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Corrald:
    """corrald on a policy of `apps`, started like supervisor/tests/daemon.rs:
    a NOTIFY_SOCKET bound here, READY=1 awaited."""

    def __init__(self, apps, cache="cache", log_filter=None, before_start=None, daemon=""):
        self.dir = tempfile.mkdtemp(prefix="corral-bench-")
        if before_start:
            before_start(self.dir)
        policy = os.path.join(self.dir, "policy.toml")
        with open(policy, "w") as f:
            f.write(f'[daemon]\ncache-dir = "{cache}"\nstate-dir = "state"\n'
                    'api-socket = "api.sock"\ndrain-timeout = "5s"\n' + daemon + '\n'
                    '[defaults]\nsandbox = { landlock = "best-effort", seccomp = "best-effort" }\n\n'
                    + apps.replace("{guests}", GUESTS))
        notify_path = os.path.join(self.dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(1)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        env["CORRAL_LOG"] = log_filter or os.environ.get("CORRAL_LOG", "warn")
        self.log = open(os.path.join(OUT, "corrald.log"), "a")
        self.log_start = self.log.tell()
        self.proc = spawn([CORRALD, "--policy", policy, "--bus", "none"], env=env,
                          stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corrald exited {self.proc.returncode}: see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError("corrald sent no READY=1 in 120s")
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
            except socket.timeout:
                pass
        notify.close()

    def processes(self):
        """corrald's processes for apps: every one below it but the zygote
        template (one per corrald, whatever the apps do)."""
        return len([p for p in descendants(self.proc.pid) if not is_template(p)])

    def template(self):
        """The zygote template's pid (it starts with corrald)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for p in descendants(self.proc.pid):
                if is_template(p):
                    return p
            time.sleep(0.01)
        raise RuntimeError("no zygote template below corrald")

    def close(self):
        stop(self.proc)
        started.remove(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- scenario 1

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port, connections, seconds, scheme="http"):
    """requests/s, p50 ms, p99 ms from `wrk --latency` (2 threads)."""
    out = subprocess.run(
        ["wrk", "--latency", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
         f"{scheme}://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout

    def lat(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * UNITS[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    return {"rps": rps, "p50_ms": lat(50), "p99_ms": lat(99),
            "errors": errors.group(0) if errors else None}


def http_get_ok(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


HELLO_APP = ('[apps.hello]\nmodule = "{{guests}}/http-hello.wasm"\nkind = "http"\n'
             'listen = ["127.0.0.1:{port}"]\n'
             'pool = {{ min = 2, max = 2, concurrency = 128 }}\n')


def wrk_all(args, port, scheme="http"):
    out = {}
    for c in args.connections:
        wrk(port, c, 2, scheme)  # warm-up
        out[c] = wrk(port, c, args.seconds, scheme)
    return out


def corral_http(args, sandbox=None):
    """Scenario 1's corrald figures; `sandbox` adds an app-level
    `sandbox = {...}` line (scenario 6)."""
    port = free_port()
    app = HELLO_APP.format(port=port)
    if sandbox:
        app += f"sandbox = {sandbox}\n"
    d = Corrald(app)
    http_get_ok(port)
    ours = wrk_all(args, port)
    d.close()
    return ours


def peer_http(args, cmd_for_port):
    port = free_port()
    peer = spawn(cmd_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    http_get_ok(port)
    theirs = wrk_all(args, port)
    stop(peer)
    started.remove(peer)
    return theirs


def http_rows(results, label, ours, theirs, peer_name):
    for c in sorted(ours):
        o, t = ours[c], theirs[c]
        results.append(row(f"{label}, {c} connections", "requests/s", o["rps"], t["rps"],
                           peer_name, higher_is_better=True, errors=[o["errors"], t["errors"]]))
        results.append(row(f"{label}, {c} connections", "p50 latency (ms)", o["p50_ms"],
                           t["p50_ms"], peer_name))
        results.append(row(f"{label}, {c} connections", "p99 latency (ms)", o["p99_ms"],
                           t["p99_ms"], peer_name))


def scenario_http(args, results):
    wasm = os.path.join(GUESTS, "http-hello.wasm")
    ours = corral_http(args)
    serve = peer_http(args, lambda port: [args.wasmtime, "serve", "-Scli", "-O",
                                          "pooling-allocator", "--addr",
                                          f"127.0.0.1:{port}", wasm])
    native = peer_http(args, lambda port: [NATIVE_HELLO, f"127.0.0.1:{port}"])
    http_rows(results, "HTTP hello", ours, serve, "wasmtime serve -Scli -O pooling-allocator")
    http_rows(results, "HTTP hello", ours, native,
              "native hyper hello (the ceiling; supervisor/examples/native-hello.rs)")


# ---------------------------------------------------------------- WASI 0.3

HELLO3_APP = ('[apps.hello3]\nmodule = "{{guests}}/http3-hello.wasm"\nkind = "http"\n'
              'listen = ["127.0.0.1:{port}"]\n'
              'pool = {{ min = 2, max = 2, concurrency = 128{reuse} }}\n')


def scenario_http3(args, results):
    """The WASI 0.3 hello handler (tests/guests/http3-hello.wasm), corrald
    against `wasmtime serve -O pooling-allocator` on the same component:
    a fresh instance per request (corral's default; wasmtime serve with
    --max-instance-reuse-count 1), then instance reuse (128 requests, 16 at
    once: wasmtime serve's default for 0.3, corral's `pool.reuse`)."""
    wasm = os.path.join(GUESTS, "http3-hello.wasm")
    modes = [
        ("fresh instance per request", "",
         ["--max-instance-reuse-count", "1", "--max-instance-concurrent-reuse-count", "1"],
         "wasmtime serve -Scli -O pooling-allocator --max-instance-reuse-count 1"),
        ("instance reuse 128/16", ", reuse = { requests = 128, concurrent = 16 }",
         ["--max-instance-reuse-count", "128", "--max-instance-concurrent-reuse-count", "16"],
         "wasmtime serve -Scli -O pooling-allocator (reuse 128/16, its default)"),
    ]
    for label, reuse, flags, peer_name in modes:
        port = free_port()
        d = Corrald(HELLO3_APP.format(port=port, reuse=reuse))
        http_get_ok(port)
        ours = wrk_all(args, port)
        d.close()
        theirs = peer_http(args, lambda port: [args.wasmtime, "serve", "-Scli", "-O",
                                               "pooling-allocator", *flags, "--addr",
                                               f"127.0.0.1:{port}", wasm])
        http_rows(results, f"HTTP hello, WASI 0.3, {label}", ours, theirs, peer_name)


# ---------------------------------------------------------------- scenario 6

def scenario_sandbox(args, results):
    """Scenario 1's corrald with the sandbox on and off, interleaved (on,
    off, on, off) so that load from elsewhere hits both alike; the better
    run of each (by requests/s) counts."""
    on, off = [], []
    for _ in range(2):
        on.append(corral_http(args))
        off.append(corral_http(args, sandbox='{ landlock = "off", seccomp = "off" }'))
    for c in args.connections:
        o = max((r[c] for r in on), key=lambda r: r["rps"])
        t = max((r[c] for r in off), key=lambda r: r["rps"])
        results.append(row(f"sandbox cost, HTTP hello, {c} connections",
                           "requests/s, landlock+seccomp on (peer: off)", o["rps"], t["rps"],
                           "the same corrald, sandbox = { landlock = \"off\", seccomp = \"off\" }; "
                           "better of 2 interleaved runs each",
                           higher_is_better=True, errors=[o["errors"], t["errors"]]))
        results.append(row(f"sandbox cost, HTTP hello, {c} connections",
                           "p99 latency (ms), on (peer: off)", o["p99_ms"], t["p99_ms"],
                           "the same corrald, sandbox off"))


# ---------------------------------------------------------------- scenario 7

NEW_CONNS_CLIENT = r"""
import socket, ssl, sys, time
port, seconds, tls = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "tls"
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.options |= ssl.OP_NO_TICKET  # a full handshake every time
request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
n = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ssl.SSLEOFError:
                chunk = b""
            if not chunk:
                break
            data += chunk
        s.close()
        if data.startswith(b"HTTP/1.1 200"):
            n += 1
        else:
            errors += 1
    except OSError:
        errors += 1
print(n, errors)
"""


def new_conns_per_s(port, seconds, clients, tls):
    """`clients` processes, each a loop of connect, (TLS handshake, no
    resumption,) one GET with `Connection: close`; answered connections
    per second."""
    return client_loops(NEW_CONNS_CLIENT, [str(port), str(seconds), "tls" if tls else "plain"],
                        seconds, clients)


def client_loops(code, argv, seconds, clients):
    """`clients` Python processes running `code` with `argv`, each printing
    "answered errors" at the end; answered per second, and errors."""
    procs = [spawn([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]
    n = errors = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        started.remove(p)
        a, b = out.split()
        n, errors = n + int(a), errors + int(b)
    return n / seconds, errors


def scenario_https(args, results):
    """Scenario 1's app with `tls` (an ECDSA P-256 certificate made here),
    wrk over https against the same corrald's plain http on a second
    address, in the same run; then new connections per second, each with
    a full TLS handshake (peer: plain TCP connections)."""
    port, plain = free_port(), free_port()
    app = HELLO_APP.format(port=port)
    d = Corrald(app + 'tls = { cert = "tls.crt", key = "tls.key" }\n'
                + HELLO_APP.format(port=plain).replace("[apps.hello]", "[apps.plain]"),
                before_start=make_certificate)
    http_get_ok(plain)
    ours = wrk_all(args, port, "https")
    theirs = wrk_all(args, plain, "http")
    new_conns_per_s(port, 1, args.clients, True)  # warm-up
    tls_conns, tls_errors = new_conns_per_s(port, args.seconds, args.clients, True)
    plain_conns, plain_errors = new_conns_per_s(plain, args.seconds, args.clients, False)
    d.close()
    http_rows(results, "HTTPS hello (TLS 1.3, ECDSA P-256)", ours, theirs,
              "the same corrald, plain http (another app, same pool)")
    results.append(row(f"new TLS connections, {args.clients} clients in a "
                       "connect-handshake-GET-close loop (python ssl, no resumption)",
                       "connections/s", tls_conns, plain_conns,
                       "the same loop over plain TCP", higher_is_better=True,
                       errors=[f"{tls_errors} failed", f"{plain_errors} failed"]
                       if tls_errors or plain_errors else None))


def make_certificate(d):
    """A self-signed ECDSA P-256 certificate for localhost in corrald's dir."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "90", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", os.path.join(d, "tls.key"), "-out", os.path.join(d, "tls.crt")],
                   check=True, capture_output=True, timeout=60)
    os.chmod(os.path.join(d, "tls.key"), 0o600)


# ---------------------------------------------------------------- scenario 2

def first_byte_ms(port):
    """Connect, send one line, time until the first byte of the echo."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"ping\n")
        b = s.recv(1)
        t1 = time.perf_counter()
        if not b:
            raise RuntimeError("connection closed before the first byte")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    return (t1 - t0) * 1e3


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def http_first_byte_ms(port, t0=None, connect_timeout=10):
    """Connect (retrying while nothing listens yet), send a GET, time until
    the first byte of the answer; from `t0` when given (a peer started on
    demand), else from the connect."""
    deadline = time.monotonic() + connect_timeout
    while True:
        start = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0002)
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        b = s.recv(1)
        t1 = time.perf_counter()
        if not b:
            raise RuntimeError("connection closed before the first byte")
        while s.recv(65536):
            pass
    return (t1 - (t0 if t0 is not None else start)) * 1e3


def wait_processes(d, n):
    """Until corrald has `n` processes below it: 0 (no zygote, no worker)
    before each cold start, 1 (the kept zygote, no worker) with
    `pool.zygote = "kept"`."""
    deadline = time.monotonic() + 15
    while d.processes() != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not return to {n} processes in 15s")
        time.sleep(0.01)


COLD_LOG = "warn,corral_supervisor::daemon=debug,corral_runtime::zygote=debug"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+)Z")


def log_ms(line):
    stamp = LOG_TIME.match(line).group(1)
    return datetime.datetime.fromisoformat(stamp).timestamp() * 1e3


def dur_ms(text):
    m = re.fullmatch(r"([\d.]+)(ns|µs|us|ms|s)", text)
    return float(m.group(1)) * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]


def cold_breakdown(d):
    """Medians over the trials of where corrald's cold start goes, from its
    debug log: from the waiting connection to the zygote's pid (a fork
    request to the template, or a spawn), from there to the zygote's start
    of preparing (its exec and start-up when exec'd; its placement in the
    cgroup and the start message either way), each phase of preparing,
    and the fork of the first worker."""
    phases = {k: [] for k in ("fork or spawn", "start-up and hand-over", "engine", "artifact",
                              "pre-instantiate", "pool and sandbox", "ready to worker forked")}
    waiting = started = None
    with open(d.log.name, encoding="utf-8", errors="replace") as f:
        f.seek(d.log_start)
        for line in f:
            if not LOG_TIME.match(line):
                continue
            if "a connection is waiting" in line:
                waiting = log_ms(line)
            elif "zygote started" in line and waiting is not None:
                started = log_ms(line)
                phases["fork or spawn"].append(started - waiting)
            elif "zygote prepared in" in line and started is not None:
                m = re.search(r"prepared in (\S+) \([^)]*\): engine (\S+), artifact (\S+), "
                              r"pre-instantiate (\S+), pool and sandbox (\S+)", line)
                total, *parts = (dur_ms(x.rstrip(",")) for x in m.groups())
                phases["start-up and hand-over"].append(log_ms(line) - started - total)
                for k, v in zip(("engine", "artifact", "pre-instantiate", "pool and sandbox"), parts):
                    phases[k].append(v)
                prepared = log_ms(line)
            elif "worker started" in line and started is not None:
                phases["ready to worker forked"].append(log_ms(line) - prepared)
                waiting = started = None
    return {k: statistics.median(v) for k, v in phases.items() if v}


def corral_cold(args, kind, kept=False, breakdown=False, template=True):
    """Cold-start trials; `template=False`: `daemon.template = false`, every
    zygote exec'd (what a cold start cost before the template)."""
    port = free_port()
    module = "stdio-echo.wasm" if kind == "stdio" else "http-hello.wasm"
    zygote = ', zygote = "kept"' if kept else ""
    d = Corrald(f'[apps.cold]\nmodule = "{{guests}}/{module}"\nkind = "{kind}"\n'
                f'listen = ["127.0.0.1:{port}"]\n'
                f'pool = {{ min = 0, max = 2, idle-timeout = "100ms"{zygote} }}\n',
                log_filter=COLD_LOG if breakdown else None,
                daemon="" if template else "template = false\n")
    if template:
        d.template()  # started with corrald, before the first trial
    probe = first_byte_ms if kind == "stdio" else http_first_byte_ms
    ours = []
    for _ in range(args.trials):
        wait_processes(d, 1 if kept else 0)
        ours.append(probe(port))
    if kept:  # what the kept zygote costs while the app is idle
        wait_processes(d, 1)
        zygote = [p for p in descendants(d.proc.pid) if not is_template(p)][0]
        args.kept_zygote_pss = kib(zygote, "Pss", "smaps_rollup") / 1024
        args.kept_zygote_rss = kib(zygote, "Rss", "smaps_rollup") / 1024
    elif template:  # what the template costs while every app is at zero
        wait_processes(d, 0)
        t = d.template()
        args.template_pss = kib(t, "Pss", "smaps_rollup") / 1024
        args.template_rss = kib(t, "Rss", "smaps_rollup") / 1024
    if breakdown:
        args.cold_breakdown[template] = cold_breakdown(d)
    d.close()
    return ours


def scenario_cold(args, results):
    # Debug logging of the daemon's module: a few lines per cold start.
    args.cold_breakdown = {}
    ours = corral_cold(args, "stdio", breakdown=True)
    exec_ours = corral_cold(args, "stdio", breakdown=True, template=False)
    cwasm = os.path.join(OUT, "stdio-echo.cwasm")
    subprocess.run([args.wasmtime, "compile", os.path.join(GUESTS, "stdio-echo.wasm"),
                    "-o", cwasm], check=True, timeout=120)
    port = free_port()
    peer = spawn(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                  args.wasmtime, "run", "--allow-precompiled", cwasm],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    theirs = [first_byte_ms(port) for _ in range(args.trials)]
    stop(peer)
    started.remove(peer)
    peer_name = "systemd-socket-activate --inetd -a wasmtime run --allow-precompiled"
    for p in (50, 99):
        results.append(row(f"cold start, stdio echo, {args.trials} trials",
                           f"connect to first byte p{p} (ms)", pct(ours, p), pct(theirs, p),
                           peer_name))
    for p in (50, 99):
        results.append(row(f"cold start, stdio echo, daemon.template = false (zygote exec'd), "
                           f"{args.trials} trials",
                           f"connect to first byte p{p} (ms)", pct(exec_ours, p), pct(theirs, p),
                           peer_name))
    for template, how in ((True, "forked from the template"), (False, "exec'd")):
        for phase, ms in args.cold_breakdown[template].items():
            results.append(row(f"cold start, stdio echo, zygote {how}: where the time goes "
                               "(median, from corrald's debug log)", f"{phase} (ms)", ms, 0, "–"))
    results.append(row("idle corrald, every app at zero (stdio echo)",
                       "PSS of the zygote template (MiB)", args.template_pss, 0,
                       f"one per corrald, whatever the number of apps (RSS "
                       f"{args.template_rss:.1f} MiB)"))
    kept = corral_cold(args, "stdio", kept=True)
    for p in (50, 99):
        results.append(row(f"cold start, stdio echo, pool.zygote = \"kept\", {args.trials} trials",
                           f"connect to first byte p{p} (ms)", pct(kept, p), pct(theirs, p),
                           peer_name))
    results.append(row("idle app with pool.zygote = \"kept\" (stdio echo)",
                       "PSS of the idle zygote (MiB)", args.kept_zygote_pss, 0,
                       f"pool.zygote = \"on-demand\": no process (zygote RSS "
                       f"{args.kept_zygote_rss:.1f} MiB)"))

    # http: corrald at zero processes against `wasmtime serve` started on
    # demand (spawned when the client wants it; the time runs from the
    # spawn, through its bind, to the first byte of the answer).
    ours = corral_cold(args, "http")
    exec_ours = corral_cold(args, "http", template=False)
    cwasm = os.path.join(OUT, "http-hello.cwasm")
    subprocess.run([args.wasmtime, "compile", os.path.join(GUESTS, "http-hello.wasm"),
                    "-o", cwasm], check=True, timeout=120)
    theirs = []
    for _ in range(args.http_cold_trials):
        port = free_port()
        t0 = time.perf_counter()
        peer = spawn([args.wasmtime, "serve", "-Scli", "--allow-precompiled", "--addr",
                      f"127.0.0.1:{port}", cwasm],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.append(http_first_byte_ms(port, t0=t0))
        stop(peer)
        started.remove(peer)
    peer_name = "wasmtime serve -Scli --allow-precompiled, started on demand"
    for p in (50, 99):
        results.append(row(f"cold start, HTTP hello, {args.trials} trials "
                           f"(peer {args.http_cold_trials})",
                           f"connect to first byte p{p} (ms)", pct(ours, p), pct(theirs, p),
                           peer_name))
    for p in (50, 99):
        results.append(row(f"cold start, HTTP hello, daemon.template = false (zygote exec'd), "
                           f"{args.trials} trials (peer {args.http_cold_trials})",
                           f"connect to first byte p{p} (ms)", pct(exec_ours, p), pct(theirs, p),
                           peer_name))


# ---------------------------------------------------------------- scenario 3

CONNS_CLIENT = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
n, errors, end = 0, 0, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"ping\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        if data == b"ping\n":
            n += 1
        else:
            errors += 1
    except OSError:
        errors += 1
print(n, errors)
"""


def conns_per_s(port, seconds, clients):
    """`clients` processes, each a loop of connect, send, read the echo to
    EOF, close; connections per second that got the whole echo."""
    return client_loops(CONNS_CLIENT, [str(port), str(seconds)], seconds, clients)


def scenario_stdio(args, results):
    port = free_port()
    d = Corrald(f'[apps.echo]\nmodule = "{{guests}}/stdio-echo.wasm"\nkind = "stdio"\n'
                f'listen = ["127.0.0.1:{port}"]\n'
                'pool = { min = 2, max = 2, concurrency = 16 }\n')
    first_byte_ms(port)
    conns_per_s(port, 1, args.clients)  # warm-up
    ours, our_errors = conns_per_s(port, args.seconds, args.clients)
    d.close()
    cwasm = os.path.join(OUT, "stdio-echo.cwasm")
    subprocess.run([args.wasmtime, "compile", os.path.join(GUESTS, "stdio-echo.wasm"),
                    "-o", cwasm], check=True, timeout=120)
    port = free_port()
    peer = spawn(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                  args.wasmtime, "run", "--allow-precompiled", cwasm],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    first_byte_ms(port)
    theirs, their_errors = conns_per_s(port, args.seconds, args.clients)
    stop(peer)
    started.remove(peer)
    results.append(row(f"stdio echo, {args.clients} clients in a connect-echo-close loop",
                       "connections/s", ours, theirs,
                       "systemd-socket-activate --inetd -a wasmtime run --allow-precompiled",
                       higher_is_better=True,
                       errors=[f"{our_errors} failed", f"{their_errors} failed"]
                       if our_errors or their_errors else None))


# ---------------------------------------------------------------- scenario 4

def scenario_cache(args, results):
    """In-process (supervisor/examples/cache-bench.rs): `Cache::load_or_compile`
    into an empty cache against the same call on a hit, the call corrald
    makes per app; plus the whole `corral compile` process on a hit."""
    out = subprocess.run([CACHE_BENCH, "--small", os.path.join(GUESTS, "stdio-echo.wasm"),
                          "--compiles", str(args.compiles)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    for m in json.loads(out)["modules"]:
        label = (f"artifact cache, {m['name']} ({size(m['module_bytes'])} module, "
                 f"{size(m['artifact_bytes'])} artifact)")
        results.append(row(label, f"cache hit, in process, median of {m['hits']} (ms)",
                           m["hit_ms"], m["compile_ms"],
                           f"compile into an empty cache, median of {m['compiles']}"))
    for name in ("stdio-echo.wasm", "http-hello.wasm"):
        cold, warm = [], []
        for _ in range(3):
            cache = tempfile.mkdtemp(prefix="corral-bench-cache-")
            cmd = [CORRAL, "compile", os.path.join(GUESTS, name), "--cache", cache]
            cold.append(timed(cmd))
            warm.append(timed(cmd))
            shutil.rmtree(cache)
        results.append(row(f"artifact cache, {name} ({size(os.path.getsize(os.path.join(GUESTS, name)))}), "
                           "whole process",
                           "`corral compile`, cache hit, median of 3 (ms)",
                           statistics.median(warm), statistics.median(cold),
                           "`corral compile`, cold cache"))


def size(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------- scenario 5

def kib(pid, field, path="status"):
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/{path}")


def many_apps(n, sockdir, pool):
    apps = []
    for i in range(n):
        kind, module = (("stdio", "stdio-echo.wasm") if i % 2 == 0
                        else ("http", "http-hello.wasm"))
        apps.append(f'[apps.a{i}]\nmodule = "{{guests}}/{module}"\nkind = "{kind}"\n'
                    f'listen = ["unix:{sockdir}/a{i}.sock"]\npool = {pool}\n')
    return "\n".join(apps)


def scenario_density(args, results):
    sockdir = tempfile.mkdtemp(prefix="corral-bench-sock-")
    n = args.apps
    policy = many_apps(n, sockdir, "{ min = 0 }")
    cache = tempfile.mkdtemp(prefix="corral-bench-cache-")
    Corrald(policy, cache=cache).close()  # fills the cache
    for p in os.listdir(sockdir):
        os.unlink(os.path.join(sockdir, p))
    t0 = time.perf_counter()
    d = Corrald(policy, cache=cache)
    startup = (time.perf_counter() - t0) * 1e3
    time.sleep(1)
    rss = kib(d.proc.pid, "VmRSS") / 1024
    pss = kib(d.proc.pid, "Pss", "smaps_rollup") / 1024
    template_pss = kib(d.template(), "Pss", "smaps_rollup") / 1024
    d.close()
    results.append(row(f"density, {n} apps at min = 0 (half stdio, half http), warm cache",
                       "corrald start to READY=1 (ms)", startup, 2000, "goal: 2 s"))
    results.append(row(f"density, {n} apps at min = 0", "corrald RSS after READY=1 (MiB)",
                       rss, 64, f"goal: 64 MiB (corrald PSS {pss:.1f} MiB; its zygote "
                                 f"template's PSS {template_pss:.1f} MiB)"))
    for p in os.listdir(sockdir):
        os.unlink(os.path.join(sockdir, p))

    m = args.idle_apps
    d = Corrald(many_apps(m, sockdir, "{ min = 1, max = 1 }"), cache=cache)
    deadline = time.monotonic() + 120
    while True:
        zygotes = [c for c in descendants(d.proc.pid)
                   if ppid(c) == d.proc.pid and not is_template(c)]
        workers = [c for c in descendants(d.proc.pid) if ppid(c) in zygotes]
        if len(workers) >= m:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(workers)} of {m} workers after 120 s")
        time.sleep(0.2)
    time.sleep(1)
    worker_pss = [kib(w, "Pss", "smaps_rollup") for w in workers]
    zygote_pss = [kib(z, "Pss", "smaps_rollup") for z in zygotes]
    worker_rss = [kib(w, "Rss", "smaps_rollup") for w in workers]
    d.close()
    shutil.rmtree(sockdir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    results.append(row(f"density, {m} apps with one idle worker each",
                       "PSS per idle worker, mean (MiB)", statistics.mean(worker_pss) / 1024, 4,
                       f"goal: 4 MiB (RSS {statistics.mean(worker_rss) / 1024:.1f} MiB; "
                       f"its zygote's PSS {statistics.mean(zygote_pss) / 1024:.1f} MiB)"))


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


# ---------------------------------------------------------------- report

def row(scenario, metric, ours, peer, peer_name, higher_is_better=False, errors=None):
    ratio = ours / peer if peer else None
    r = {"scenario": scenario, "metric": metric, "corral": round(ours, 3),
         "peer": round(peer, 3), "peer_name": peer_name,
         "ratio": (None if ratio is None else round(ratio, 3) if ratio >= 0.1
                   else float(f"{ratio:.3g}")),
         "higher_is_better": higher_is_better}
    if errors and any(errors):
        r["errors"] = errors
    return r


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg()}


def write_report(meta, results):
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    m = meta["machine"]
    lines = [f"corral benchmarks, {meta['date']}, {m['nproc']} CPUs ({m['cpu']}), "
             f"Linux {m['kernel']}, load average at start {m['loadavg_at_start'][0]:.2f}",
             "",
             "| scenario | metric | corral | peer | corral / peer | peer | load |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        load = f"{r['load_start']:.1f}→{r['load_end']:.1f}" if "load_end" in r else ""
        ratio = ("–" if r["ratio"] is None else f"{r['ratio']:.2f}" if r["ratio"] >= 0.1
                 else f"{r['ratio']:.2g}")
        lines.append(f"| {r['scenario']} | {r['metric']} | {r['corral']:.2f} | {r['peer']:.2f} | "
                     f"{ratio} | {r['peer_name']} | {load} |")
        if r.get("errors"):
            lines.append(f"| | errors (corral, peer) | {r['errors'][0]} | {r['errors'][1]} | | | |")
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


SCENARIOS = {"http": scenario_http, "http3": scenario_http3, "sandbox": scenario_sandbox,
             "https": scenario_https, "cold": scenario_cold, "stdio": scenario_stdio,
             "cache": scenario_cache, "density": scenario_density}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasmtime", required=True)
    ap.add_argument("--trials", type=int, default=200, help="cold-start trials")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--http-cold-trials", type=int, default=100,
                    help="trials of `wasmtime serve` started on demand")
    ap.add_argument("--clients", type=int, default=4, help="stdio echo client processes")
    ap.add_argument("--compiles", type=int, default=3, help="compiles of the large module")
    ap.add_argument("--apps", type=int, default=1000, help="apps at min = 0 (density)")
    ap.add_argument("--idle-apps", type=int, default=100, help="apps with an idle worker")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "wasmtime": subprocess.run(
                [args.wasmtime, "--version"], capture_output=True, text=True).stdout.strip()}
    results = []
    for name in args.only:
        print(f"== {name}", file=sys.stderr, flush=True)
        before, load_start = len(results), os.getloadavg()[0]
        SCENARIOS[name](args, results)
        load_end = os.getloadavg()[0]
        for r in results[before:]:
            r["load_start"], r["load_end"] = round(load_start, 2), round(load_end, 2)
        write_report(meta, results)  # partial results survive a later failure


if __name__ == "__main__":
    main()

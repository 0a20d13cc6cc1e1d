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
CORRALD = os.path.join(ROOT, "target", "release", "corrald")
CORRAL = os.path.join(ROOT, "target", "release", "corral")

started = []  # Popen objects, stopped at exit


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

    def __init__(self, apps):
        self.dir = tempfile.mkdtemp(prefix="corral-bench-")
        policy = os.path.join(self.dir, "policy.toml")
        with open(policy, "w") as f:
            f.write('[daemon]\ncache-dir = "cache"\nstate-dir = "state"\n'
                    'api-socket = "api.sock"\ndrain-timeout = "5s"\n\n'
                    '[defaults]\nsandbox = { landlock = "best-effort", seccomp = "best-effort" }\n\n'
                    + apps.replace("{guests}", GUESTS))
        notify_path = os.path.join(self.dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(1)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, CORRAL_LOG="warn")
        self.log = open(os.path.join(OUT, "corrald.log"), "a")
        self.proc = spawn([CORRALD, "--policy", policy], env=env,
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
        return len(descendants(self.proc.pid))

    def close(self):
        stop(self.proc)
        started.remove(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- scenario 1

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port, connections, seconds):
    """requests/s, p50 ms, p99 ms from `wrk --latency` (2 threads)."""
    out = subprocess.run(
        ["wrk", "--latency", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
         f"http://127.0.0.1:{port}/"],
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


def scenario_http(args, results):
    wasm = os.path.join(GUESTS, "http-hello.wasm")
    port = free_port()
    d = Corrald(f'[apps.hello]\nmodule = "{{guests}}/http-hello.wasm"\nkind = "http"\n'
                f'listen = ["127.0.0.1:{port}"]\n'
                'pool = { min = 2, max = 2, concurrency = 128 }\n')
    http_get_ok(port)
    ours = {}
    for c in args.connections:
        wrk(port, c, 2)  # warm-up
        ours[c] = wrk(port, c, args.seconds)
    d.close()

    port = free_port()
    peer = spawn([args.wasmtime, "serve", "-Scli", "--addr", f"127.0.0.1:{port}", wasm],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    http_get_ok(port)
    theirs = {}
    for c in args.connections:
        wrk(port, c, 2)
        theirs[c] = wrk(port, c, args.seconds)
    stop(peer)
    started.remove(peer)

    for c in args.connections:
        o, t = ours[c], theirs[c]
        peer_name = "wasmtime serve -Scli"
        results.append(row(f"HTTP hello, {c} connections", "requests/s", o["rps"], t["rps"],
                           peer_name, higher_is_better=True, errors=[o["errors"], t["errors"]]))
        results.append(row(f"HTTP hello, {c} connections", "p50 latency (ms)", o["p50_ms"],
                           t["p50_ms"], peer_name))
        results.append(row(f"HTTP hello, {c} connections", "p99 latency (ms)", o["p99_ms"],
                           t["p99_ms"], peer_name))


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


def scenario_cold(args, results):
    port = free_port()
    d = Corrald(f'[apps.echo]\nmodule = "{{guests}}/stdio-echo.wasm"\nkind = "stdio"\n'
                f'listen = ["127.0.0.1:{port}"]\n'
                'pool = { min = 0, max = 2, idle-timeout = "200ms" }\n')
    ours = []
    for _ in range(args.trials):
        deadline = time.monotonic() + 15
        while d.processes() != 0:  # zero workers and no zygote before each trial
            if time.monotonic() > deadline:
                raise RuntimeError("echo did not return to zero processes in 15s")
            time.sleep(0.02)
        ours.append(first_byte_ms(port))
    d.close()

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


# ---------------------------------------------------------------- scenario 4

def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1e3


def scenario_cache(args, results):
    for name in ("stdio-echo.wasm", "http-hello.wasm"):
        cold, warm = [], []
        for _ in range(5):
            cache = tempfile.mkdtemp(prefix="corral-bench-cache-")
            cmd = [CORRAL, "compile", os.path.join(GUESTS, name), "--cache", cache]
            cold.append(timed(cmd))
            warm.append(timed(cmd))
            shutil.rmtree(cache)
        size = os.path.getsize(os.path.join(GUESTS, name))
        results.append(row(f"artifact cache, {name} ({size // 1024 or size} {'KiB' if size >= 1024 else 'B'})",
                           "`corral compile`, cache hit, median of 5 (ms)",
                           statistics.median(warm), statistics.median(cold),
                           "`corral compile`, cold cache"))


# ---------------------------------------------------------------- report

def row(scenario, metric, ours, peer, peer_name, higher_is_better=False, errors=None):
    ratio = ours / peer if peer else None
    r = {"scenario": scenario, "metric": metric, "corral": round(ours, 3),
         "peer": round(peer, 3), "peer_name": peer_name,
         "ratio": round(ratio, 3) if ratio is not None else None,
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
             "| scenario | metric | corral | peer | corral / peer | peer |",
             "|---|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['metric']} | {r['corral']:.2f} | {r['peer']:.2f} | "
                     f"{r['ratio']:.2f} | {r['peer_name']} |")
        if r.get("errors"):
            lines.append(f"| | errors (corral, peer) | {r['errors'][0]} | {r['errors'][1]} | | |")
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


SCENARIOS = {"http": scenario_http, "cold": scenario_cold, "cache": scenario_cache}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasmtime", required=True)
    ap.add_argument("--trials", type=int, default=200, help="cold-start trials")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "wasmtime": subprocess.run(
                [args.wasmtime, "--version"], capture_output=True, text=True).stdout.strip()}
    results = []
    for name in args.only:
        print(f"== {name}", file=sys.stderr, flush=True)
        SCENARIOS[name](args, results)
        write_report(meta, results)  # partial results survive a later failure


if __name__ == "__main__":
    main()

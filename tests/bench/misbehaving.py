#!/usr/bin/env python3
"""Issue 15's serving findings as numbers, before and after a fix.

    tests/bench/misbehaving.py [--corrald target/debug/corrald] [--only NAME...]

Scenarios (each starts its own corrald on 127.0.0.1 and stops it):
  silent   100 silent connections (nothing, 1 byte, an h2c preface) held open
           against an app with pool max = 4, concurrency = 16; then 200
           requests from 8 other clients (2 s timeout each): how many are
           answered.
  reload   16 keep-alive clients that do not pipeline loop on their
           connections through 5 reloads that change the module: failed
           requests.
  spinner  one worker (pool max = 1); a request spins until limits.timeout
           (3 s); good requests on one keep-alive connection meanwhile: their
           latency (p50, max).
  flood    one stdio connection to a guest writing stderr in a loop for 4 s
           (limits.stdout default 1 MiB): bytes added to corrald's log.

The supervisor tests (supervisor/tests/serving.rs) check the same behaviours
without timing; this script gives the figures for docs and issue notes.
"""

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GUESTS = os.path.join(ROOT, "tests", "guests")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Corrald:
    """corrald on a policy of `apps`, its stderr in a file; stopped on exit."""

    def __init__(self, corrald, apps):
        self.dir = tempfile.TemporaryDirectory()
        root = self.dir.name
        self.policy = os.path.join(root, "policy.toml")
        with open(self.policy, "w") as f:
            f.write(
                '[daemon]\ncache-dir = "cache"\nstate-dir = "state"\napi-socket = "api.sock"\n'
                'drain-timeout = "10s"\n\n'
                '[defaults]\nsandbox = { landlock = "best-effort", seccomp = "best-effort" }\n\n'
                + apps.replace("{guests}", GUESTS)
            )
        self.log_path = os.path.join(root, "corrald.log")
        self.log = open(self.log_path, "wb")
        notify = os.path.join(root, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify)
        self.notify.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=notify, CORRAL_LOG="info")
        self.proc = subprocess.Popen(
            [corrald, "--policy", self.policy],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log, env=env,
        )
        self.wait_ready()

    def wait_ready(self):
        while True:
            data = self.notify.recv(65536).decode(errors="replace")
            if any(line == "READY=1" for line in data.splitlines()):
                return

    def reload(self, old, new):
        with open(self.policy) as f:
            text = f.read()
        with open(self.policy, "w") as f:
            f.write(text.replace(old, new))
        self.proc.send_signal(signal.SIGHUP)
        self.wait_ready()

    def log_bytes(self):
        self.log.flush()
        return os.path.getsize(self.log_path)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.dir.cleanup()


def http_app(name, port, module, extra):
    return (f'[apps.{name}]\nmodule = "{{guests}}/{module}"\nkind = "http"\n'
            f'listen = ["127.0.0.1:{port}"]\n{extra}\n\n')


def get(port, path="/", timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def silent(corrald):
    port = free_port()
    d = Corrald(corrald, http_app("web", port, "http-hello.wasm",
                                  "pool = { min = 1, max = 4, concurrency = 16 }"))
    try:
        held = []
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 3 == 1:
                s.sendall(b"G")
            elif i % 3 == 2:
                s.sendall(H2_PREFACE)
            held.append(s)
        time.sleep(0.5)
        answered = [0]
        lock = threading.Lock()

        def client():
            for _ in range(25):
                try:
                    ok = get(port, timeout=2.0) == 200
                except OSError:
                    ok = False
                if ok:
                    with lock:
                        answered[0] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in held:
            s.close()
        return f"{answered[0]} of 200 requests answered beside 100 silent connections"
    finally:
        d.stop()


def reload(corrald):
    port = free_port()
    d = Corrald(corrald, http_app("web", port, "http-hello.wasm", "pool = { min = 1, max = 2 }"))
    stop = threading.Event()
    results = []
    lock = threading.Lock()

    def client():
        ok = failed = 0
        conn = None
        while not stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = None
        with lock:
            results.append((ok, failed))

    try:
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        a, b = "http-hello.wasm", "http-echo.wasm"
        for _ in range(5):
            d.reload(a, b)
            a, b = b, a
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        ok = sum(r[0] for r in results)
        failed = sum(r[1] for r in results)
        return f"{failed} failed of {ok + failed} requests over 5 reloads ({failed / 5:.1f} per reload)"
    finally:
        stop.set()
        d.stop()


def spinner(corrald):
    port = free_port()
    d = Corrald(corrald, http_app("web", port, "http-echo.wasm",
                                  'pool = { min = 1, max = 1 }\nlimits = { timeout = "3s" }'))
    try:
        get(port)
        spin = threading.Thread(target=lambda: get(port, "/spin", timeout=30))
        spin.start()
        time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        took = []
        while spin.is_alive() and len(took) < 1000:
            t0 = time.monotonic()
            conn.request("GET", "/good")
            r = conn.getresponse()
            r.read()
            if spin.is_alive():
                took.append(time.monotonic() - t0)
        spin.join()
        if not took:
            return "no good request was answered while the spinner ran"
        return (f"{len(took)} good requests while the spinner ran: "
                f"p50 {statistics.median(took) * 1000:.1f} ms, max {max(took) * 1000:.1f} ms")
    finally:
        d.stop()


def flood(corrald):
    port = free_port()
    d = Corrald(corrald, f'[apps.flood]\nmodule = "{{guests}}/stderr-flood.wasm"\nkind = "stdio"\n'
                f'listen = ["127.0.0.1:{port}"]\npool = {{ min = 1, max = 1 }}\n'
                'limits = { timeout = "4s" }\n\n')
    try:
        before = d.log_bytes()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(30)
            while s.recv(65536):
                pass
        time.sleep(0.5)
        grown = d.log_bytes() - before
        return f"{grown / 1e6:.2f} MB added to corrald's log by 4 s of a stderr flood"
    finally:
        d.stop()


SCENARIOS = {"silent": silent, "reload": reload, "spinner": spinner, "flood": flood}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corrald", default=os.path.join(ROOT, "target", "debug", "corrald"))
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    args = ap.parse_args()
    for name in args.only or SCENARIOS:
        print(f"{name}: {SCENARIOS[name](args.corrald)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

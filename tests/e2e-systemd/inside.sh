#!/bin/bash
# The checks of tests/e2e-systemd/run, inside the booted Debian 12 container
# (systemd is PID 1 here). Started by corral-e2e.service once the system is
# up; writes its exit code to /root/e2e.rc and powers the container off.
# tests/e2e-vm/run runs the same script in a VM, with:
#   E2E_MORE_CHECKS=FILE  a script sourced after these checks (it uses
#                         ok/fail/check/info/show), for what differs there
#   E2E_POWEROFF=no       return instead of powering off (the caller does)
#
# Every check prints "e2e: ok ..." or "e2e: FAIL ..."; a failed check does
# not stop the others. Output goes to the console, which the host logs.
set -uo pipefail

failures=0
ok() { echo "e2e: ok   $*"; }
fail() { echo "e2e: FAIL $*"; failures=$((failures + 1)); }
info() { echo "e2e: ..   $*"; }
show() { sed 's/^/e2e: ..   /'; }   # diagnostic output, indented under its check
check() { # DESCRIPTION COMMAND...: ok when the command succeeds
    local what="$1"; shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
finish() {
    echo "$failures" >/root/e2e.rc
    if [ "${E2E_POWEROFF:-yes}" = no ]; then
        info "$failures failed check(s)"
    else
        info "$failures failed check(s); powering off"
        systemctl poweroff --no-block
    fi
    exit 0
}
trap finish EXIT

t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

http_get() { # URL: the body, or nothing and a non-zero status
    curl -fsS --max-time 30 "$1"
}
echo_roundtrip() { # PORT: send a line to the stdio echo app, expect it back
    timeout 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; printf 'ping-corral\n' >&3; read -r line <&3; [ \"\$line\" = ping-corral ]"
}
http_ok() { http_get "$1" >/dev/null; }
main_pid() { systemctl show -P MainPID corrald.service; }
active() { [ "$(systemctl is-active "$1")" = active ]; }

info "systemd $(systemctl --version | head -n1 | cut -d' ' -f2), kernel $(uname -r), state $(systemctl is-system-running)"

# --- Install, as an operator would.
if DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/corral.deb >/root/install.log 2>&1; then
    ok "apt-get install ./corral.deb"
else
    fail "apt-get install ./corral.deb"; show </root/install.log; exit 1
fi
check "user corral exists (sysusers.d)" getent passwd corral
check "group corral exists" getent group corral
check "corrald.socket enabled and listening" active corrald.socket
check "API socket is root:corral 0660" \
    test "$(stat -c '%U:%G %a' /run/corral/api.sock)" = "root:corral 660"
check "corrald not started by the install" test "$(systemctl is-active corrald.service)" = inactive

# --- The example: two apps on systemd-held sockets, from the generator.
cp /usr/share/doc/corral/examples/* /etc/corral/
systemctl daemon-reload
check "generator wrote corral-hello.socket" test -f /run/systemd/generator/corral-hello.socket
check "generator enabled it in sockets.target" test -L /run/systemd/generator/sockets.target.wants/corral-hello.socket
systemctl start sockets.target
check "corral-hello.socket and corral-echo.socket listen" active corral-hello.socket
check "corral-echo.socket listens" active corral-echo.socket

# systemd-analyze verify: no warning at all for our units (stderr empty).
verify_err=$(cd /tmp && systemd-analyze verify corrald.service corrald.socket \
    /run/systemd/generator/corral-hello.socket /run/systemd/generator/corral-echo.socket 2>&1 >/dev/null)
if [ -z "$verify_err" ]; then ok "systemd-analyze verify: no warnings"; else fail "systemd-analyze verify:"; echo "$verify_err" | show; fi

# --- Socket activation: corrald is not running until the first connection,
# and that connection is served.
check "corrald not running before the first connection" test "$(systemctl is-active corrald.service)" = inactive
body=$(http_get http://127.0.0.1:8080/)
if [ -n "$body" ]; then ok "first connection to hello served: $(printf '%s' "$body" | head -c 60)"; else fail "first connection to hello served"; fi
check "corrald started by that connection" active corrald.service
check "echo app served through its socket" echo_roundtrip 8081
status_line=$(systemctl show -P StatusText corrald.service)
info "corrald STATUS=: $status_line"

# corrald runs as corral, under the unit's sandbox, and its workers are
# sandboxed too (the journal says which layers).
check "corrald runs as user corral" test "$(stat -c %U /proc/"$(main_pid)")" = corral
journalctl -u corrald.service --no-pager -o cat | grep -i -m3 -E 'sandbox|landlock|seccomp' | sed 's/^/e2e: ..   journal: /'
if journalctl -u corrald.service --no-pager -o cat | grep -q -i -E 'SIGSYS|killed by the seccomp|Operation not permitted'; then
    fail "no seccomp kills or EPERM in corrald's journal"
    journalctl -u corrald.service --no-pager -o cat | grep -i -E 'SIGSYS|seccomp|not permitted' | head -n 5 | show
else
    ok "no seccomp kills or EPERM in corrald's journal"
fi

# --- D-Bus: read-only calls for everyone, mutating ones for root and
# group corral only.
bus=(org.corral.Manager1 /org/corral/Manager1 org.corral.Manager1)
if [ -f /usr/share/dbus-1/system.d/org.corral.Manager1.conf ]; then
    ok "D-Bus system-bus policy installed"
else
    fail "D-Bus system-bus policy installed (units/dbus/org.corral.Manager1.conf, issue 7)"
fi
check "busctl ListApps as root" busctl call --timeout=30 "${bus[@]}" ListApps
check "busctl RestartApp as root" busctl call --timeout=30 "${bus[@]}" RestartApp s hello
check "busctl ListApps as nobody (read-only: allowed)" \
    setpriv --reuid=nobody --regid=nogroup --clear-groups busctl call --timeout=30 "${bus[@]}" ListApps
denied=$(setpriv --reuid=nobody --regid=nogroup --clear-groups busctl call --timeout=30 "${bus[@]}" RestartApp s hello 2>&1)
denied_rc=$?
if [ "$denied_rc" -ne 0 ] && printf '%s' "$denied" | grep -q -i -E 'denied|not allowed|permission'; then
    ok "busctl RestartApp as nobody is denied: $denied"
else
    fail "busctl RestartApp as nobody is denied (rc $denied_rc: $denied)"
fi
check "hello still served after the D-Bus calls" http_ok http://127.0.0.1:8080/

# --- systemctl reload applies a changed policy: a new app that corrald
# binds itself.
cp /etc/corral/policy.toml /root/policy.good
cat >>/etc/corral/policy.toml <<'EOF'

[apps.hello2]
module = "hello.wasm"
kind = "http"
listen = ["127.0.0.1:8090"]
EOF
pid_before=$(main_pid)
check "systemctl reload corrald" systemctl reload corrald.service
served=no
# Polled until served (refused until corrald binds the port), for at most
# 30 s in all: an app that accepts and never answers must not hold the
# test for 100 curl timeouts.
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -fsS --max-time 5 http://127.0.0.1:8090/ >/dev/null 2>&1; then served=yes; break; fi
    sleep 0.1
done
check "the reloaded policy's new app is served" test "$served" = yes
check "reload kept the same corrald process" test "$(main_pid)" = "$pid_before"

# --- A broken policy: the old one keeps serving, and `systemctl status`
# shows why.
printf '\n[apps.broken]\nmodule = "hello.wasm"\nkind = "http"\nlisten = ["127.0.0.1:8091"]\npool = { maxx = 2 }\n' >>/etc/corral/policy.toml
systemctl reload corrald.service
# `systemctl reload` returns once kill(1) has signalled corrald; give it
# time to read the policy and log.
for _ in $(seq 1 100); do
    status=$(systemctl status --no-pager --lines=20 corrald.service 2>&1)
    printf '%s' "$status" | grep -q 'apps.broken.pool.maxx' && break
    sleep 0.1
done
check "after a broken reload hello is still served" http_ok http://127.0.0.1:8080/
check "after a broken reload hello2 is still served" http_ok http://127.0.0.1:8090/
if printf '%s' "$status" | grep -q 'apps.broken.pool.maxx'; then
    ok "systemctl status corrald shows the error"
    printf '%s\n' "$status" | grep 'maxx' | head -n 2 | sed 's/^/e2e: ..   /'
else
    fail "systemctl status corrald shows the error"; printf '%s\n' "$status" | show
fi
check "corrald still active after the broken reload" active corrald.service
cp /root/policy.good /etc/corral/policy.toml
systemctl reload corrald.service

# --- kill -9: systemd restarts corrald; a client connecting meanwhile is
# served, since systemd holds the socket.
pid_before=$(main_pid)
restarts_before=$(systemctl show -P NRestarts corrald.service)
old_pids=$(pgrep -u corral | tr '\n' ' ')
kill -9 "$pid_before"
killed_at=$(date +%s.%N)
# Connect once every old process (corrald, zygotes, workers) is gone, so
# only systemd's socket can take the connection.
for _ in $(seq 1 500); do
    alive=no
    for p in $old_pids; do kill -0 "$p" 2>/dev/null && alive=yes; done
    [ "$alive" = no ] && break
    sleep 0.01
done
state=$(systemctl show -P ActiveState corrald.service)
if [ "$alive" = no ] && body=$(http_get http://127.0.0.1:8080/); then
    ok "a client connecting after kill -9, with no corral process left (corrald $state), is served after $(elapsed "$killed_at") s"
else
    fail "a client connecting after kill -9 is served (old processes gone: $([ "$alive" = no ] && echo yes || echo no), corrald $state)"
fi
check "the echo app too" echo_roundtrip 8081
for _ in $(seq 1 100); do active corrald.service && break; sleep 0.1; done
check "systemd restarted corrald (NRestarts went up)" \
    test "$(systemctl show -P NRestarts corrald.service)" -gt "$restarts_before"
check "with a new process" test "$(main_pid)" != "$pid_before"

# --- D-Bus activation: a call to org.corral.Manager1 starts a stopped corrald.
systemctl stop corrald.service
check "corrald stopped" test "$(systemctl is-active corrald.service)" = inactive
check "busctl ListApps starts corrald by bus activation" busctl call --timeout=60 "${bus[@]}" ListApps
# The name is on the bus a moment before READY=1 reaches systemd.
for _ in $(seq 1 100); do active corrald.service && break; sleep 0.1; done
check "corrald active after bus activation" active corrald.service

# --- A new app with a new socket on a running system (docs/policy.md):
# daemon-reload runs the generator; with corrald stopped (systemd starts no
# socket of a running service), sockets.target starts the socket, and
# corrald gets it when it starts.
printf '\n[sockets.late]\nlisten = "127.0.0.1:8095"\n\n[apps.late]\nmodule = "hello.wasm"\nkind = "http"\nlisten = ["systemd:late"]\n' >>/etc/corral/policy.toml
systemctl daemon-reload
systemctl stop corrald.service
systemctl start sockets.target
check "daemon-reload, stop corrald, start sockets.target: corral-late.socket listens" active corral-late.socket
check "the new app is served on its socket (its connection starts corrald)" http_ok http://127.0.0.1:8095/
check "and the old ones still" http_ok http://127.0.0.1:8080/

# --- The exposure score recorded in the README.
expected=$(cat /root/expected-exposure)
score=$(systemd-analyze security --no-pager corrald.service 2>/dev/null | sed -n 's/.*Overall exposure level for corrald.service: \([0-9.]*\).*/\1/p')
if [ "$score" = "$expected" ]; then
    ok "systemd-analyze security corrald.service: $score (recorded: $expected)"
else
    fail "systemd-analyze security corrald.service: $score, recorded $expected"
fi

# --- Upgrade: reinstalling runs `corral compile --policy` before the restart.
if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall /root/corral.deb >/root/upgrade.log 2>&1 &&
    grep -q 'corral compile --policy /etc/corral/policy.toml' /root/upgrade.log; then
    ok "reinstall (upgrade path) rebuilt the artifacts"
    grep -E 'corral compile|^(cached|compiled) ' /root/upgrade.log | cut -c1-100 | head -n 4 | sed 's/^/e2e: ..   /'
else
    fail "reinstall (upgrade path) rebuilt the artifacts"; show </root/upgrade.log
fi
check "corrald running again after the upgrade (it was before)" active corrald.service
check "hello served after the upgrade" http_ok http://127.0.0.1:8080/

# --- Hundreds of apps under systemd (issue 15): every notify message stays
# under the 4,096 bytes at which systemd drops it, so READY=1 arrives and the
# service becomes active; then the README's density figure: 1,000 apps at
# min = 0 (half http, half stdio), warm cache, `systemctl start` to READY=1.
many_apps() { # N: a policy of N apps at min = 0 on 127.0.0.1:20000+i
    printf '[daemon]\n\n'
    for i in $(seq 0 $(($1 - 1))); do
        if [ $((i % 2)) = 0 ]; then
            printf '[apps.app-with-a-long-name-%04d]\nmodule = "hello.wasm"\nkind = "http"\n' "$i"
        else
            printf '[apps.app-with-a-long-name-%04d]\nmodule = "echo.wat"\nkind = "stdio"\n' "$i"
        fi
        printf 'listen = ["127.0.0.1:%d"]\npool = { min = 0, max = 1 }\n\n' $((20000 + i))
    done
}
cp /etc/corral/policy.toml /root/policy.example
systemctl stop corrald.service
many_apps 500 >/etc/corral/policy.toml
since=$(date '+%Y-%m-%d %H:%M:%S')
started_at=$(date +%s.%N)
if timeout 120 systemctl start corrald.service && active corrald.service; then
    ok "500 apps: corrald became active (READY=1 reached systemd) in $(elapsed "$started_at") s"
else
    fail "500 apps: corrald became active (READY=1 reached systemd)"
    systemctl status --no-pager --lines=5 corrald.service 2>&1 | show
fi
check "500 apps: STATUS= reached systemd" \
    bash -c 'systemctl show -P StatusText corrald.service | grep -q "^500 apps"'
info "500 apps: STATUS=$(systemctl show -P StatusText corrald.service | cut -c1-200)"
if journalctl --since "$since" --no-pager -o cat | grep -q 'exceeded maximum size'; then
    fail "500 apps: systemd dropped no notify message"
    journalctl --since "$since" --no-pager -o cat | grep 'exceeded maximum size' | head -n 3 | show
else
    ok "500 apps: systemd dropped no notify message"
fi
systemctl stop corrald.service
many_apps 1000 >/etc/corral/policy.toml
# The cache is warm (the 500 apps used the same two modules); 3 runs.
for run in 1 2 3; do
    systemctl stop corrald.service
    started_at=$(date +%s.%N)
    if timeout 120 systemctl start corrald.service; then
        took=$(elapsed "$started_at")
        rss=$(awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' /proc/"$(main_pid)"/status)
        ok "1000 apps, run $run: systemctl start corrald to READY=1 in $took s, corrald RSS $rss MiB"
    else
        fail "1000 apps, run $run: corrald became active"
        systemctl status --no-pager --lines=5 corrald.service 2>&1 | show
    fi
done
systemctl stop corrald.service
cp /root/policy.example /etc/corral/policy.toml

if [ -n "${E2E_MORE_CHECKS:-}" ]; then
    # shellcheck source=/dev/null
    . "$E2E_MORE_CHECKS"
fi

info "checks took $(elapsed "$t0") s"

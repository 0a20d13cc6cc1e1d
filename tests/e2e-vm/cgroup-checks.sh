# Per-app cgroups (issue 20), checked in tests/e2e-vm/run's VM (real
# systemd, cgroup v2, corrald.service with Delegate=yes). Sourced at the
# end of kernel-checks.sh; uses inside.sh's helpers (ok, fail, check, info,
# show, http_ok, main_pid, active). The guests come from the share
# (loop.wat: a tight loop; touch.wat: takes 48 MiB, then echoes).
#
# - the layout: corrald in daemon/, the zygote template in template/, each
#   app in apps/NAME with its limits (its zygote forked from the template);
# - a CPU hog beside hello with equal weights: hello's p99 against alone;
# - limits.cpu = "50%": the hog's CPU time over 10 s, and a reload to
#   "25%" applied to the running cgroup without restarting the app;
# - limits.app-memory: a worker OOM-killed in that app only, reported,
#   replaced; hello loses no request meanwhile;
# - status figures against systemd-cgtop's for the same cgroup.

share=$(dirname "${E2E_MORE_CHECKS:-/mnt/e2e/kernel-checks.sh}")
info "--- cgroups (kernel $(uname -r), $(stat -fc %T /sys/fs/cgroup))"
cp "$share/loop.wat" "$share/touch.wat" /etc/corral/
cp /etc/corral/policy.toml /root/policy.before-cgroups

cg_field() { # APP FIELD: a number from `corral status APP --json`'s cgroup
    corral status "$1" --json 2>/dev/null | tr -d ' \n' | sed -n "s/.*\"cgroup\":{[^}]*\"$2\":\([0-9][0-9]*\).*/\1/p"
}
cg_path() { # APP: its cgroup's directory, from corral status
    corral status "$1" --json 2>/dev/null | tr -d ' \n' | sed -n 's/.*"cgroup":{[^}]*"path":"\([^"]*\)".*/\1/p'
}
zygote_of() { corral status "$1" --json 2>/dev/null | tr -d ' \n' | sed -n 's/.*"zygote_pid":\([0-9][0-9]*\).*/\1/p'; }
usage_usec() { sed -n 's/^usage_usec //p' "$1/cpu.stat"; }
wait_state() { # APP STATE: up to 30 s
    local i
    for i in $(seq 1 150); do
        [ "$(corral status "$1" 2>/dev/null | sed -n 's/^ *State: \([a-z]*\).*/\1/p')" = "$2" ] && return 0
        sleep 0.2
    done
    return 1
}
p99() { # URL N: the 99th percentile of N sequential requests' time, in ms
    local i
    for i in $(seq 1 "$2"); do curl -s -o /dev/null -w '%{time_total}\n' --max-time 10 "$1" || echo 10; done |
        sort -n | awk '{ t[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.1f", t[i] * 1000 }'
}

cat >>/etc/corral/policy.toml <<'EOF'

[apps.hog]
module = "loop.wat"
kind = "stdio"
listen = ["127.0.0.1:8099"]
pool = { max = 4, concurrency = 1 }
limits = { timeout = "120s" }

[apps.fat]
module = "touch.wat"
kind = "stdio"
listen = ["127.0.0.1:8098"]
pool = { max = 4, concurrency = 1 }
limits = { memory = "64MiB", app-memory = "112MiB", timeout = "120s" }
EOF
systemctl reload corrald.service
wait_state hog idle
http_ok http://127.0.0.1:8080/

# --- The layout.
main=$(main_pid)
daemon_cg=$(sed -n 's/^0:://p' "/proc/$main/cgroup")
info "corrald (pid $main) is in $daemon_cg"
check "corrald moved itself into the leaf daemon/ ($daemon_cg)" test "${daemon_cg##*/}" = daemon
root=/sys/fs/cgroup${daemon_cg%/daemon}
check "its subtree has cpu, memory and pids on for apps/ ($(cat "$root/apps/cgroup.subtree_control" 2>&1))" \
    grep -q 'cpu.*memory.*pids\|memory.*pids.*cpu\|cpu memory pids' "$root/apps/cgroup.subtree_control"
corral status 2>&1 | grep -E 'Cgroups' | show
hello_cg=$(cg_path hello)
check "hello has a cgroup of its own: $hello_cg" test "$hello_cg" = "$root/apps/hello"
tpl=$(pgrep -fx 'corrald template' | head -n1)
check "the zygote template (${tpl:-none}) is in template/, no app's" grep -qx "${tpl:-none}" "$root/template/cgroup.procs"
hz=$(zygote_of hello)
if [ -n "$hz" ]; then
    check "hello's zygote ($hz) is in it" grep -qx "$hz" "$hello_cg/cgroup.procs"
    for w in $(pgrep -P "$hz"); do
        check "hello's worker $w is in it" grep -qx "$w" "$hello_cg/cgroup.procs"
    done
fi
corral status hello 2>&1 | grep -E 'Cgroup|Resources|Limits' | show
info "tasks per process in hello's cgroup: $(for p in $(cat "$hello_cg/cgroup.procs"); do printf '%s:%s ' "$p" "$(ls /proc/$p/task | wc -l)"; done)"

# --- A CPU hog beside hello, equal weights (100 each).
alone=$(p99 http://127.0.0.1:8080/ 200)
info "hello alone: p99 $alone ms over 200 requests"
hog_conns() { # open N connections to the hog on fds 20..: its workers spin
    local i
    for i in $(seq 20 $((19 + $1))); do eval "exec $i<>/dev/tcp/127.0.0.1/8099"; done
}
hog_close() { local i; for i in 20 21 22 23; do eval "exec $i>&-" 2>/dev/null; done; }
hog_conns 4
sleep 3
hog_cg=$(cg_path hog)
check "the hog has its cgroup ($hog_cg)" test -n "$hog_cg"
beside=$(p99 http://127.0.0.1:8080/ 200)
u0=$(usage_usec "$hog_cg"); sleep 5; u1=$(usage_usec "$hog_cg")
hog_cpus=$(awk -v a="$u0" -v b="$u1" 'BEGIN { printf "%.2f", (b - a) / 5e6 }')
info "hello beside the hog (4 spinning workers, ${hog_cpus} CPUs): p99 $beside ms (alone $alone ms)"
# Measured, not asserted: under qemu TCG on a shared host the numbers move
# with the host's load (tests/bench is where timing is judged).
info "equal weights: hello's p99 beside the hog is $(awk -v a="$alone" -v b="$beside" 'BEGIN { printf "%.1f", b / a }')x its p99 alone"

# --- systemd-cgtop against corral status for the same cgroup.
rel=${hog_cg#/sys/fs/cgroup/}
cgtop=$(systemd-cgtop -b --raw -n 2 -d 1 "$rel" 2>&1 | grep -E "^/?$rel " | tail -n1)
info "systemd-cgtop: $cgtop"
corral status hog 2>&1 | grep -E 'Resources' | show
top_tasks=$(echo "$cgtop" | awk '{ print $2 }')
top_mem=$(echo "$cgtop" | awk '{ print $4 }')
our_tasks=$(cg_field hog tasks)
our_mem=$(cg_field hog memory_bytes)
check "tasks: corral status $our_tasks, systemd-cgtop $top_tasks" test "$our_tasks" = "$top_tasks"
check "memory: corral status $our_mem, systemd-cgtop $top_mem (within 10%)" \
    awk -v a="$our_mem" -v b="$top_mem" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b > 0 && d <= b / 10) }'

# --- limits.cpu = "50%", applied by a reload without restarting the hog.
hz=$(zygote_of hog)
sed -i '/^\[apps.hog\]/,/^\[apps.fat\]/ s/^limits = { timeout = "120s" }/limits = { timeout = "120s", cpu = "50%" }/' /etc/corral/policy.toml
systemctl reload corrald.service
sleep 2
check "reload: the hog's zygote is the same ($hz)" test "$(zygote_of hog)" = "$hz"
check "reload: cpu.max is \"50000 100000\" ($(cat "$hog_cg/cpu.max"))" test "$(cat "$hog_cg/cpu.max")" = "50000 100000"
u0=$(usage_usec "$hog_cg"); t0=$(date +%s.%N); sleep 10; u1=$(usage_usec "$hog_cg"); t1=$(date +%s.%N)
share50=$(awk -v a="$u0" -v b="$u1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e6 / (e - s) }')
info "limits.cpu = 50%: the hog used $share50 CPUs over 10 s"
# The kernel enforces the ceiling; reaching it needs the VM's vCPUs to
# run, which a busy host (qemu TCG) does not always allow: 0.50 on a quiet
# host, 0.17 once with other builds running. So the ceiling is checked,
# and that the hog still runs.
check "limits.cpu = 50%: at most half a CPU, and the hog still runs ($share50)" awk -v c="$share50" 'BEGIN { exit !(c > 0.05 && c <= 0.55) }'
sed -i 's/cpu = "50%" }/cpu = "25%" }/' /etc/corral/policy.toml
systemctl reload corrald.service
sleep 2
u0=$(usage_usec "$hog_cg"); t0=$(date +%s.%N); sleep 10; u1=$(usage_usec "$hog_cg"); t1=$(date +%s.%N)
share25=$(awk -v a="$u0" -v b="$u1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e6 / (e - s) }')
info "limits.cpu = 25% after a reload: the hog used $share25 CPUs over 10 s"
check "reload to 25%: at most a quarter of a CPU, and the hog still runs ($share25)" \
    awk -v c="$share25" 'BEGIN { exit !(c > 0.05 && c <= 0.28) }'
check "reload to 25%: the hog's zygote is still $hz" test "$(zygote_of hog)" = "$hz"
hog_close

# --- limits.app-memory: three connections of 48 MiB each in a 112 MiB app.
since=$(date '+%Y-%m-%d %H:%M:%S')
rm -f /root/hello-loop.log
( end=$((SECONDS + 25)); while [ "$SECONDS" -lt "$end" ]; do
      if curl -fsS --max-time 10 -o /dev/null http://127.0.0.1:8080/; then echo ok; else echo FAILED; fi
  done >/root/hello-loop.log ) &
loop_pid=$!
for i in 30 31 32; do eval "exec $i<>/dev/tcp/127.0.0.1/8098"; sleep 1; done
fat_cg=$(cg_path fat)
kills=0
for _ in $(seq 1 100); do
    kills=$(sed -n 's/^oom_kill //p' "$fat_cg/memory.events" 2>/dev/null)
    [ "${kills:-0}" -ge 1 ] && break
    sleep 0.2
done
# memory.high is 1/256 below memory.max (supervisor/src/cgroup.rs,
# memory_high): past it the kernel reclaims, but the overage is too small
# for its throttling, so the app goes on to memory.max and loses a worker
# to the OOM killer. (At 1/16 it was held throttled between the two for
# longer than this waits, on 6.1 and 6.12: no kill, no report.)
peak=$(cat "$fat_cg/memory.peak" 2>/dev/null || echo 0)
high_events=$(sed -n 's/^high //p' "$fat_cg/memory.events" 2>/dev/null)
info "fat: memory.events oom_kill ${kills:-0}, high ${high_events:-0}; memory.peak $peak of memory.max $(cat "$fat_cg/memory.max")"
check "fat: a worker OOM-killed at limits.app-memory (memory.events oom_kill ${kills:-0})" \
    test "${kills:-0}" -ge 1
check "fat: memory.peak $peak within memory.max" test "$peak" -le "$(cat "$fat_cg/memory.max")"
for i in 30 31 32; do eval "exec $i>&-"; done
wait "$loop_pid"
hello_ok=$(grep -c '^ok' /root/hello-loop.log); hello_failed=$(grep -c FAILED /root/hello-loop.log)
check "hello lost no request meanwhile ($hello_ok served, $hello_failed failed)" test "$hello_failed" = 0
check "hello's cgroup had no OOM kill ($(sed -n 's/^oom_kill //p' "$hello_cg/memory.events"))" \
    test "$(sed -n 's/^oom_kill //p' "$hello_cg/memory.events")" = 0
sleep 1
journalctl -u corrald.service --since "$since" -o cat --no-pager | grep -i 'oom' | head -n 3 | show
check "the kill is reported as fat's event in the journal" \
    bash -c "journalctl -u corrald.service --since '$since' -o cat --no-pager | grep -q \"killed by the kernel's OOM killer\""
all_kills=$(sed -n 's/^oom_kill //p' "$fat_cg/memory.events")
reported=$(journalctl -u corrald.service --since "$since" -o cat --no-pager | grep -c "killed by the kernel's OOM killer")
check "every OOM kill is reported as one ($reported reported, memory.events oom_kill = $all_kills)" test "$reported" = "$all_kills"
corral status fat 2>&1 | grep -E 'State|Last error|Resources|Limits' | show
check "corral status fat counts its OOM kills (oom_kills = $(cg_field fat oom_kills), memory.events $all_kills)" test "$(cg_field fat oom_kills)" = "$all_kills"
metric=$(curl -s --max-time 10 --unix-socket /run/corral/api.sock http://corral/metrics | grep '^corral_app_oom_kills_total{app="fat"}')
check "GET /metrics counts it: $metric" test "${metric##* }" = "$all_kills"
# D-Bus: the Cgroup property, and corral over D-Bus gives what the socket gives.
busctl get-property org.corral.Manager1 /org/corral/Manager1/app/fat org.corral.App1 Cgroup 2>&1 | cut -c1-300 | show
check "D-Bus: fat's Cgroup property has OomKills $all_kills" \
    bash -c 'busctl get-property org.corral.Manager1 /org/corral/Manager1/app/fat org.corral.App1 Cgroup | grep -q "\"OomKills\" t $1"' _ "$all_kills"
over_bus=$(corral status fat --bus system --json 2>&1 | tr -d ' \n' | sed -n 's/.*"cgroup":{\([^}]*\)}.*/\1/p' | sed 's/"cpu_usec":[0-9]*,//; s/"memory_bytes":[0-9]*,//; s/"memory_peak_bytes":[0-9]*,//; s/"tasks":[0-9]*,//')
over_socket=$(corral status fat --json 2>&1 | tr -d ' \n' | sed -n 's/.*"cgroup":{\([^}]*\)}.*/\1/p' | sed 's/"cpu_usec":[0-9]*,//; s/"memory_bytes":[0-9]*,//; s/"memory_peak_bytes":[0-9]*,//; s/"tasks":[0-9]*,//')
info "cgroup over D-Bus: $over_bus"
check "corral status --bus system: fat's cgroup as over the socket (but the moving figures)" \
    test -n "$over_bus" -a "$over_bus" = "$over_socket"
served=no
for _ in $(seq 1 20); do
    if timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8098; printf "after-oom\n" >&3; read -r l <&3; [ "$l" = after-oom ]'; then served=yes; break; fi
    sleep 0.5
done
check "fat serves again after the kill (worker replaced)" test "$served" = yes
check "fat is running" wait_state fat running

# --- limits.processes reached at run time: the zygote's fork refused by
# pids.max (lowered by hand under the running app, as the policy itself
# refuses a value below 2 x pool.max + 1): reported, not a restart loop.
cat >>/etc/corral/policy.toml <<'EOF'

[apps.few]
module = "loop.wat"
kind = "stdio"
listen = ["127.0.0.1:8096"]
pool = { max = 3, concurrency = 1 }
limits = { timeout = "60s", processes = 7 }
EOF
systemctl reload corrald.service
wait_state few idle
exec 40<>/dev/tcp/127.0.0.1/8096
wait_state few running
sleep 1
few_cg=$(cg_path few)
if [ -z "$few_cg" ]; then
    fail "few has a cgroup"
else
    # One connection: its worker, and a spare the zygote forks when every
    # worker is busy (2 tasks each), and the zygote.
    info "few: $(cat "$few_cg/pids.current") tasks with one connection; pids.max set to that by hand"
    cat "$few_cg/pids.current" >"$few_cg/pids.max"
    cold=$(corral status few --json 2>/dev/null | tr -d ' \n' | sed -n 's/.*"cold_starts":\([0-9]*\).*/\1/p')
    exec 41<>/dev/tcp/127.0.0.1/8096
    check "few: failed once its fork was refused" wait_state few failed
    why=$(corral status few 2>/dev/null | sed -n 's/^ *Last error: //p')
    info "few: $why"
    check "few: the reason names limits.processes and pids.events" \
        bash -c '[[ $1 == *"limits.processes = 7 is too low"* && $1 == *pids.events* ]]' _ "$why"
    sleep 3
    cold2=$(corral status few --json 2>/dev/null | tr -d ' \n' | sed -n 's/.*"cold_starts":\([0-9]*\).*/\1/p')
    check "few: not restarted in a loop (cold starts $cold, 3 s later $cold2)" test "$cold" = "$cold2"
    exec 41>&-
fi
exec 40>&-
check "hello still served" http_ok http://127.0.0.1:8080/

# --- limits.processes: refused by the policy below what the pool needs.
cat >/root/few.toml <<'EOF'
[apps.few]
module = "/etc/corral/hello.wasm"
kind = "http"
listen = ["127.0.0.1:8096"]
pool = { max = 4 }
limits = { processes = 6 }
EOF
out=$(corral check --policy /root/few.toml 2>&1)
printf '%s\n' "$out" | show
check "corral check refuses limits.processes = 6 for pool.max = 4, naming file, line and key" \
    bash -c "printf '%s\n' \"\$1\" | grep -q '^/root/few.toml:6:.*apps.few.limits.processes: 6 is below what the pool needs'" _ "$out"

cp /root/policy.before-cgroups /etc/corral/policy.toml
systemctl reload corrald.service

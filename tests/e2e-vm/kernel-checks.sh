# What only a real kernel shows, checked in tests/e2e-vm/run's VM after the
# checks of tests/e2e-systemd/inside.sh, which sources this file
# (E2E_MORE_CHECKS) and whose helpers it uses: ok, fail, check, info, show,
# http_ok, echo_roundtrip, main_pid, active. E2E_PROBE is the sandbox probe
# (corral-sandbox-probe, a test tool the host shares; not in the package).
#
# The expectation is the right behaviour on every kernel Debian users run:
# the packaged examples are served with the default enforcement, and what
# each app got is reported honestly.

kernel=$(uname -r)
# The landlock ABI each tested kernel has (Documentation/userspace-api/landlock.rst).
case "$kernel" in
6.1.*) want_abi=2 ;;
6.12.*) want_abi=6 ;;
*) want_abi= ;;
esac
info "--- kernel $kernel: what this kernel gives each app"
info "LSMs: $(cat /sys/kernel/security/lsm 2>/dev/null || echo '(no securityfs)')"
info "cgroup: $(stat -fc %T /sys/fs/cgroup)"

# --- Layers: corral doctor (the kernel's landlock ABI, per app what it gets).
doctor_out=$(corral doctor --policy /etc/corral/policy.toml 2>&1)
doctor_rc=$?
printf '%s\n' "$doctor_out" | sed 's/^/e2e: ..   doctor: /'
abi=$(printf '%s\n' "$doctor_out" | sed -n 's/^ *landlock: *ABI \([0-9][0-9]*\).*/\1/p' | head -n1)
info "landlock ABI the kernel reports: ${abi:-none}"
if [ -n "$want_abi" ]; then
    check "corral doctor reports landlock ABI $want_abi for kernel $kernel" test "${abi:-none}" = "$want_abi"
fi
check "corral doctor: no app of the policy is refused on this kernel (exit $doctor_rc)" test "$doctor_rc" = 0

# Honest layers: a landlock=abiN(FEATURES) claim lists no feature the
# kernel's ABI lacks (TCP rules from ABI 4, scoping from ABI 6).
honest() { # TEXT: every landlock claim in it fits the kernel's ABI
    local claim feats
    for claim in $(printf '%s\n' "$1" | grep -o 'landlock=abi[0-9]*([a-z,]*)'); do
        feats=${claim#*(}
        [[ $claim == "landlock=abi${abi}("* ]] || return 1
        if [ "$abi" -lt 4 ] && [[ ,$feats == *,tcp* ]]; then return 1; fi
        if [ "$abi" -lt 6 ] && [[ ,$feats == *,scoping* ]]; then return 1; fi
    done
}

# The packaged examples' apps: [apps.NAME] with kind = "K" and
# listen = ["systemd:SOCKET"]; [sockets.SOCKET] listen = "127.0.0.1:PORT".
examples=/usr/share/doc/corral/examples/policy.toml
example_apps=$(awk '
    /^\[sockets\./ { sect = "socket"; name = substr($0, 10, length($0) - 10); next }
    /^\[apps\./ { sect = "app"; name = substr($0, 7, length($0) - 7); next }
    /^\[/ { sect = ""; next }
    sect == "socket" && $1 == "listen" { gsub(/[" ]/, "", $3); port[name] = $3; sub(/.*:/, "", port[name]) }
    sect == "app" && $1 == "kind" { gsub(/"/, "", $3); kind[name] = $3 }
    sect == "app" && $1 == "listen" && match($0, /systemd:[A-Za-z0-9_-]+/) { sock[name] = substr($0, RSTART + 8, RLENGTH - 8) }
    END { for (a in kind) if (a in sock) print a, kind[a], port[sock[a]] }' "$examples" | sort)
[ -n "$example_apps" ] || fail "found the packaged examples' apps in $examples"
for app in $(printf '%s\n' "$example_apps" | cut -d' ' -f1); do
    line=$(printf '%s\n' "$doctor_out" | grep -E "^ +$app \(" | head -n1)
    if [ -n "$line" ] && [[ $line != *REFUSED* ]] && [[ $line == *"landlock=abi${abi:-?}"* ]] && [[ $line == *seccomp=on* ]] && honest "$line"; then
        ok "corral doctor: $app gets landlock ABI $abi and seccomp: ${line#"${line%%[! ]*}"}"
    else
        fail "corral doctor: $app gets landlock ABI ${abi:-?} and seccomp, no feature the ABI lacks (got: ${line:-no line})"
    fi
done

# --- Every app of the packaged examples, from zero: corrald stopped, the
# app's socket (held by systemd) takes the first connection.
serve() { # APP KIND PORT
    case "$2" in
    http) http_ok "http://127.0.0.1:$3/" ;;
    stdio) echo_roundtrip "$3" ;; # the example's stdio app is an echo
    *) return 1 ;;
    esac
}
while read -r app kind port; do
    [ -n "$app" ] || continue
    systemctl stop corrald.service
    if [ "$(systemctl is-active corrald.service)" != inactive ]; then
        fail "corrald stopped before serving $app from zero"; continue
    fi
    if serve "$app" "$kind" "$port"; then
        ok "$app ($kind, 127.0.0.1:$port) served from zero: its connection started corrald"
    else
        fail "$app ($kind, 127.0.0.1:$port) served from zero"
    fi
    check "corrald active after $app's first connection" active corrald.service
    check "$app served again (a warm worker)" serve "$app" "$kind" "$port"
done <<<"$example_apps"

# --- corral status: the layers each running app got, as corrald reports them.
while read -r app kind port; do serve "$app" "$kind" "$port" 2>/dev/null; done <<<"$example_apps"
corral status 2>&1 | sed 's/^/e2e: ..   status: /'
for app in $(printf '%s\n' "$example_apps" | cut -d' ' -f1); do
    st=$(corral status "$app" 2>&1)
    printf '%s\n' "$st" | grep -E 'State|Workers|Sandbox|Last error' | sed "s/^/e2e: ..   status $app: /"
    sandbox=$(printf '%s\n' "$st" | sed -n 's/^ *Sandbox: //p')
    if [[ $sandbox == *"landlock=abi${abi:-?}"* ]] && [[ $sandbox == *seccomp=on* ]] && honest "$sandbox"; then
        ok "corral status $app: its workers run with landlock ABI $abi and seccomp ($sandbox)"
    else
        fail "corral status $app: its workers run with landlock ABI ${abi:-?} and seccomp, no feature the ABI lacks (got: ${sandbox:-nothing})"
    fi
done

# --- A worker killed: the pool replaces it and the app keeps serving.
first=$(printf '%s\n' "$example_apps" | awk '$2 == "http" { print; exit }')
read -r app kind port <<<"$first"
if [ -n "$app" ]; then
    serve "$app" "$kind" "$port"
    zygote=$(corral status "$app" --json 2>/dev/null | sed -n 's/.*"zygote_pid": *\([0-9][0-9]*\).*/\1/p')
    workers=$( [ -n "$zygote" ] && pgrep -P "$zygote" | tr '\n' ' ')
    victim=${workers%% *}
    if [ -z "$victim" ]; then
        fail "a worker of $app to kill (zygote ${zygote:-none}, workers: ${workers:-none})"
    else
        kill -9 "$victim"
        for _ in $(seq 1 100); do kill -0 "$victim" 2>/dev/null || break; sleep 0.1; done
        served=no
        deadline=$((SECONDS + 30))
        while [ "$SECONDS" -lt "$deadline" ]; do serve "$app" "$kind" "$port" 2>/dev/null && { served=yes; break; }; sleep 0.5; done
        check "$app served after its worker $victim was killed (kill -9)" test "$served" = yes
        now=$(pgrep -P "$zygote" | tr '\n' ' ')
        replaced=no
        for p in $now; do [[ " $workers " == *" $p "* ]] || replaced=yes; done
        check "the killed worker was replaced (before: $workers; now: $now)" test "$replaced" = yes
        check "the same zygote" kill -0 "$zygote"
    fi
fi

# --- journald: corrald's events are structured entries.
fields=$(journalctl -u corrald.service -o export --no-pager 2>/dev/null)
n_app=$(printf '%s\n' "$fields" | grep -c '^CORRAL_APP=')
n_id=$(printf '%s\n' "$fields" | grep -c '^SYSLOG_IDENTIFIER=corrald$')
check "journald: corrald's entries carry SYSLOG_IDENTIFIER=corrald ($n_id)" test "$n_id" -gt 0
check "journald: corrald's entries carry CORRAL_APP= fields ($n_app)" test "$n_app" -gt 0
journalctl -u corrald.service -o verbose -n 1 --no-pager CORRAL_APP=hello 2>/dev/null |
    grep -E '^ +(MESSAGE|PRIORITY|SYSLOG_IDENTIFIER|CORRAL_[A-Z_]+)=' | sed 's/^ */e2e: ..   journal field: /'

# --- corral check: the policy as it would run on this kernel (its last
# column: the layers each app would get).
check_out=$(corral check --policy /etc/corral/policy.toml 2>&1)
check_rc=$?
printf '%s\n' "$check_out" | sed 's/^/e2e: ..   check: /'
if [ "$check_rc" = 0 ] && ! printf '%s\n' "$check_out" | grep -q -i 'refused'; then
    ok "corral check: every app of the policy runs on this kernel"
else
    fail "corral check: every app of the policy runs on this kernel (exit $check_rc; an app refused)"
fi

# --- An app whose grant needs a layer this kernel lacks: network.connect
# needs landlock's TCP rules (ABI 4). Refused before any process starts,
# named with its grant and the kernel's ABI, marked failed at once (no
# restart loop), and the other apps keep serving.
if [ -n "$abi" ] && [ "$abi" -lt 4 ]; then
    info "--- needs-tcp: an app with network.connect on landlock ABI $abi"
    cp /etc/corral/policy.toml /root/policy.before-needs-tcp
    printf '\n[apps.needs-tcp]\nmodule = "hello.wasm"\nkind = "http"\nlisten = ["127.0.0.1:8097"]\nnetwork = { connect = ["127.0.0.1:9"] }\n' \
        >>/etc/corral/policy.toml
    out=$(corral check --policy /etc/corral/policy.toml 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep 'needs-tcp' | sed 's/^/e2e: ..   check: /'
    if [ "$rc" != 0 ] && printf '%s\n' "$out" | grep -q 'needs-tcp'; then
        ok "corral check exits non-zero for needs-tcp on this kernel (exit $rc)"
    else
        fail "corral check exits non-zero for needs-tcp on this kernel (exit $rc)"
    fi
    out=$(corral doctor --policy /etc/corral/policy.toml 2>&1)
    line=$(printf '%s\n' "$out" | grep -A3 -E '^ +needs-tcp [(]' | tr '\n' ' ')
    if [[ $line == *REFUSED* ]] && [[ $line == *network* ]] && [[ $line == *"ABI $abi"* ]]; then
        ok "corral doctor refuses needs-tcp, naming the grant and the ABI: $line"
    else
        fail "corral doctor refuses needs-tcp, naming the grant (network) and the ABI ($abi) (got: ${line:-no line})"
    fi
    since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl reload corrald.service
    state=
    for _ in $(seq 1 150); do
        state=$(corral status needs-tcp 2>/dev/null | sed -n 's/^ *State: \([a-z]*\).*/\1/p')
        [ "$state" = failed ] && break
        sleep 0.2
    done
    corral status needs-tcp 2>&1 | grep -E 'State|Last error' | sed 's/^/e2e: ..   status needs-tcp: /'
    check "corrald marks needs-tcp failed (state: ${state:-none})" test "$state" = failed
    # A connection to it (an on-demand zygote starts at the first one);
    # whether it is refused or times out, nothing may restart in a loop.
    curl -s --max-time 5 http://127.0.0.1:8097/ >/dev/null 2>&1
    sleep 3 # what a restart loop would log meanwhile
    restarts=$(journalctl -u corrald.service --since "$since" -o cat --no-pager | grep 'needs-tcp' | grep -c 'restarting in')
    check "without starting and restarting its zygote ($restarts restarts logged)" test "$restarts" = 0
    check "hello still served" http_ok http://127.0.0.1:8080/
    cp /root/policy.before-needs-tcp /etc/corral/policy.toml
    systemctl reload corrald.service
fi

# --- The sandbox proved from inside, on this kernel: the probe enters
# exactly the sandbox a worker of an app gets, with the default enforcement
# (landlock and seccomp "require"), and tries one action.
probe=${E2E_PROBE:-}
if [ -z "$probe" ] || [ ! -x "$probe" ]; then
    fail "the sandbox probe is shared into the VM (E2E_PROBE=$probe)"
else
    pdir=/root/probe
    rm -rf "$pdir"
    mkdir -p "$pdir/granted" "$pdir/outside" "$pdir/cache"
    echo granted >"$pdir/granted/data.txt"
    echo host >"$pdir/outside/host.txt"
    cp /usr/share/doc/corral/examples/echo.wat "$pdir/m.wat"
    cat >"$pdir/policy.toml" <<'EOF'
[daemon]
cache-dir = "cache"

[apps.probe]
module = "m.wat"
kind = "command"
dirs = [{ host = "granted", guest = "/data", access = "ro" }]
EOF
    probe_run() { # PROBE-ARGS...: prints ok, errno N, signal N or "exit N: STDERR"
        local out rc
        out=$("$probe" --policy "$pdir/policy.toml" --app probe "$@" 2>"$pdir/stderr")
        rc=$?
        if [ "$rc" -gt 128 ]; then echo "signal $((rc - 128))"
        elif [ "$rc" -le 1 ]; then printf '%s\n' "$out" | tail -n1
        else echo "exit $rc: $(tr '\n' ' ' <"$pdir/stderr")"
        fi
    }
    expect() { # WHAT WANT PROBE-ARGS...
        local what=$1 want=$2 got
        shift 2
        got=$(probe_run "$@")
        if [ "$got" = "$want" ]; then ok "probe: $what ($got)"; else fail "probe: $what: want $want, got $got"; fi
    }
    expect "without the sandbox, root reads the file outside" ok --no-sandbox read "$pdir/outside/host.txt"
    expect "without the sandbox, root binds a TCP socket" ok --no-sandbox bind 0
    expect "the granted dir is readable" ok read "$pdir/granted/data.txt"
    layers=$(grep '^probe: ' "$pdir/stderr" | sed 's/^probe: //')
    info "probe: layers entered on $kernel: ${layers:-none (see above)}"
    if [ -n "$layers" ]; then
        check "probe: the layers it reports fit the kernel's ABI ($layers)" honest "$layers"
    fi
    expect "the granted dir is listable" ok read "$pdir/granted"
    expect "a file outside the grant is refused (EACCES)" "errno 13" read "$pdir/outside/host.txt"
    expect "/etc/passwd is refused (EACCES)" "errno 13" read /etc/passwd
    expect "writing into the read-only grant is refused (EACCES)" "errno 13" write "$pdir/granted/new.txt"
    expect "a new TCP socket is refused (EPERM)" "errno 1" bind 0
    expect "a new netlink socket is refused (EPERM)" "errno 1" socket-netlink
    expect "execve kills the worker (SIGSYS)" "signal 31" exec /bin/sh
    expect "landlock alone refuses execve (EACCES)" "errno 13" --without seccomp exec /bin/sh
    expect "landlock alone refuses the file outside (EACCES)" "errno 13" --without seccomp read "$pdir/outside/host.txt"
    # SIGSYS from the filter is recorded by the kernel's audit (the syscall number).
    dmesg 2>/dev/null | grep -m2 -E 'type=1326|audit: .*syscall=59' | sed 's/^/e2e: ..   kernel log: /'
fi

# --- Per-app cgroups: what only a cgroup v2 host with delegation shows.
. "$(dirname "${E2E_MORE_CHECKS:-$0}")/cgroup-checks.sh"

# --- The containerd shim's task cgroup on cgroup v2.
. "$(dirname "${E2E_MORE_CHECKS:-$0}")/shim-checks.sh"

# --- corral run --listen: the sandbox's grants for a guest that listens.
. "$(dirname "${E2E_MORE_CHECKS:-$0}")/listen-checks.sh"

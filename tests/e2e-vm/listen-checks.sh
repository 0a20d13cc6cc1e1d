# `corral run --listen` (issue 17's conformance runner: a guest that binds
# and listens itself) on this kernel: the sandbox's grants for it (seccomp
# bind/listen/accept, landlock TCP bind rules where the ABI has them) let
# the suite's WASI 0.3 socket tests run. Sourced by kernel-checks.sh; the
# .wasm files come from the WASI test suite through the share.

share=$(dirname "${E2E_MORE_CHECKS:-/mnt/e2e/kernel-checks.sh}")
info "--- corral run --listen (kernel $(uname -r))"
for t in sockets-tcp-bind sockets-tcp-listen; do
    wasm="$share/$t.wasm"
    if [ ! -f "$wasm" ]; then
        fail "$t.wasm is shared into the VM"
        continue
    fi
    out=$(timeout 120 corral run --listen any --connect any "$wasm" 2>&1 >/dev/null)
    rc=$?
    [ "$rc" = 0 ] || printf '%s\n' "$out" | tail -n 5 | show
    check "corral run --listen any --connect any $t.wasm in the sandbox exits 0 (got $rc)" test "$rc" = 0
done

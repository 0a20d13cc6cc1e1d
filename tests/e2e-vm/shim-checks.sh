# The containerd shim's task cgroup on cgroup v2 (issue 20), checked in
# tests/e2e-vm/run's VM (Debian's containerd and runc are in the image; the
# shim comes with corral.deb). Sourced at the end of kernel-checks.sh, after
# cgroup-checks.sh; uses inside.sh's helpers (ok, fail, check, info, show).
#
# `ctr run` with CPU shares, quota and period and a memory limit: the task
# process is in the cgroup of the spec's cgroupsPath, whose cpu.weight,
# cpu.max and memory.max say what runc would write; the app serves; the
# cgroup is gone after delete. Then the pids limit, for which ctr has no
# flag: a container from a spec file (`ctr run --config`) with
# linux.resources.pids.limit = 64 gets pids.max 64 in its cgroup.

share=$(dirname "${E2E_MORE_CHECKS:-/mnt/e2e/kernel-checks.sh}")
info "--- the containerd shim's cgroup (kernel $(uname -r), $(stat -fc %T /sys/fs/cgroup))"
ns=corral-e2e
shim_port=18099
systemctl start containerd 2>&1 | show
for i in $(seq 1 100); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
check "containerd answers" ctr version
check "the shim is installed with corral" command -v containerd-shim-corral-v1
check "ctr imports the Wasm image" ctr -n "$ns" images import "$share/hello-image.tar"
serves() { # PORT: the hello task answers there (up to 30 s)
    local i
    for i in $(seq 1 150); do
        curl -sf --max-time 2 "http://127.0.0.1:$1/" 2>/dev/null | grep -q 'Hello from corral' && return 0
        sleep 0.2
    done
    return 1
}
task_cgroup() { # ID: the cgroup directory of task ID's process
    local pid
    pid=$(ctr -n "$ns" task ls 2>/dev/null | awk -v id="$1" '$1 == id { print $2 }')
    echo "/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/"${pid:-0}"/cgroup 2>/dev/null)"
}
remove_task() { # ID: kill it, wait until it is stopped, delete task and container
    local i
    ctr -n "$ns" task kill "$1" 2>&1 | show
    for i in $(seq 1 100); do
        ctr -n "$ns" task ls 2>/dev/null | awk -v id="$1" '$1 == id' | grep -q STOPPED && break
        sleep 0.2
    done
    ctr -n "$ns" task delete "$1" 2>&1 | show
    ctr -n "$ns" container delete "$1" 2>&1 | show
}
if ctr -n "$ns" run -d --net-host --runtime io.containerd.corral.v1 \
    --cpu-shares 512 --cpu-quota 50000 --cpu-period 100000 --memory-limit 268435456 \
    --env "CORRAL_HTTP_LISTEN=127.0.0.1:$shim_port" corral.test/hello:1 web /hello.wasm 2>&1 | show; then
    ok "ctr run --runtime io.containerd.corral.v1 with resources"
else
    fail "ctr run --runtime io.containerd.corral.v1 with resources"
fi
check "the shim's task serves" serves "$shim_port"
task_cg=$(task_cgroup web)
info "task cgroup: $task_cg"
task_cg_is_its_own() { [[ $task_cg == */web ]]; }
check "the task has a cgroup of its own ($task_cg)" task_cg_is_its_own
for pair in "cpu.max=50000 100000" "cpu.weight=20" "memory.max=268435456"; do
    file=${pair%%=*} want=${pair#*=}
    got=$(cat "$task_cg/$file" 2>/dev/null)
    check "$file is \"$want\" (shares 512 as runc converts them; quota; memory limit): \"$got\"" [ "$got" = "$want" ]
done
remove_task web
check "the task's cgroup is gone after delete" [ ! -e "$task_cg" ]

# --- The pids limit, for which ctr has no flag: a container from a spec
# file (`ctr run --config`) whose rootfs is a directory with the module.
limited_port=$((shim_port + 1))
mkdir -p /root/limited
cp "$share/http-hello.wasm" /root/limited/hello.wasm
printf '%s\n' \
    '{"ociVersion": "1.0.2",' \
    " \"process\": {\"args\": [\"/hello.wasm\"], \"env\": [\"CORRAL_HTTP_LISTEN=127.0.0.1:$limited_port\"], \"cwd\": \"/\"}," \
    ' "root": {"path": "/root/limited"},' \
    " \"linux\": {\"cgroupsPath\": \"/$ns/limited\", \"resources\": {\"pids\": {\"limit\": 64}}}}" \
    >/root/limited.json
if ctr -n "$ns" run -d --config /root/limited.json --runtime io.containerd.corral.v1 limited 2>&1 | show; then
    ok "ctr run --config with linux.resources.pids.limit = 64"
else
    fail "ctr run --config with linux.resources.pids.limit = 64"
fi
check "the pids-limited task serves" serves "$limited_port"
limited_cg=$(task_cgroup limited)
got=$(cat "$limited_cg/pids.max" 2>/dev/null)
check "pids.max of its cgroup ($limited_cg) is 64: \"$got\"" [ "$got" = 64 ]
remove_task limited
check "the limited task's cgroup is gone after delete" [ ! -e "$limited_cg" ]

"""wasi-testsuite adapter for `corral run` (the suite's Python runner,
`run-tests -r corral.py`; see tests/wasi-testsuite/README.md).

The runtime is `$CORRAL` (default `corral`), the artifact cache
`$CORRAL_CACHE` (default: corral's own). A test's proposals and world map
to `corral run` flags as the Rust runner (supervisor/tests/wasi_testsuite.rs)
maps them:
- `wasi:http/service`: `corral run --serve 127.0.0.1:0` (the address is
  the first line on stderr);
- `http`: `--connect` to each of the test's servers (`HTTP_SERVER_*`);
- `sockets`: `--connect any --listen any`, the network a runtime that
  inherits it gives (`wasmtime -Sinherit-network`).
"""

import os
import shlex
import subprocess
from typing import Dict, List, Optional, Tuple

CORRAL = shlex.split(os.getenv("CORRAL", "corral"))


def get_name() -> str:
    return "corral"


def get_version() -> str:
    result = subprocess.run(CORRAL[0:1] + ["--version"], encoding="UTF-8",
                            capture_output=True, check=True)
    return result.stdout.split()[1]


def get_wasi_versions() -> List[str]:
    return ["wasm32-wasip1", "wasm32-wasip3"]


def get_wasi_worlds() -> List[str]:
    return ["wasi:cli/command", "wasi:http/service"]


def get_timeout_seconds() -> float:
    # A test's first run compiles it into the cache.
    return 60.0


def compute_argv(test_path: str,
                 args_env_root: Tuple[List[str], Dict[str, str], Optional[str]],
                 proposals: List[str],
                 wasi_world: str,
                 wasi_version: str) -> List[str]:
    del wasi_version  # corral tells preview1 modules and components apart
    args, env, root = args_env_root
    argv = CORRAL + ["run"]
    cache = os.getenv("CORRAL_CACHE")
    if cache:
        argv += ["--cache", cache]
    if wasi_world == "wasi:http/service":
        argv += ["--serve", "127.0.0.1:0"]
    if "http" in proposals:
        for name, addr in sorted(env.items()):
            if name.startswith("HTTP_SERVER_"):
                argv += ["--connect", addr]
    if "sockets" in proposals:
        argv += ["--connect", "any", "--listen", "any"]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    if root:
        argv += ["--dir", f"{root}::/"]  # noqa: E231
    argv += [test_path]
    if args:
        argv += ["--"] + list(args)
    return argv

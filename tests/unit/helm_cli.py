"""The real helm binary (installed by scripts/install-test-tools.sh), as the chart tests call it.

``helm template`` knows no cluster: the Kubernetes version and the Prometheus Operator's kinds are
passed the way a CD tool passes them (``--kube-version``, ``--api-versions``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "llm-gateway"
MONITORING_CRDS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the dashboard JSON is large


class RenderFailed(Exception):
    """``helm template`` refused: a template's ``fail``, or (ValuesRejected) the values schema."""


class ValuesRejected(RenderFailed):
    pass


def tool(name: str) -> str:
    """A test tool from the virtualenv's bin directory or PATH; fails (never skips) when missing."""
    found = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install-test-tools.sh")
    return found


def _values_file(values: dict[str, Any] | None, stack: list[str]) -> list[str]:
    if not values:
        return []
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(values, f)
    stack.append(path)
    return ["--values", path]


def template(
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    name: str = "gw",
    namespace: str = "llm",
    kube_version: str = "1.32",
    api_versions: tuple[str, ...] = MONITORING_CRDS,
) -> str:
    tmp: list[str] = []
    try:
        cmd = [
            tool("helm"),
            "template",
            name,
            str(chart),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version,
            *_values_file(values, tmp),
        ]
        for v in api_versions:
            cmd += ["--api-versions", v]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        for p in tmp:
            os.unlink(p)
    if proc.returncode != 0:
        if "schema" in proc.stderr:
            raise ValuesRejected(proc.stderr)
        raise RenderFailed(proc.stderr)
    return proc.stdout


def manifests(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=YAML_LOADER) if d]


def lint(
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    kube_version: str = "1.32",
    strict: bool = True,
) -> subprocess.CompletedProcess[str]:
    tmp: list[str] = []
    try:
        cmd = [tool("helm"), "lint", str(chart), "--kube-version", kube_version, *_values_file(values, tmp)]
        if strict:
            cmd.append("--strict")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        for p in tmp:
            os.unlink(p)

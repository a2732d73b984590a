"""The container image's essentials, read from the Dockerfile itself (no container engine needed)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART_VALUES = ROOT / "deploy" / "helm" / "llm-gateway" / "values.yaml"
DEV_ONLY = (
    "pytest",
    "ruff",
    "hypothesis",
    "import-linter",
    "helm-python-sdk",
    "kubernetes-validate",
    "locust",
)


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"unparsed FROM: {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(base=base, name=m.group(2)))
        elif op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((op, rest))
    return args, stages


def exec_form(arg: str | None) -> list[str]:
    assert arg is not None and arg.startswith("["), f"expected exec (JSON) form, got {arg!r}"
    return json.loads(arg)


ARGS, STAGES = parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def test_multi_stage_on_python_311_slim():
    assert len(STAGES) >= 2
    # an exact release (a digest may follow), never a moving tag like 3.11-slim
    assert all(
        re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", s.base) for s in STAGES
    ), [s.base for s in STAGES]
    build = STAGES[0]
    assert build.name and any(f"--from={build.name}" in c for c in FINAL.all("COPY"))
    # The runtime stage only copies the built environment: no compiling, no pip.
    assert not any("pip " in r or "apt-get install" in r for r in FINAL.all("RUN"))


def test_only_runtime_dependencies_are_installed():
    runs = " ".join(r for s in STAGES for r in s.all("RUN"))
    assert re.search(r"pip install --no-deps \.(\s|$)", runs), "the package itself, without extras"
    assert "[dev]" not in runs and ".[" not in runs
    for name in DEV_ONLY:
        assert name not in runs, name


def test_runs_as_a_numeric_non_root_user_matching_the_chart():
    user = FINAL.last("USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) != 0
    assert any(f"--uid {uid}" in r for r in FINAL.all("RUN")), "the user exists in /etc/passwd"
    pod = yaml.safe_load(CHART_VALUES.read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
    # USER comes after everything that needs root.
    ops = [o for o, _ in FINAL.instructions]
    assert "RUN" not in ops[ops.index("USER") :]


def test_entrypoint_is_llmgw_serve_on_the_chart_config_path():
    assert exec_form(FINAL.last("ENTRYPOINT")) == ["llmgw"]
    assert exec_form(FINAL.last("CMD")) == [
        "serve",
        "--config",
        "/etc/llmgw/config.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    assert FINAL.last("EXPOSE") == "8080"
    gateway_values = yaml.safe_load(CHART_VALUES.read_text())["gateway"]
    assert gateway_values["server"]["port"] == 8080


def test_healthcheck_probes_healthz_with_the_standard_library():
    hc = FINAL.last("HEALTHCHECK")
    assert hc is not None
    options, _, cmd = hc.partition(" CMD ")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    argv = exec_form(cmd.strip())
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "urllib.request" in code and "/healthz" in code and "timeout=" in code
    compile(code, "<healthcheck>", "exec")


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` stays within one path segment, `**` spans several."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies():
    patterns = [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    copied = [arg.split()[:-1] for s in STAGES for arg in s.all("COPY") if "--from=" not in arg]
    sources = [src for srcs in copied for src in srcs]
    assert sources, "the build stage copies the sources"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src.rstrip("/"), patterns), f"{src} is copied but ignored"
    assert not _ignored("gateway/config.py", patterns)
    for private in (
        ".git/config",
        ".venv/bin/python",
        "tests/unit/test_dockerfile.py",
        ".env",
        "loadtests/bench.py",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "deploy/helm/llm-gateway/values.yaml",
    ):
        assert _ignored(private, patterns), private


LOCK = ROOT / "requirements.lock"


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_dependencies_install_from_the_lock_before_the_source_is_copied():
    build = STAGES[0]
    ops = [(o, a) for o, a in build.instructions if o in ("COPY", "RUN")]
    copy_lock = next(i for i, (o, a) in enumerate(ops) if o == "COPY" and "requirements.lock" in a)
    install = next(i for i, (o, a) in enumerate(ops) if o == "RUN" and "-r requirements.lock" in a)
    copy_src = next(i for i, (o, a) in enumerate(ops) if o == "COPY" and a.startswith("gateway"))
    assert copy_lock < install < copy_src, "a code change must not invalidate the dependency layer"
    assert "--no-deps" in ops[install][1], "the lock is complete: nothing unpinned is resolved"
    assert any("pip check" in a for o, a in ops[copy_src:] if o == "RUN"), "a stale lock fails the build"


def test_the_lock_pins_every_runtime_dependency_and_their_requirements():
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    lines = [ln for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    # exact pins only, a few with an environment marker (async-timeout: redis needs it before 3.11.3)
    assert all(
        re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+( ; python_full_version < \"[0-9.]+\")?", ln)
        for ln in lines
    )
    locked = {_name(ln) for ln in lines}
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {_name(r) for r in runtime} <= locked
    assert not {_name(d) for d in DEV_ONLY} & locked, "dev tools stay out of the image"
    env = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11", "extra": ""}
    for pkg in sorted(locked):  # closed under requirements (as this environment's metadata states them)
        try:
            reqs = requires(pkg) or []
        except PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate(env):
                assert _name(r.name) in locked, f"{pkg} needs {r.name}, which requirements.lock does not pin"


def test_the_image_ships_the_compiled_build():
    """LLMGW_COMPILE=1 by default, the compiler in the build stage only (the runtime stage copies the venv)."""
    build = STAGES[0]
    assert "LLMGW_COMPILE=1" in build.all("ARG")
    assert any(r.startswith("LLMGW_COMPILE=$LLMGW_COMPILE pip install --no-deps .") for r in build.all("RUN"))
    assert any("gcc" in r for r in build.all("RUN"))
    assert not any("gcc" in r for r in FINAL.all("RUN"))
    # what the compiled build needs is in the build context: setup.py and the build backend
    copied = " ".join(build.all("COPY"))
    assert "setup.py" in copied and "scripts/compile" in copied

"""The build backend: setuptools', plus mypy as a build requirement when LLMGW_COMPILE=1 asks for the
compiled build (setup.py), and a refusal to compile an editable install."""

import os
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517 interface, unchanged)

# the compiler: pinned, so that a given source always compiles to the same code
MYPYC = "mypy==2.4.1"


def _compiling() -> bool:
    return os.environ.get("LLMGW_COMPILE") == "1"


def _editable_allowed() -> None:
    if _compiling():
        raise RuntimeError(
            "LLMGW_COMPILE=1 with an editable install: compiled modules would shadow the .py files being "
            "edited; compile with `pip install .`, develop without LLMGW_COMPILE"
        )


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if _compiling():
        # setuptools' own answer runs setup.py, which needs mypyc to run at all; setuptools itself (>= 70.1)
        # needs nothing more than the [build-system] requirements
        return [MYPYC]
    return build_meta.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    _editable_allowed()
    return build_meta.get_requires_for_build_editable(config_settings)


def build_editable(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    _editable_allowed()
    return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)

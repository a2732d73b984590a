"""What a config's models say about each other: names defined twice, fallbacks to nothing, to themselves or
round in a loop, deployment ids used twice.

It reads the plain data (YAML after ``${VAR}`` expansion and inheritance), not the validated models, so it
runs when a field elsewhere in the file is wrong too: ``check-config`` reports every problem at once. Any
part of the wrong type is skipped here; the field validation names it.
"""

from __future__ import annotations

from typing import Any

from gateway.policy.fallback import find_fallback_cycle


def reference_problems(models: Any) -> list[str]:
    """Each problem as "key.path: why", in file order; the fallback loop, if any, last."""
    if not isinstance(models, list):
        return []
    entries = [m if isinstance(m, dict) else {} for m in models]
    names = [m.get("name") if isinstance(m.get("name"), str) else None for m in entries]
    problems: list[str] = []
    first_of: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if name in first_of:
            problems.append(f"models[{i}].name: model {name!r} is defined twice")
        else:
            first_of[name] = i
    graph: dict[str, list[str]] = {}
    owner_of: dict[str, int] = {}  # deployment id -> index of the model that has it first
    for i, m in enumerate(entries):
        name = names[i]
        fallbacks = _list(m.get("fallbacks"))
        problems += _fallback_problems(i, name, fallbacks, first_of)
        if name is not None and first_of[name] == i:
            graph[name] = [fb for fb in fallbacks if isinstance(fb, str)]
        deployments = _list(m.get("deployments"))
        for j, d in enumerate(deployments):
            dep_id = d.get("id") if isinstance(d, dict) else None
            if not isinstance(dep_id, str):
                continue
            owner = owner_of.setdefault(dep_id, i)
            if owner != i or _seen_before(deployments, j, dep_id):
                by = "this model" if owner == i else f"model {names[owner]!r}"
                problems.append(
                    f"models[{i}].deployments[{j}].id: {dep_id!r} is already used by {by}; ids name "
                    "metrics and shared state, so they must be unique"
                )
    cycle = find_fallback_cycle(graph)
    if cycle:
        problems.append("fallbacks: loop " + " -> ".join(cycle))
    return problems


def _fallback_problems(i: int, name: str | None, fallbacks: list[Any], first_of: dict[str, int]) -> list[str]:
    problems = []
    for j, fb in enumerate(fallbacks):
        if not isinstance(fb, str):
            continue
        where = f"models[{i}].fallbacks[{j}]"
        if fb == name:
            problems.append(f"{where}: a model cannot fall back to itself")
        elif fb not in first_of:
            problems.append(f"{where}: {fb!r} is not a configured model")
        elif fb in fallbacks[:j]:
            problems.append(f"{where}: {fb!r} is listed twice")
    return problems


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _seen_before(deployments: list[Any], j: int, dep_id: str) -> bool:
    return any(isinstance(d, dict) and d.get("id") == dep_id for d in deployments[:j])

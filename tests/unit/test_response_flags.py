"""Every response flag the gateway can log is explained in the runbook, and flags stay unique short names."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.flags import ResponseFlag

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_response_flag_is_in_the_runbooks_table() -> None:
    rows = [line for line in RUNBOOK.read_text().splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z]{2,4})`", row.split("|")[1])}
    missing = [f.value for f in ResponseFlag if f.value not in documented]
    assert not missing, f"flags without a row in docs/operations.md (Response flags): {missing}"


def test_flags_are_distinct_short_upper_case_names() -> None:
    values = [f.value for f in ResponseFlag]
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[A-Z]{2,4}", v) for v in values)
    assert ",".join([ResponseFlag.RETRY_LIMIT_EXCEEDED, ResponseFlag.CLIENT_GONE]) == "URX,DC"  # as logged

"""The access log writes each line as its request ends, and a stalled pipe reader never blocks the writer."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import orjson

from gateway.telemetry.accesslog import AccessLog

REC = orjson.loads(
    Path(__file__).with_name("fixtures").joinpath("access_log.jsonl").read_bytes().splitlines()[0]
)


def test_a_line_is_in_the_file_when_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path), "json", 1024, lambda: None)
    log.start()
    try:
        for i in range(3):
            log.write({**REC, "request_id": f"r{i}"})
            assert (
                orjson.loads(path.read_bytes().splitlines()[-1])["request_id"] == f"r{i}"
            )  # no loop, no wait
    finally:
        log.close()


def test_a_stalled_pipe_reader_does_not_block_and_loses_nothing() -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: a one-page pipe, full after four lines
    drops: list[int] = []
    log = AccessLog(f"/proc/self/fd/{w}", "json", 1024, lambda: drops.append(1))
    log.start()
    writer = threading.Thread(target=lambda: [log.write({**REC, "request_id": f"r{i}"}) for i in range(200)])
    writer.start()
    writer.join(10)
    assert not writer.is_alive()  # 200 KB into a 4 KB pipe nobody reads: write() never waited
    os.close(w)
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(b) for b in iter(lambda: os.read(r, 65536), b"")])
    reader.start()
    log.close(timeout=10)  # the writer thread drains the rest once the reader reads
    reader.join(10)
    assert [orjson.loads(line)["request_id"] for line in bytes(out).splitlines()] == [
        f"r{i}" for i in range(200)
    ]
    assert drops == []


def test_a_request_refused_at_the_door_is_logged_with_every_field_an_answered_one_has():
    """The documented schema is one: a 405 or 415 record lacked retry_verdict, which every other record has."""
    from scripted_upstream import OK, Playbook, Reply, model, play

    from gateway.api.asgi import rejected_record
    from gateway.errors import method_not_allowed
    from gateway.telemetry.accesslog import FIELDS

    async def answered() -> dict:
        pb = Playbook([model("m", "a")], lambda req: Reply.json(OK))
        return await pb.finish(pb.call("m"))

    assert list(play(answered)) == list(FIELDS)
    refused = rejected_record(
        wall=0.0,
        request_id="r",
        method="GET",
        path="/v1/chat/completions",
        err=method_not_allowed("GET", "POST"),
        duration_ms=0.1,
        bytes_sent=10,
        headers={},
        client=None,
    )
    assert list(refused) == list(FIELDS) and refused["retry_verdict"] is None

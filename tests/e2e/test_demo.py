"""The embedded default: `llmgw serve` with no config serves the demo on simulated providers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from harness import HTTP, free_port


@pytest.fixture
def demo():
    port = free_port()
    # the demo writes access.log in its directory; LLMGW_ACCESS_LOG=- asks for stdout (tests/e2e/test_readme.py
    # runs the file-writing `make run` as the README says)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LLMGW_ACCESS_LOG": "-"},
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            if HTTP.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except Exception:
            time.sleep(0.1)
    yield url, proc
    proc.terminate()
    proc.wait(15)


def test_demo_answers_the_openai_sdk_at_once(demo):
    from openai import OpenAI

    url, proc = demo
    client = OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo-chat", "demo-fast", "demo-embed"]
    r = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("sim-")
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        if c.choices
    )
    assert text.startswith("sim-")
    assert len(client.embeddings.create(model="demo-embed", input="x").data[0].embedding) > 0
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    assert len(lines) >= 3  # the access log goes to stdout when asked
    assert '"route_reason":"local"' in out.decode() or '"route_reason":"only-choice"' in out.decode()

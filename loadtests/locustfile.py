"""Realistic mixed traffic for any OpenAI-compatible deployment of the gateway (or anything else).

    pip install locust
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080
    LLMGW_MODELS="chat:3,chat-small:1" LLMGW_API_KEY=sk-... locust -f loadtests/locustfile.py \\
        --host https://gateway.example.com --headless -u 50 -r 5 -t 5m

The mix, per simulated user: chat completions, a share streamed (TTFT reported as its own metric),
a share with a ``json_schema`` response_format drawn from a small recurring set (as real apps do),
several models with weights, prompts from one-liners to multi-turn conversations with a few KB of
context, and a think time between requests. Knobs (environment):

    LLMGW_MODELS            comma list of models, optional :weight each   (default demo-chat)
    LLMGW_API_KEY           bearer token sent to the gateway                 (default anything)
    LLMGW_STREAM_SHARE      share of streamed requests                       (default 0.6)
    LLMGW_STRUCTURED_SHARE  share of requests with a json_schema format      (default 0.2)
    LLMGW_MAX_TOKENS        max_tokens per request                           (default 64)
    LLMGW_THINK_S           think time range "min,max" in seconds            (default 0.5,2)
    LLMGW_TIMEOUT_MS        sent as x-gateway-timeout-ms when set            (default unset)
    LLMGW_CHECK_JSON        1: fail structured answers whose content is not JSON (real providers;
                            simulated ones send filler text)                 (default 0)

Locust is not a dependency of the project; this file is only loaded by locust.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

try:
    from locust import HttpUser, between, task
except ImportError as exc:  # locust is installed by whoever runs the load test, not by the project
    raise SystemExit("loadtests/locustfile.py needs locust: pip install locust") from exc


def _models(spec: str) -> tuple[list[str], list[float]]:
    names, weights = [], []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name:
            names.append(name)
            weights.append(float(weight) if weight else 1.0)
    return names or ["demo-chat"], weights or [1.0]


MODELS, MODEL_WEIGHTS = _models(os.environ.get("LLMGW_MODELS", "demo-chat"))
API_KEY = os.environ.get("LLMGW_API_KEY", "anything")
STREAM_SHARE = float(os.environ.get("LLMGW_STREAM_SHARE", "0.6"))
STRUCTURED_SHARE = float(os.environ.get("LLMGW_STRUCTURED_SHARE", "0.2"))
MAX_TOKENS = int(os.environ.get("LLMGW_MAX_TOKENS", "64"))
THINK_MIN, THINK_MAX = (float(x) for x in os.environ.get("LLMGW_THINK_S", "0.5,2").split(",", 1))
TIMEOUT_MS = os.environ.get("LLMGW_TIMEOUT_MS")
CHECK_JSON = os.environ.get("LLMGW_CHECK_JSON", "0") == "1"

SYSTEM = "You are a concise assistant for a support team. Answer in at most three sentences."
QUESTIONS = [
    "Say hello in a few words.",
    "How do I reset my password?",
    "Summarise the conversation so far in one sentence.",
    "What are the opening hours of the Berlin office?",
    "Translate 'the invoice is overdue' into French and German.",
    "List three causes of slow page loads.",
]
CONTEXT = " ".join(
    f"Ticket {i}: customer reports intermittent timeouts when exporting reports." for i in range(40)
)

# A small recurring set, like an application's own schemas (gateways can learn and pre-warm these).
SCHEMAS: list[dict[str, Any]] = [
    {
        "name": "intent",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["intent", "confidence"],
            "properties": {
                "intent": {"type": "string", "enum": ["billing", "login", "bug", "other"]},
                "confidence": {"type": "number"},
            },
        },
    },
    {
        "name": "ticket",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["title", "priority", "tags"],
            "properties": {
                "title": {"type": "string"},
                "priority": {"type": "string", "enum": ["low", "high"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
    {
        "name": "sentiment",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["label"],
            "properties": {"label": {"type": "string", "enum": ["positive", "neutral", "negative"]}},
        },
    },
]


def messages(rng: random.Random) -> list[dict[str, str]]:
    """One-liners, multi-turn conversations, and requests carrying a few KB of context."""
    kind = rng.random()
    msgs = [{"role": "system", "content": SYSTEM}]
    if kind < 0.5:
        msgs.append({"role": "user", "content": rng.choice(QUESTIONS)})
    elif kind < 0.85:
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": rng.choice(QUESTIONS)})
            msgs.append({"role": "assistant", "content": "Here is a short answer to that question."})
        msgs.append({"role": "user", "content": rng.choice(QUESTIONS)})
    else:
        msgs.append({"role": "user", "content": f"Context:\n{CONTEXT}\n\nQuestion: {rng.choice(QUESTIONS)}"})
    return msgs


class ChatUser(HttpUser):
    """One application user: a chat request, think, repeat."""

    wait_time = between(THINK_MIN, THINK_MAX)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.client.headers.update({"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})

    def _body(self) -> tuple[dict[str, Any], str]:
        model = self.rng.choices(MODELS, MODEL_WEIGHTS)[0]
        body: dict[str, Any] = {"model": model, "messages": messages(self.rng), "max_tokens": MAX_TOKENS}
        kind = "chat"
        if self.rng.random() < STRUCTURED_SHARE:
            body["response_format"] = {"type": "json_schema", "json_schema": self.rng.choice(SCHEMAS)}
            kind = "structured"
        return body, f"{kind} [{model}]"

    def _headers(self) -> dict[str, str]:
        headers = {"x-request-id": uuid.uuid4().hex}
        if TIMEOUT_MS:
            headers["x-gateway-timeout-ms"] = TIMEOUT_MS
        return headers

    @task
    def chat(self) -> None:
        body, name = self._body()
        if self.rng.random() < STREAM_SHARE:
            self._stream(body, f"{name} stream")
        else:
            self._json(body, f"{name} json")

    def _json(self, body: dict[str, Any], name: str) -> None:
        with self.client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            headers=self._headers(),
            name=name,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                choice = resp.json()["choices"][0]
            except (ValueError, KeyError, IndexError):
                resp.failure("not a chat completion")
                return
            if (
                CHECK_JSON
                and "response_format" in body
                and not _is_json(choice.get("message", {}).get("content"))
            ):
                resp.failure("structured output is not JSON")

    def _stream(self, body: dict[str, Any], name: str) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft_ms: float | None = None
        done = False
        with self.client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            headers=self._headers(),
            name=name,
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    if ttft_ms is None and b'"content"' in data and _has_content(data):
                        ttft_ms = (time.perf_counter() - t0) * 1000.0
            except OSError as exc:
                resp.failure(f"stream broke: {exc}")
                return
            if not done:
                resp.failure("stream ended without [DONE]")
                return
        if ttft_ms is not None:
            # time to first token as its own row in locust's statistics
            self.environment.events.request.fire(
                request_type="TTFT",
                name=name,
                response_time=ttft_ms,
                response_length=0,
                exception=None,
                context={},
            )


def _has_content(data: bytes) -> bool:
    try:
        choices = json.loads(data).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


def _is_json(text: str | None) -> bool:
    if not text:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

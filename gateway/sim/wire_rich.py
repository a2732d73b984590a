"""Wire shapes of scripted answers (content.py): several choices, tool calls, JSON, stop, logprobs.

The plain token answer keeps its byte-template shapes in wire.py (the fast path load tests measure);
these build each event with orjson, which is plenty for the requests that ask for more.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sim.content import Choice, ContentAsk, Part, script
from gateway.sim.stats import Endpoint
from gateway.sim.wire import DONE, Answer, ChatShape, ResponsesShape, Shape


def rich_shape(
    endpoint: Endpoint, answer: Answer, ask: ContentAsk, tokens: int, cap: int | None
) -> tuple[Shape, int]:
    """(shape, stream steps) of a scripted answer: the steps replace the token count in the latency model."""
    choices = script(ask, answer.sim, answer.serial, tokens, cap)
    if endpoint is Endpoint.RESPONSES:
        responses = RichResponsesShape(answer, choices[0], cap)
        return responses, responses.steps
    chat = RichChatShape(answer, choices, ask.logprobs, ask.top_logprobs)
    return chat, chat.steps


def _logprob(i: int) -> float:
    return -round(0.01 * (1 + i % 7), 4)


def logprobs_of(pieces: list[str], start: int, top: int) -> list[dict[str, Any]]:
    out = []
    for i, piece in enumerate(pieces, start):
        lp = _logprob(i)
        alts = [{"token": piece, "logprob": lp, "bytes": list(piece.encode())}]
        alts += [
            {"token": f"alt{j}", "logprob": round(lp - j, 4), "bytes": list(f"alt{j}".encode())}
            for j in range(1, top)
        ]
        out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts[:top]})
    return out


class RichChatShape(ChatShape):
    def __init__(self, answer: Answer, choices: list[Choice], logprobs: bool, top_logprobs: int) -> None:
        super().__init__(answer)
        self.choices = choices
        self.logprobs = logprobs
        self.top = top_logprobs
        self._steps = [c.steps() for c in choices]
        self.steps = max((len(s) for s in self._steps), default=0)
        self._head: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": answer.model,
            "system_fingerprint": "fp_sim",
        }

    def usage(self) -> dict[str, Any]:
        u = super().usage()
        done = sum(c.tokens for c in self.choices)
        u["completion_tokens"] = done
        u["total_tokens"] = u["prompt_tokens"] + done
        return u

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk = {**self._head, "choices": choices}
        if self.a.include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def body(self) -> bytes:
        a = self.a
        out = []
        for c in self.choices:
            calls = [
                {
                    "id": p.call_id,
                    "type": "function",
                    "function": {"name": p.tool, "arguments": "".join(p.pieces)},
                }
                for p in c.parts
                if p.tool is not None
            ]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": c.text(),
                "refusal": None,
                "annotations": [],
            }
            if calls:
                message["tool_calls"] = calls
            lp = None
            if self.logprobs:
                text = [p for p in c.parts if p.tool is None]
                lp = {"content": logprobs_of(text[0].pieces, 0, self.top) if text else None, "refusal": None}
            out.append(
                {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": a.created,
                "model": a.model,
                "choices": out,
                "usage": self.usage(),
                "service_tier": "default",
                "system_fingerprint": "fp_sim",
            }
        )

    def preface(self) -> bytes:
        return b"".join(
            self._chunk(
                [
                    {
                        "index": c.index,
                        "delta": {
                            "role": "assistant",
                            "content": "" if c.text() is not None else None,
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for c in self.choices
        )

    def tokens(self, start: int, stop: int) -> bytes:
        out = []
        for step in range(start, stop):
            for c, steps in zip(self.choices, self._steps, strict=True):
                if step < len(steps):
                    part, i = steps[step]
                    out.append(self._chunk([self._delta(c, part, i)]))
        return b"".join(out)

    def _delta(self, c: Choice, part: Part, i: int) -> dict[str, Any]:
        piece = part.pieces[i]
        if part.tool is None:
            lp = {"content": logprobs_of([piece], i, self.top), "refusal": None} if self.logprobs else None
            return {"index": c.index, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}
        call: dict[str, Any] = {"index": c.parts.index(part), "function": {"arguments": piece}}
        if i == 0:
            call = {
                "index": call["index"],
                "id": part.call_id,
                "type": "function",
                "function": {"name": part.tool, "arguments": piece},
            }
        return {"index": c.index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}

    def closing(self) -> bytes:
        out = b"".join(
            self._chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
            for c in self.choices
        )
        if self.a.include_usage:
            out += b"data: " + orjson.dumps({**self._head, "choices": [], "usage": self.usage()}) + b"\n\n"
        return out + DONE


class RichResponsesShape(ResponsesShape):
    """The Responses API answering with a JSON text or function calls (the first choice's parts)."""

    def __init__(self, answer: Answer, choice: Choice, max_output_tokens: int | None) -> None:
        super().__init__(answer, max_output_tokens)
        self.choice = choice
        self._steps = choice.steps()
        self.steps = len(self._steps)
        self._seq = 2  # response.created and response.in_progress come first
        a = answer
        self._ids = [
            (f"fc_{a.sim}_{a.serial}_{j}" if p.tool is not None else self.item_id)
            for j, p in enumerate(choice.parts)
        ]

    def _item(self, j: int, done: bool) -> dict[str, Any]:
        part = self.choice.parts[j]
        status = "completed" if done else "in_progress"
        if part.tool is None:
            content = [
                {"type": "output_text", "text": "".join(part.pieces), "annotations": [], "logprobs": []}
            ]
            return {
                "id": self._ids[j],
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content if done else [],
            }
        return {
            "id": self._ids[j],
            "type": "function_call",
            "status": status,
            "call_id": part.call_id,
            "name": part.tool,
            "arguments": "".join(part.pieces) if done else "",
        }

    def response(self, done: bool) -> dict[str, Any]:
        r = super().response(done)
        a = self.a
        r["output"] = [self._item(j, True) for j in range(len(self.choice.parts))] if done else []
        if done:
            out = sum(len(p.pieces) for p in self.choice.parts)
            r["usage"]["output_tokens"] = out
            r["usage"]["total_tokens"] = a.prompt_tokens + out
            incomplete = self.choice.finish_reason == "length"
            r["status"] = "incomplete" if incomplete else "completed"
            r["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        return r

    def _next(self, kind: str, data: dict[str, Any]) -> bytes:
        seq, self._seq = self._seq, self._seq + 1
        return self._event(kind, seq, data)

    def preface(self) -> bytes:
        return b""

    def tokens(self, start: int, stop: int) -> bytes:
        out = []
        for step in range(start, stop):
            part, i = self._steps[step]
            j = self.choice.parts.index(part)
            where = {"item_id": self._ids[j], "output_index": j}
            if i == 0:
                out.append(
                    self._next(
                        "response.output_item.added", {"output_index": j, "item": self._item(j, False)}
                    )
                )
                if part.tool is None:
                    out.append(
                        self._next(
                            "response.content_part.added",
                            {
                                **where,
                                "content_index": 0,
                                "part": {
                                    "type": "output_text",
                                    "text": "",
                                    "annotations": [],
                                    "logprobs": [],
                                },
                            },
                        )
                    )
            if part.tool is None:
                out.append(
                    self._next(
                        "response.output_text.delta",
                        {**where, "content_index": 0, "delta": part.pieces[i], "logprobs": []},
                    )
                )
            else:
                out.append(
                    self._next("response.function_call_arguments.delta", {**where, "delta": part.pieces[i]})
                )
            if i == len(part.pieces) - 1:
                out.append(self._part_done(j, part, where))
        return b"".join(out)

    def _part_done(self, j: int, part: Part, where: dict[str, Any]) -> bytes:
        text = "".join(part.pieces)
        if part.tool is None:
            done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            head = self._next(
                "response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []}
            ) + self._next("response.content_part.done", {**where, "content_index": 0, "part": done})
        else:
            head = self._next("response.function_call_arguments.done", {**where, "arguments": text})
        return head + self._next(
            "response.output_item.done", {"output_index": j, "item": self._item(j, True)}
        )

    def closing(self) -> bytes:
        return self._next("response.completed", {"response": self.response(True)})

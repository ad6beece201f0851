"""The API's answers as plain values: OpenAI's response and chunk shapes, the `routing` object every
answer carries, and `Answer` / `Stream` (app.py turns them into JSON and event-stream responses)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from temporal_lora.model import RouteDecision
from temporal_lora.server.live import Unit
from temporal_lora.server.metrics import Metrics


@dataclass
class Answer:
    """A whole JSON answer and its headers (X-Route, X-Bundle-Version)."""

    body: dict
    headers: dict[str, str]


@dataclass
class Stream:
    """An answer as server-sent events (each item one `data: ...` event); `close` must run however
    the stream ends (finished, failed, or the client gone before the first event)."""

    events: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]
    headers: dict[str, str]


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


def routing_info(metrics: Metrics, unit: Unit, model: str, forced: str | None, mode: str,
                 decision: RouteDecision | None, weights: dict[str, float] | None, count: bool = True,
                 style: dict | None = None) -> dict:
    """The `routing` object of an answer; `count` also counts the decision in the metrics.

    `answered_by` names what generated the answer: "base" (the plain base model: forced, or the
    router abstained), else the adapter with a non-zero weight (several joined by '+', largest
    weight first, in soft/top-k mixes). An abstention also carries a `note` saying why."""
    chosen = forced if forced else (decision.domain if decision and decision.domain else "base")
    abstained = bool(decision and decision.abstained)
    info = {"model": model, "domain": chosen, "mode": "forced" if forced else mode, "routed": forced is None,
            "abstained": abstained, "answered_by": answered_by(chosen, weights, abstained),
            "confidence": None, "probs": None, "weights": weights, "bundle_version": unit.version}
    if style is not None:  # routing/styles.py StyleChoice: requested, style used, note
        info["style"] = style
    if decision is not None:
        info.update(confidence=decision.confidence, probs=decision.probs)
    if abstained:
        tl = getattr(unit, "tl", None)
        threshold = tl.router_config.abstain_threshold if tl is not None else None
        info["note"] = abstain_note(decision.confidence, threshold)
    if count:
        metrics.routes.labels(chosen, "routed" if forced is None else "forced").inc()
        if info["abstained"]:
            metrics.abstentions.inc()
    return info


def answered_by(chosen: str, weights: dict[str, float] | None, abstained: bool) -> str:
    """"base" or the adapter(s) that answer (see routing_info)."""
    if abstained or chosen == "base":
        return "base"
    used = sorted(((w, n) for n, w in (weights or {}).items() if w > 0), key=lambda x: -x[0])
    return "+".join(n for _, n in used) if used else chosen


def abstain_note(confidence: float, threshold: float | None) -> str:
    """Why the base model answered an abstained request."""
    below = f" below the abstain threshold {threshold:.3f}" if threshold is not None else " below the abstain threshold"
    return f"no domain matched: router confidence {confidence:.3f} is{below}; the base model answered"


def route_answer(rows: list[dict], version: int) -> Answer:
    """POST /v1/route's answer: one row per input text."""
    data = [{"index": i, **row, "bundle_version": version} for i, row in enumerate(rows)]
    return Answer({"object": "list", "data": data},
                  {"X-Route": ",".join(dict.fromkeys(r["domain"] or "base" for r in rows)),
                   "X-Bundle-Version": str(version)})


class Reply:
    """OpenAI's response shapes for one request: `kind` 'text' (completions) or 'chat'."""

    def __init__(self, kind: str, model: str, routes: list[dict], prompt_tokens: int, version: int):
        self.kind, self.model, self.routes, self.prompt_tokens = kind, model, routes, prompt_tokens
        self.version = version
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.chunk_object = "text_completion" if kind == "text" else "chat.completion.chunk"

    def headers(self) -> dict[str, str]:
        return {"X-Route": ",".join(dict.fromkeys(r["domain"] for r in self.routes)),
                "X-Bundle-Version": str(self.version)}

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def body(self, texts: list[str], reasons: list[str | None], counts: list[int]) -> dict:
        """The whole (non-streamed) answer."""
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            choice = {"index": i, "finish_reason": reason, "routing": self.routes[i]}
            if self.kind == "text":
                choice.update(text=text, logprobs=None)
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choices.append(choice)
        return {"id": self.id, "object": "text_completion" if self.kind == "text" else "chat.completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage(sum(counts)), "routing": self.routes[0]}

    def chunk(self, index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
        """One streamed event of choice `index`; the `first` one carries its routing."""
        if self.kind == "text":
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        else:
            content = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [choice]}
        if first:
            payload["routing"] = self.routes[index]
        return sse(payload)

    def usage_chunk(self, completion_tokens: int) -> str:
        """The final event of a stream with stream_options.include_usage."""
        return sse({"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                    "choices": [], "usage": self._usage(completion_tokens)})

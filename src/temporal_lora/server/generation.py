"""Local generation: a prepared request's jobs go to its bundle version's batching engine; the
engine's events become one JSON answer or a stream of OpenAI chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from temporal_lora.server.admission import Admission
from temporal_lora.server.answers import Answer, Reply, Stream, routing_info, sse
from temporal_lora.server.engine import Job, Route, Sampling
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.validation import Prepared, RequestChecks


class Call:
    """One API request's jobs. Engine events arrive on an asyncio queue; the concurrency slot is
    released when every job has ended, even if the client went away before reading anything."""

    def __init__(self, release: Callable[[], None]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.open = 0
        self._release = release

    def job(self, prompt_ids: list[int], route: Route, sampling: Sampling) -> Job:
        index = len(self.jobs)

        def emit(*event):
            try:
                self.loop.call_soon_threadsafe(self._event, index, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = Job(prompt_ids, route, sampling, emit)
        self.jobs.append(job)
        self.open += 1
        return job

    def _event(self, index: int, event: tuple) -> None:
        self.queue.put_nowait((index, event))
        if event[0] in ("done", "error"):
            self.open -= 1
            if self.open == 0:
                self._release()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


class Generator:
    """Runs prepared requests on the local engine of the bundle version each was admitted on."""

    def __init__(self, checks: RequestChecks, admission: Admission, metrics: Metrics):
        self.checks, self.admission, self.metrics = checks, admission, metrics

    async def generate(self, p: Prepared) -> Answer | Stream:
        """Submit n jobs per prompt to the unit's engine; answer whole or as an event stream."""
        req, unit = p.req, p.unit
        forced = self.checks.resolve_model(req.model, unit)
        mode = self.checks.mode(req)
        release = self.admission.admit(unit)
        call = Call(release)
        sources: list[dict] | None = None  # the passages a grounded answer cites
        prompt_ids = p.prompt_ids
        try:
            sampling = [self.checks.sampling(req, p.max_new, i) for i in range(req.n)]
            if p.kind == "chat" and unit.tl.grounding:  # a bundle that grounds says what each answer cites
                sources = []
                if self.checks.grounds(p):
                    # The passages depend on the route, so the router runs here first; the engine routes the
                    # same ids again when it batches the job, which is deterministic: the same decision.
                    grounded_ids, sources = await asyncio.to_thread(self.checks.ground, p, forced)
                    prompt_ids = [grounded_ids]
            for prompt, ids in zip(prompt_ids, p.route_ids, strict=True):
                # style 'auto' reads the prompt's register, also when the domain is forced
                route = Route(domain=forced, route_ids=None if forced and req.style != "auto" else ids, mode=mode,
                              top_k=req.top_k, style=req.style)
                for s in sampling:
                    unit.engine.submit(call.job(prompt, route, s))
        except BaseException:
            call.cancel()
            release()
            raise
        started = time.perf_counter()
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        k = len(call.jobs)
        routes: list[dict | None] = [None] * k
        early: list[tuple[int, tuple]] = []
        try:  # the engine reports each route before any text: it goes into the X-Route header
            while any(r is None for r in routes):
                index, event = await call.queue.get()
                if event[0] == "route":  # metrics count one route per prompt, not per choice
                    routes[index] = routing_info(self.metrics, unit, req.model, forced, mode, event[1], event[2],
                                                 count=index % req.n == 0, style=event[3])
                    if sources is not None:
                        routes[index] |= {"grounded": bool(sources), "sources": sources}
                elif event[0] == "error":
                    raise event[1]
                else:
                    early.append((index, event))
        except BaseException:
            call.cancel()
            raise
        reply = Reply(p.kind, req.model, routes, prompt_tokens, unit.version)

        async def events() -> AsyncIterator[tuple[int, tuple]]:
            remaining = k - sum(1 for _, e in early if e[0] == "done")
            for item in early:
                yield item
            while remaining:
                index, event = await call.queue.get()
                if event[0] == "error":
                    raise event[1]
                remaining -= event[0] == "done"
                yield index, event

        def finished(completion_tokens: int) -> None:
            self.metrics.tokens.labels("completion").inc(completion_tokens)
            self.metrics.latency.labels(p.endpoint).observe(time.perf_counter() - started)

        if not req.stream:
            texts, reasons, counts = [""] * k, [None] * k, [0] * k
            try:
                async for index, event in events():
                    if event[0] == "text":
                        texts[index] += event[1]
                    elif event[0] == "done":
                        reasons[index], counts[index] = event[1], event[2]
            finally:
                call.cancel()
            finished(sum(counts))
            return Answer(reply.body(texts, reasons, counts), reply.headers())

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            total, first_text = 0, True
            try:
                for i in range(k):
                    yield reply.chunk(i, None, None, first=True)
                async for index, event in events():
                    if event[0] == "text":
                        if first_text:
                            self.metrics.first_token.observe(time.perf_counter() - started)
                            first_text = False
                        yield reply.chunk(index, event[1], None)
                    elif event[0] == "done":
                        total += event[2]
                        yield reply.chunk(index, None, event[1])
                if include_usage:
                    yield reply.usage_chunk(total)
                yield "data: [DONE]\n\n"
                finished(total)
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})

        async def close() -> None:
            call.cancel()  # a client that went away frees its batch row at the next decoding step

        return Stream(stream(), close, reply.headers())

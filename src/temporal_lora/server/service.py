"""What the API does for a request: validate it, route it, generate (locally or on a backend engine)
and shape the answer in OpenAI's format, plain or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi.responses import JSONResponse

from temporal_lora.errors import InputError
from temporal_lora.model import RouteDecision, TemporalLoRA
from temporal_lora.routing.segments import SegmentConfig
from temporal_lora.server.engine import Engine, Job, Route, Sampling
from temporal_lora.server.forward import Backend, BackendError
from temporal_lora.server.live import ADAPTER_NAME, Live, ReloadError, Unit, log
from temporal_lora.server.llamacpp_engine import make_engine
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.schemas import ChatRequest, CompletionRequest, SamplingFields
from temporal_lora.server.transport import APIError, EventStream
from temporal_lora.text import tokenize

# The router reads the newest user turns of a chat, back to about this many tokens, so a later turn
# can switch domain while a short follow-up ("and the dose?") keeps the conversation's domain.
CHAT_ROUTE_TOKENS = 64
MAX_STOPS = 4
MAX_SEQUENCES = 32  # prompts x n in one request


@dataclass
class ServerSettings:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    default_max_tokens: int = 128
    max_body_bytes: int = 1_000_000
    max_concurrency: int = 32  # generation requests accepted at once (queued or running)
    max_batch: int = 8
    routing_mode: str = "hard"
    api_key: str | None = None
    backend_url: str | None = None  # forward generation to this OpenAI-compatible engine
    backend_api_key: str | None = None
    backend_base_model: str = "base"  # the engine's name for the plain base model
    backend_timeout_s: float = 600.0
    # After a reload, tell the engine about new/removed adapters: "vllm" = its /v1/load_lora_adapter and
    # /v1/unload_lora_adapter (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or tlora serve
    # --runtime-lora-updates); "off" = the engine already serves every domain by name.
    backend_lora_updates: str = "vllm"
    reload_poll_s: float = 2.0  # poll the bundle's manifest.json this often (0 = only POST /admin/reload)
    runtime_lora_updates: bool = False  # offer /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM does)
    # Local generation: "torch" (the reference), "llama-cpp" (the cpu-engine extra; server/llamacpp_engine.py)
    # or "auto" (llama-cpp at max_batch 1 when installed and the base is a Llama, else torch;
    # llamacpp_engine.make_engine); its weights and threads.
    engine: str = "torch"
    engine_weights: str = "f32"
    engine_threads: int = 1


class _Call:
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


class Service:
    """Every request runs on the bundle version (`Unit`) that was live when it was admitted."""

    def __init__(self, tl: TemporalLoRA, settings: ServerSettings, *, bundle: str | Path | None = None,
                 loader: Callable[[Path], TemporalLoRA] | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.backend = None
        if settings.backend_url:
            self.backend = Backend(settings.backend_url, api_key=settings.backend_api_key,
                                   timeout=settings.backend_timeout_s)
        tell = self.backend is not None and settings.backend_lora_updates == "vllm"
        # Forwarding generates elsewhere: the local engine only routes, so it stays the torch one.
        engine = partial(make_engine, choice="torch" if self.backend else settings.engine,
                         weights=settings.engine_weights, n_threads=settings.engine_threads)
        self.live = Live(tl, self.metrics, max_batch=settings.max_batch, bundle=bundle,
                         loader=loader or TemporalLoRA.from_pretrained,
                         prepare=self._engine_loads if tell else None, on_free=self._engine_unloads if tell else None,
                         make_engine=engine)
        self.in_flight = 0
        self._watcher: asyncio.Task | None = None

    @property
    def tl(self) -> TemporalLoRA:
        return self.live.unit.tl

    @property
    def engine(self) -> Engine:
        return self.live.unit.engine

    @property
    def model_ids(self) -> list[str]:
        return self.live.unit.model_ids

    async def start(self) -> None:
        if self.live.bundle is not None and self.settings.reload_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self.live.watch(self.settings.reload_poll_s))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.live.close()
        if self.backend:
            await self.backend.close()

    # ------------------------------------------------------------------ versions
    async def reload(self, force: bool = False) -> dict:
        try:
            return await self.live.reload(force=force)
        except ReloadError as exc:
            raise APIError(409, str(exc), type="reload_refused", code="reload_refused") from exc

    def bundle_info(self) -> dict:
        unit = self.live.unit
        return {"object": "bundle", **unit.describe(), "versions_alive": [u.version for u in self.live.units],
                "last_reload_error": self.live.last_error}

    async def load_adapter(self, name: str, path: str) -> str:
        """Our own server as a multi-LoRA engine: vLLM's runtime adapter loading, same request and
        answer. The adapter is loaded beside the live unit and swapped in like a new bundle version."""
        unit = self.live.unit
        if not ADAPTER_NAME.match(name or "") or name in ("auto", "base"):
            raise APIError(400, f"invalid adapter name {name!r}", param="lora_name")
        if name in unit.tl.domains or name in unit.extras:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        folder = Path(path or "")
        if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise APIError(400, f"{path!r} is not a PEFT adapter folder (adapter_config.json and "
                                "adapter_model.safetensors)", param="lora_path")
        await self._reload_extras({**unit.extras, name: str(folder.resolve())})
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, name: str) -> str:
        unit = self.live.unit
        if name not in unit.extras:
            raise APIError(404 if name not in unit.tl.domains else 400,
                           f"The lora adapter '{name}' cannot be found." if name not in unit.tl.domains else
                           f"'{name}' is a domain of the bundle, not a runtime-loaded adapter", param="lora_name")
        await self._reload_extras({k: v for k, v in unit.extras.items() if k != name})
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _reload_extras(self, extras: dict[str, str]) -> None:
        if self.live.bundle is None:
            raise APIError(400, "this server was started without a bundle directory")
        try:
            await self.live.reload(force=True, extras=extras, reason="adapters")
        except ReloadError as exc:
            raise APIError(400, str(exc), param="lora_path") from exc

    async def _engine_loads(self, old: Unit, new: Unit) -> None:
        """Forwarding: before the swap, the engine learns the new version's new or changed adapters."""
        before, after = _adapter_digests(old.manifest), _adapter_digests(new.manifest)
        for domain, digest in after.items():
            if before.get(domain) == digest:
                continue
            if domain in before:  # same name, other weights: replace it
                await self._engine_call("/unload_lora_adapter", {"lora_name": domain}, missing_ok=True)
            path = (self.live.bundle / new.manifest["adapters"][domain]["path"]).resolve()
            await self._engine_call("/load_lora_adapter", {"lora_name": domain, "lora_path": str(path)})
            log.info("engine %s loaded adapter %r", self.backend.url, domain)

    async def _engine_unloads(self, freed: Unit) -> None:
        """Forwarding: once the old version drained, the engine drops adapters no live version uses."""
        live = _adapter_digests(self.live.unit.manifest)
        for domain in _adapter_digests(freed.manifest):
            if domain not in live:
                try:
                    await self._engine_call("/unload_lora_adapter", {"lora_name": domain}, missing_ok=True)
                except BackendError as exc:
                    log.warning("engine %s did not unload adapter %r: %s", self.backend.url, domain, exc)

    async def _engine_call(self, path: str, payload: dict, missing_ok: bool = False) -> None:
        try:
            await self.backend.post(path, payload)
        except BackendError as exc:
            text = str(exc).lower()
            if "already" in text and "loaded" in text:
                return  # the engine serves it already (e.g. started with --lora-modules)
            if missing_ok and exc.status in (400, 404) and ("not found" in text or "cannot be found" in text):
                return
            raise

    # ------------------------------------------------------------------ requests
    async def completions(self, req: CompletionRequest):
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) * req.n > MAX_SEQUENCES:
            raise APIError(400, f"at most {MAX_SEQUENCES} sequences per request (prompts x n)", param="prompt")
        max_new = self._max_new(req.max_tokens)
        unit = self.live.unit  # pinned below, before the first await
        ids = [self.encode(p, "prompt", unit=unit) for p in prompts]
        for p in ids:
            self._check_lengths(p, max_new, unit)
        if self.backend:
            return await self._forward(unit, "/completions", req, prompts, max_new)
        return await self._generate(unit, "text", req, ids, ids, max_new)

    async def chat_completions(self, req: ChatRequest):
        unit = self.live.unit  # pinned below, before the first await
        tl = unit.tl
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if not getattr(tl.tokenizer, "chat_template", None):
            raise APIError(400, f"base model {tl.base_id!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        max_new = self._max_new(req.max_completion_tokens or req.max_tokens)
        prompt = tl.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.encode(prompt, "messages", unit=unit)
        self._check_lengths(prompt_ids, max_new, unit)
        route_text = self._chat_route_text(req, unit)
        if self.backend:
            return await self._forward(unit, "/chat/completions", req, [route_text], max_new)
        return await self._generate(unit, "chat", req, [prompt_ids], [self.encode(route_text, "messages", unit=unit)],
                                    max_new)

    async def route(self, texts: list[str], segments: str | None) -> JSONResponse:
        if not texts:
            raise APIError(400, "input is empty", param="input")
        unit = self.live.unit
        for i, text in enumerate(texts):
            self._check_lengths(self.encode(text, f"input[{i}]", unit=unit), 0, unit)
        config = SegmentConfig.parse(segments) if segments else None
        unit = self.live.pin()
        try:
            rows = await asyncio.to_thread(unit.engine.route_texts, texts, config)
        finally:
            self.live.unpin(unit)
        data = [{"index": i, **row, "bundle_version": unit.version} for i, row in enumerate(rows)]
        return JSONResponse({"object": "list", "data": data},
                            headers={"X-Route": ",".join(dict.fromkeys(r["domain"] or "base" for r in rows)),
                                     "X-Bundle-Version": str(unit.version)})

    # ------------------------------------------------------------------ checks
    def encode(self, text: str, what: str, *, allow_empty: bool = False, unit: Unit | None = None) -> list[int]:
        tl = (unit or self.live.unit).tl
        try:  # unlike TemporalLoRA.encode, a whitespace-only prompt is fine here (as in OpenAI's API)
            ids = tokenize(tl.tokenizer, text, what)
        except InputError as exc:  # e.g. lone surrogates, which JSON can carry
            raise APIError(400, str(exc), param=what) from exc
        if not ids and not allow_empty:
            raise APIError(400, f"{what} is empty", param=what)
        return ids

    def _check_lengths(self, prompt_ids: list[int], max_new: int, unit: Unit) -> None:
        limit = self.settings.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the limit is {limit}",
                           code="context_length_exceeded")
        if len(prompt_ids) + max_new > unit.tl.context_length:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                           f"model's context of {unit.tl.context_length}", code="context_length_exceeded")

    def _max_new(self, requested: int | None) -> int:
        max_new = requested or self.settings.default_max_tokens
        if max_new > self.settings.max_new_tokens:
            raise APIError(400, f"max_tokens {max_new} exceeds the server's limit of {self.settings.max_new_tokens}",
                           param="max_tokens")
        return max_new

    def _sampling(self, req: SamplingFields, max_new: int, index: int) -> Sampling:
        stops = req.stop_list()
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings", param="stop")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                        seed=(seed + index) % 2**63, stop=stops, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty)

    def _resolve_model(self, model: str, unit: Unit) -> str | None:
        """The forced domain ('base' included), or None for 'auto'. Unknown names get a 404."""
        if model == "auto":
            return None
        if unit.serves(model):
            return model
        raise APIError(404, f"model {model!r} does not exist; available: {', '.join(unit.model_ids)}",
                       param="model", code="model_not_found")

    def _chat_route_text(self, req: ChatRequest, unit: Unit) -> str:
        turns = [m.text() for m in req.messages if m.role == "user" and m.text().strip()]
        if not turns:
            raise APIError(400, "messages hold no user message to answer", param="messages")
        picked, tokens = [], 0
        for text in reversed(turns):
            picked.insert(0, text)
            tokens += len(self.encode(text, "messages", allow_empty=True, unit=unit))
            if tokens >= CHAT_ROUTE_TOKENS:
                break
        return "\n".join(picked)

    def _acquire(self, unit: Unit) -> Callable[[], None]:
        """Take a concurrency slot or shed the request with 429, and pin `unit` (the live bundle
        version) until the request ends; returns the (idempotent) release of both."""
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.shed.inc()
            raise APIError(429, f"server busy: {self.settings.max_concurrency} requests are in progress; "
                           "retry shortly", type="rate_limit_error", code="concurrency_limit",
                           headers={"Retry-After": "1"})
        if unit.closed:  # cannot happen: a request takes its unit and pins it with no await between
            raise APIError(503, "the bundle version changed while the request was admitted; retry",
                           type="server_error", headers={"Retry-After": "0"})
        self.in_flight += 1
        self.metrics.in_flight.inc()
        self.live.pin(unit)
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()
                self.live.unpin(unit)

        return release

    # ------------------------------------------------------------------ routing decisions
    def _routing_info(self, unit: Unit, model: str, forced: str | None, mode: str, decision: RouteDecision | None,
                      weights: dict[str, float] | None, count: bool = True, style: dict | None = None) -> dict:
        chosen = forced if forced else (decision.domain if decision and decision.domain else "base")
        info = {"model": model, "domain": chosen, "mode": "forced" if forced else mode, "routed": forced is None,
                "abstained": bool(decision and decision.abstained), "confidence": None, "probs": None,
                "weights": weights, "bundle_version": unit.version}
        if style is not None:  # routing/styles.py StyleChoice: requested, style used, note
            info["style"] = style
        if decision is not None:
            info.update(confidence=decision.confidence, probs=decision.probs)
        if count:
            self.metrics.routes.labels(chosen, "routed" if forced is None else "forced").inc()
            if info["abstained"]:
                self.metrics.abstentions.inc()
        return info

    # ------------------------------------------------------------------ local generation
    async def _generate(self, unit: Unit, kind: str, req: SamplingFields, prompts: list[list[int]],
                        route_ids: list[list[int]], max_new: int):
        """Submit n jobs per prompt to the unit's engine; answer with JSON or an event stream."""
        forced = self._resolve_model(req.model, unit)
        mode = req.routing_mode or self.settings.routing_mode
        release = self._acquire(unit)
        call = _Call(release)
        try:
            sampling = [self._sampling(req, max_new, i) for i in range(req.n)]
            for prompt, ids in zip(prompts, route_ids, strict=True):
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
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        k = len(call.jobs)
        routes: list[dict | None] = [None] * k
        early: list[tuple[int, tuple]] = []
        try:  # the engine reports each route before any text: it goes into the X-Route header
            while any(r is None for r in routes):
                index, event = await call.queue.get()
                if event[0] == "route":  # metrics count one route per prompt, not per choice
                    routes[index] = self._routing_info(unit, req.model, forced, mode, event[1], event[2],
                                                       count=index % req.n == 0, style=event[3])
                elif event[0] == "error":
                    raise event[1]
                else:
                    early.append((index, event))
        except BaseException:
            call.cancel()
            raise
        reply = _Reply(kind, req.model, routes, prompt_tokens, unit.version)

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
            endpoint = "/v1/completions" if kind == "text" else "/v1/chat/completions"
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

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
            return JSONResponse(reply.body(texts, reasons, counts), headers=reply.headers())

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
                yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})

        async def close() -> None:
            call.cancel()  # a client that went away frees its batch row at the next decoding step

        return EventStream(stream(), on_close=close, headers=reply.headers())

    # ------------------------------------------------------------------ scale-out: forward to an engine
    async def _forward(self, unit: Unit, path: str, req: SamplingFields, route_texts: list[str], max_new: int):
        forced = self._resolve_model(req.model, unit)
        mode = req.routing_mode or self.settings.routing_mode
        if mode != "hard" and forced is None:
            raise APIError(400, "with a backend engine only hard routing is possible (one adapter per request)",
                           param="routing_mode")
        if len(route_texts) != 1:
            raise APIError(400, "with a backend engine, send one prompt per request", param="prompt")
        if req.style is not None or "/" in req.model:
            raise APIError(400, "styles are served locally only (not forwarded to a backend engine)", param="style")
        release = self._acquire(unit)
        streaming = False
        try:
            decision = None
            if forced is None:
                decision = (await asyncio.to_thread(unit.engine.route, route_texts))[0]
            weights = unit.tl.named(unit.tl.domain_weights(forced or decision.domain, 1)[0])
            info = self._routing_info(unit, req.model, forced, "hard", decision, weights)
            target = info["domain"] if info["domain"] != "base" else self.settings.backend_base_model
            payload = req.model_dump(exclude_unset=True, exclude={"routing_mode", "top_k", "max_completion_tokens"})
            payload.update(model=target, max_tokens=max_new)
            headers = {"X-Route": info["domain"], "X-Bundle-Version": str(unit.version)}
            if not req.stream:
                body = await self.backend.complete(path, payload)
                body.update(model=req.model, routing=info)
                return JSONResponse(body, headers=headers)
            lines = await self.backend.stream(path, payload)
            streaming = True
        finally:
            if not streaming:
                release()

        async def relay() -> AsyncIterator[str]:
            first = True
            async for data in lines:
                if data != "[DONE]":
                    obj = json.loads(data)
                    obj["model"] = req.model
                    if first:
                        obj["routing"] = info
                        first = False
                    data = json.dumps(obj)
                yield f"data: {data}\n\n"

        async def close() -> None:
            await lines.aclose()
            release()

        return EventStream(relay(), on_close=close, headers=headers)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
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
        if self.kind == "text":
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        else:
            content = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [choice]}
        if first:
            payload["routing"] = self.routes[index]
        return _sse(payload)

    def usage_chunk(self, completion_tokens: int) -> str:
        return _sse({"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                     "choices": [], "usage": self._usage(completion_tokens)})


def _adapter_digests(manifest: dict) -> dict[str, str]:
    """Each domain's adapter weights digest in a manifest ({} for a manifest not read from disk)."""
    files = manifest.get("files") or {}
    out = {}
    for domain, entry in (manifest.get("adapters") or {}).items():
        out[domain] = files.get(f"{entry['path']}/adapter_model.safetensors", "")
    return out

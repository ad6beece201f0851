"""Request validation: a request body becomes a `Prepared` request (token ids, the text the router
reads, the token budget) or a named error (server/errors.py). No HTTP here: app.py picks the status."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from temporal_lora.errors import InputError
from temporal_lora.model import TemporalLoRA
from temporal_lora.server.engine import Sampling
from temporal_lora.server.errors import RequestError, UnknownNameError
from temporal_lora.server.live import Unit
from temporal_lora.server.schemas import ChatRequest, CompletionRequest, SamplingFields
from temporal_lora.server.settings import ServerSettings
from temporal_lora.text import tokenize

# The router reads the newest user turns of a chat, back to about this many tokens, so a later turn
# can switch domain while a short follow-up ("and the dose?") keeps the conversation's domain.
CHAT_ROUTE_TOKENS = 64
MAX_STOPS = 4
MAX_SEQUENCES = 32  # prompts x n in one request


@dataclass(frozen=True)
class Prepared:
    """A generation request that passed the checks, bound to the bundle version it was admitted on."""

    kind: str  # "text" (/v1/completions) or "chat" (/v1/chat/completions)
    req: SamplingFields
    unit: Unit
    prompt_ids: list[list[int]]  # what the engine continues, one per prompt
    route_texts: list[str]  # what the router reads, one per prompt (chat: the newest user turns)
    route_ids: list[list[int]]  # the same, tokenized
    max_new: int
    messages: list[dict] | None = None  # chat: the messages, for a grounded prompt (`RequestChecks.ground`)

    @property
    def endpoint(self) -> str:
        return "/v1/completions" if self.kind == "text" else "/v1/chat/completions"


class RequestChecks:
    """The server's limits applied to request bodies (`settings` holds the limits)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings

    # ------------------------------------------------------------------ whole requests
    def completion(self, req: CompletionRequest, unit: Unit) -> Prepared:
        if req.echo or req.logprobs:
            raise RequestError("echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        if len(prompts) * req.n > MAX_SEQUENCES:
            raise RequestError(f"at most {MAX_SEQUENCES} sequences per request (prompts x n)", param="prompt")
        max_new = self.max_new(req.max_tokens)
        ids = [self.encode(unit.tl, p, "prompt") for p in prompts]
        for p in ids:
            self.check_lengths(p, max_new, unit.tl)
        return Prepared("text", req, unit, ids, prompts, ids, max_new)

    def chat(self, req: ChatRequest, unit: Unit) -> Prepared:
        tl = unit.tl
        if req.logprobs:
            raise RequestError("logprobs are not supported", param="logprobs")
        if not getattr(tl.tokenizer, "chat_template", None):
            raise RequestError(f"base model {tl.base_id!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        max_new = self.max_new(req.max_completion_tokens or req.max_tokens)
        prompt = tl.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.encode(tl, prompt, "messages")
        self.check_lengths(prompt_ids, max_new, tl)
        route_text = self.chat_route_text(req, tl)
        return Prepared("chat", req, unit, [prompt_ids], [route_text], [self.encode(tl, route_text, "messages")],
                        max_new, messages)

    def grounds(self, p: Prepared) -> bool:
        """Whether a request's prompt gets passages: a chat request, not `grounded: false`, to a bundle
        with grounded domains."""
        return p.kind == "chat" and p.req.grounded is not False and bool(p.unit.tl.grounding)

    def ground(self, p: Prepared, forced: str | None) -> tuple[list[int], list[dict]]:
        """A chat request's prompt grounded in the answering domain's passages (grounding.py) and those
        passages: the forced domain's, else the routed one's (none when the router abstains or the base
        model is forced). Blocking (routes, searches): call it off the event loop."""
        tl = p.unit.tl
        if forced is not None:
            domain = None if forced == "base" else forced.split("/")[0]  # 'legal/plain': legal's passages
        else:
            decision = p.unit.engine.route(p.route_texts)[0]
            domain = None if decision.abstained or not decision.domain else decision.domain.split("/")[0]
        prompt, hits = tl.grounded_chat(p.messages or [], domain, p.max_new)
        ids = self.encode(tl, prompt, "messages")
        self.check_lengths(ids, p.max_new, tl)
        return ids, [h.to_dict() for h in hits]

    def route_inputs(self, texts: list[str], tl: TemporalLoRA) -> None:
        """The texts of a /v1/route request: at least one, each non-empty and within the prompt limit."""
        if not texts:
            raise RequestError("input is empty", param="input")
        for i, text in enumerate(texts):
            self.check_lengths(self.encode(tl, text, f"input[{i}]"), 0, tl)

    def forwardable(self, p: Prepared, forced: str | None, mode: str) -> None:
        """What a backend engine cannot do: mix adapters, several prompts in one request, styles."""
        if mode != "hard" and forced is None:
            raise RequestError("with a backend engine only hard routing is possible (one adapter per request)",
                               param="routing_mode")
        if len(p.route_texts) != 1:
            raise RequestError("with a backend engine, send one prompt per request", param="prompt")
        if p.req.style is not None or "/" in p.req.model:
            raise RequestError("styles are served locally only (not forwarded to a backend engine)", param="style")

    # ------------------------------------------------------------------ fields
    def encode(self, tl: TemporalLoRA, text: str, what: str, *, allow_empty: bool = False) -> list[int]:
        """Token ids of `text`; `what` names the field in errors."""
        try:  # unlike TemporalLoRA.encode, a whitespace-only prompt is fine here (as in OpenAI's API)
            ids = tokenize(tl.tokenizer, text, what)
        except InputError as exc:  # e.g. lone surrogates, which JSON can carry
            raise RequestError(str(exc), param=what) from exc
        if not ids and not allow_empty:
            raise RequestError(f"{what} is empty", param=what)
        return ids

    def check_lengths(self, prompt_ids: list[int], max_new: int, tl: TemporalLoRA) -> None:
        limit = self.settings.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the limit is {limit}",
                               code="context_length_exceeded")
        if len(prompt_ids) + max_new > tl.context_length:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                               f"model's context of {tl.context_length}", code="context_length_exceeded")

    def max_new(self, requested: int | None) -> int:
        max_new = requested or self.settings.default_max_tokens
        if max_new > self.settings.max_new_tokens:
            raise RequestError(f"max_tokens {max_new} exceeds the server's limit of {self.settings.max_new_tokens}",
                               param="max_tokens")
        return max_new

    def mode(self, req: SamplingFields) -> str:
        return req.routing_mode or self.settings.routing_mode

    def sampling(self, req: SamplingFields, max_new: int, index: int) -> Sampling:
        """The sampler settings of choice `index` (seeds differ per choice, so n > 1 gives n answers)."""
        stops = req.stop_list()
        if len(stops) > MAX_STOPS:
            raise RequestError(f"at most {MAX_STOPS} stop strings", param="stop")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                        seed=(seed + index) % 2**63, stop=stops, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty)

    def resolve_model(self, model: str, unit: Unit) -> str | None:
        """The forced domain ('base' included), or None for 'auto'."""
        if model == "auto":
            return None
        if unit.serves(model):
            return model
        raise UnknownNameError(f"model {model!r} does not exist; available: {', '.join(unit.model_ids)}",
                               param="model", code="model_not_found")

    def chat_route_text(self, req: ChatRequest, tl: TemporalLoRA) -> str:
        """The newest user turns, back to about CHAT_ROUTE_TOKENS tokens."""
        turns = [m.text() for m in req.messages if m.role == "user" and m.text().strip()]
        if not turns:
            raise RequestError("messages hold no user message to answer", param="messages")
        picked, tokens = [], 0
        for text in reversed(turns):
            picked.insert(0, text)
            tokens += len(self.encode(tl, text, "messages", allow_empty=True))
            if tokens >= CHAT_ROUTE_TOKENS:
                break
        return "\n".join(picked)

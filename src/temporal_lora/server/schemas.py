"""Request bodies of the OpenAI-compatible API (the subset we serve, plus routing extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RoutingMode = Literal["hard", "soft", "topk"]


class SamplingFields(BaseModel):
    # OpenAI clients send fields we do not use (user, logit_bias, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="'auto' (route), a domain name (force its adapter) or 'base' (no adapter)")
    max_tokens: int | None = Field(default=None, ge=1, description="new tokens to generate at most")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: dict | None = Field(default=None, description="{'include_usage': true} adds a usage chunk")
    stop: str | list[str] | None = Field(default=None, description="up to 4 stop strings")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Extensions (OpenAI clients pass them with extra_body=...).
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="> 1 discourages repeats")
    routing_mode: RoutingMode | None = Field(default=None, description="for model 'auto': hard, soft or topk")
    top_k: int = Field(default=2, ge=1, le=64, description="adapters mixed in routing_mode 'topk'")
    style: str | None = Field(default=None, max_length=64,
                              description="answer style of the chosen domain (e.g. 'plain'); 'auto' reads the "
                                          "prompt's register; 'none' the domain's own adapter; default: its default")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="one prompt, or several (one choice set each)")
    echo: bool = False
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    grounded: bool | None = Field(default=None, description="answer from the answering domain's own passages "
                                                            "(default: yes, where the bundle grounds that domain)")


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] = Field(description="text(s) to route")
    segments: str | None = Field(default=None, description="route segment by segment: sentence, paragraph or tokens:K")


class LoadAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(description="the name requests use as their model")
    lora_path: str = Field(description="a PEFT adapter folder this server can read")


class UnloadAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str

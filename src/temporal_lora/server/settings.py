"""The server's settings: limits, routing mode, the backend engine to forward to, the local engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """How `tlora serve` (and `create_app`) serves a bundle; the defaults suit one small CPU host."""

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

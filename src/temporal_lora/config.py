"""Configuration dataclasses. Everything a run depends on is here and lands in the bundle manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from temporal_lora.errors import InputError

# Prompt lengths (tokens) at which routing is measured everywhere: eval, bench, scaling.
EVAL_LENGTHS = (8, 16, 32, 64, 128)


@dataclass
class AdapterConfig:
    """LoRA hyper-parameters for one domain adapter (mapped 1:1 onto a PEFT LoraConfig)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None lets PEFT pick the architecture's defaults (q_proj/v_proj for Llama, c_attn for GPT-2).
    target_modules: list[str] | None = None


@dataclass
class RouterConfig:
    """The gating network and where its features come from."""

    # "embeddings" (mean-pooled input embeddings, the method's sketch), "hidden:L" (mean-pooled
    # output of decoder layer L; L=-1 picks the default routing layer, 12 of SmolLM2's 30),
    # "hidden:L1,L2" (several layers side by side) or "hidden:default" (layers 8+12 of SmolLM2's 30,
    # routing.features.default_layers). Hidden states generalise far better than embeddings to text
    # from other sources (DESIGN.md); layers 8+12 routed unseen sources, questions and in-source text
    # best at 1.4x layer 8's cost (benchmarks/results/routing/generalisation.md).
    features: str = "hidden:default"
    hidden_dim: int = 128  # 0 means plain logistic regression
    max_tokens: int = 128  # the router reads at most this many leading tokens
    train_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-3
    abstain_threshold: float = 0.0  # calibrated confidence below this -> plain base model
    # Wider router text (issue 14): windows of each built-in domain's other training sources
    # (corpora/sources.py) and short views of the training documents (headings, first sentences,
    # single lines, signatures, the documents' own questions; corpora/views.py), per domain.
    extra_sources: bool = True
    short_texts: int = 200  # short training texts per domain (0: windows only, as before)


@dataclass
class TrainConfig:
    """Budget for training adapters and the router, and for evaluation."""

    budget: str = "quick"
    block_size: int = 128
    batch_size: int = 4
    steps: int = 40
    lr: float = 2e-3
    warmup_steps: int = 4
    router_chunks: int = 150  # per domain, from training documents
    calib_chunks: int = 30  # per domain, from validation documents (temperature scaling)
    eval_chunks: int = 48  # per domain, from test documents (perplexity)
    seed: int = 0
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None, router: dict | None = None) -> TrainConfig:
        """The inverse of `to_dict`; keys an older or newer version wrote are ignored, missing ones
        take their defaults. `router` (a manifest's router config) wins over the recorded one."""
        raw = dict(raw or {})
        adapter = AdapterConfig(**_known(AdapterConfig, raw.pop("adapter", None) or {}))
        router_cfg = RouterConfig(**_known(RouterConfig, router or raw.pop("router", None) or {}))
        raw.pop("router", None)
        return cls(**_known(cls, raw), adapter=adapter, router=router_cfg)


def _known(cls, raw: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def router_prefix_lengths(router: RouterConfig, block_size: int) -> list[int]:
    """The prompt lengths the router trains on: its `train_lengths` that fit in one training block."""
    return [n for n in router.train_lengths if n <= block_size]


BUDGETS = ("quick", "full")


def budget_config(budget: str = "quick", seed: int = 0) -> TrainConfig:
    """The preset for `--budget quick|full`. `quick` fits the demo's 30 minutes on a 2-core CPU."""
    if budget == "quick":
        return TrainConfig(budget=budget, seed=seed)
    if budget == "full":
        return TrainConfig(
            budget=budget,
            seed=seed,
            batch_size=8,
            steps=600,
            lr=5e-4,
            warmup_steps=30,
            router_chunks=400,
            calib_chunks=100,
            eval_chunks=100,
            adapter=AdapterConfig(r=16, alpha=32),
        )
    raise InputError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")

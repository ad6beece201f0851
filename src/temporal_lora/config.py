"""Configuration dataclasses. Everything a run depends on is here and lands in the bundle manifest.

Each setting's documentation is the string literal under its field (an attribute docstring); the
command line's `--help` shows it (cli.py reads them with `ast`). Budgets are named
presets (`PRESETS`: a factory per name, taking the seed); `settings_for` is the one rule for a
recipe that takes a whole `config=` beside `budget=`/`seed=`. How a run reports (progress bars, log
lines) is not a setting: it travels separately as a `RunContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol, TypeVar

from temporal_lora.errors import InputError

# Prompt lengths (tokens) at which routing is measured everywhere: eval, bench, scaling.
EVAL_LENGTHS = (8, 16, 32, 64, 128)


@dataclass
class AdapterConfig:
    """LoRA hyper-parameters for one domain adapter (mapped 1:1 onto a PEFT LoraConfig)."""

    r: int = 8
    """LoRA rank"""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)"""
    dropout: float = 0.05
    """dropout on the LoRA input while training"""
    target_modules: list[str] | None = None
    """modules that get LoRA layers; None lets PEFT pick the architecture's defaults (q_proj/v_proj
    for Llama, c_attn for GPT-2)"""


@dataclass
class RouterConfig:
    """The gating network and where its features come from."""

    features: str = "hidden:default"
    """'embeddings', 'hidden:LAYER', 'hidden:L1,L2' or 'hidden:default' (the default: layers 8+12 of
    SmolLM2's 30)"""
    # "embeddings" is the method's sketch (mean-pooled input embeddings); "hidden:L" mean-pools the
    # output of decoder layer L (L=-1: the default routing layer, 12 of SmolLM2's 30); "hidden:default"
    # is routing.features.default_layers. Hidden states generalise far better than embeddings to text
    # from other sources (DESIGN.md); layers 8+12 routed unseen sources, questions and in-source text
    # best at 1.4x layer 8's cost (benchmarks/results/routing/generalisation.md).
    hidden_dim: int = 128
    """hidden units of the gating network; 0 means plain logistic regression"""
    max_tokens: int = 128
    """the router reads at most this many leading tokens"""
    train_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    """prompt lengths (tokens) the router trains on"""
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-3
    abstain_threshold: float = 0.0
    """calibrated confidence below which the plain base model answers (default 0: never)"""
    abstain_auto: bool = False
    """choose abstain_threshold on validation data at every (re)fit (`--abstain auto`): the in-scope
    validation rows and, where the user gave them, out-of-scope examples (routing/abstain.py)"""
    extra_sources: bool = True
    """also train on windows of each built-in domain's other training sources (issue 14;
    corpora/sources.py)"""
    lexical: bool = True
    """a lexical head beside the hidden-state one: hashed word and character n-grams, logistic
    regression, joined as a product of experts weighed on the calibration rows (routing/lexical.py)"""
    short_texts: int = 200
    """short training texts per domain: headings, first sentences, single lines, signatures, the
    documents' own questions (corpora/views.py); 0: windows only, as before"""


@dataclass
class TrainConfig:
    """Budget for training adapters and the router, and for evaluation."""

    budget: str = "quick"
    """training budget: a named preset (quick fits the demo's 30 minutes on a 2-core CPU)"""
    block_size: int = 128
    """tokens per training window"""
    batch_size: int = 4
    steps: int = 40
    """optimiser steps per adapter"""
    lr: float = 2e-3
    warmup_steps: int = 4
    router_chunks: int = 150
    """router training windows per domain, from training documents"""
    calib_chunks: int = 30
    """calibration windows per domain, from validation documents (temperature scaling)"""
    eval_chunks: int = 48
    """perplexity windows per domain, from test documents"""
    seed: int = 0
    """random seed: the same seed gives the same splits, adapters and router"""
    grounding: str = "auto"
    """answer from the domain's own passages (grounding.py): 'auto' grounds the domains whose data has
    documents and answered conversations, 'on' every domain with documents, 'off' none"""
    grounding_passages: int = 2
    """passages put into a grounded prompt"""
    passage_words: int = 80
    """about this many words per passage (a handbook is cut at headings, paragraphs, sentences)"""
    synthetic_questions: int = 64
    """grounded domains: up to this many questions written by the base model from the handbook's fact
    sentences, answered by the sentence, each kept only when it finds its sentence's passage; they
    train the adapter and the router and join the passages (synthesis.py); 0: none"""
    paraphrase_questions: bool = True
    """grounded domains: each training conversation once more with its question reworded by the base
    model, kept when it finds the same passage as the original (synthesis.py)"""
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


# ------------------------------------------------------------------------------------------ presets
def quick_config(seed: int = 0) -> TrainConfig:
    """`--budget quick`: fits the demo's 30 minutes on a 2-core CPU."""
    return TrainConfig(budget="quick", seed=seed)


def full_config(seed: int = 0) -> TrainConfig:
    """`--budget full`: 15x the steps, twice the LoRA rank, more router and evaluation text."""
    return TrainConfig(budget="full", seed=seed, batch_size=8, steps=600, lr=5e-4, warmup_steps=30,
                       router_chunks=400, calib_chunks=100, eval_chunks=100, adapter=AdapterConfig(r=16, alpha=32))


PRESETS: dict[str, Callable[[int], TrainConfig]] = {"quick": quick_config, "full": full_config}
BUDGETS = tuple(PRESETS)


class Budgeted(Protocol):
    """A settings dataclass made from a named preset: it records the preset's name and the seed."""

    budget: str
    seed: int


S = TypeVar("S", bound=Budgeted)


def from_preset(presets: Mapping[str, Callable[[int], S]], budget: str, seed: int) -> S:
    """The settings of preset `budget` with `seed`; a clear InputError for an unknown name."""
    if budget not in presets:
        raise InputError(f"unknown budget {budget!r}; choose from {', '.join(presets)}")
    return presets[budget](seed)


def budget_config(budget: str = "quick", seed: int = 0) -> TrainConfig:
    """The training settings for `--budget NAME` (a name of `PRESETS`) and `--seed`."""
    return from_preset(PRESETS, budget, seed)


def settings_for(config: S | None, budget: str | None, seed: int | None,
                 presets: Mapping[str, Callable[[int], S]], *, default_budget: str = "quick",
                 default_seed: int = 0) -> S:
    """The settings a recipe runs with, given its `config=`, `budget=` and `seed=` arguments.

    Without a config: preset `budget` (default `default_budget`) with `seed` (default `default_seed`).
    A config is a complete set of settings, so it is used as it is; a `budget` or `seed` passed with
    it must agree with the config's own (`config.budget`, `config.seed`), otherwise InputError: a
    conflicting argument is never silently dropped. (To change the seed of a config, pass
    `dataclasses.replace(config, seed=...)`.)
    """
    if config is None:
        return from_preset(presets, budget or default_budget, default_seed if seed is None else seed)
    clashes = [f"{name}={value!r}" for name, value in (("budget", budget), ("seed", seed))
               if value is not None and value != getattr(config, name)]
    if clashes:
        raise InputError(f"{' and '.join(clashes)} conflicts with the config given (budget={config.budget!r}, "
                         f"seed={config.seed!r}); pass either a config or budget/seed, or replace() the config's")
    return config


# ------------------------------------------------------------------------------------------ how a run reports
@dataclass(frozen=True)
class RunContext:
    """How a long-running recipe reports: progress bars on or off, and where its log lines go.

    Passed as `run=` to the recipes (train_bundle, add_domain, add_subdomain, add_style,
    remove_domain, evaluate_bundle, train_adapter); `QUIET` shows nothing."""

    progress: bool = True
    log: Callable[[str], object] = print

    @classmethod
    def of(cls, run: RunContext | None, *, progress: bool | None = None,
           log: Callable[[str], object] | None = None) -> RunContext:
        """`run` (default: bars on, log to stdout) with the recipes' older `progress=`/`log=`
        keywords applied over it where they are given."""
        run = run or cls()
        given = {k: v for k, v in (("progress", progress), ("log", log)) if v is not None}
        return replace(run, **given) if given else run


def _silent(*_args) -> None:
    return None


QUIET = RunContext(progress=False, log=_silent)

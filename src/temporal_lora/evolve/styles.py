"""Add a style under a domain: a DPO-trained style adapter ('legal/plain') with the domain's adapter
as its frozen reference.

The style adapter starts as a copy of the domain's adapter and is trained with TRL's DPOTrainer
on preference pairs: a user's JSONL in TRL's standard preference format (prompt, chosen,
rejected), or pairs built on-policy with a built-in reward (rewards.py): K completions per prompt
sampled from the domain's adapter (prompts from the domain's *training* documents), best vs worst.
Built-in rewards can run in on-policy rounds (iterative DPO, `StyleConfig.rounds`): round r samples
fresh prompts from the policy that round r-1 trained; every round keeps the parent adapter as the
frozen reference. Measured on legal (benchmarks/results/styles/styles.json "experiments"), a second
round at the quick budget moved neither the win rate nor the readability and cost perplexity, so the
budgets use one round.
TRL gives a PeftModel whose adapter is being re-trained a frozen copy of it named "ref" and
computes the reference log-probabilities with that adapter: the reference is the parent adapter,
not the bare base model. A new bundle version is written in which every other file is
byte-identical (same conventions as evolve/subdomains.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from temporal_lora.adapters import save_peft_adapters
from temporal_lora.backbone import fingerprint
from temporal_lora.bundle import safe_path
from temporal_lora.config import RunContext, from_preset, settings_for
from temporal_lora.corpora import load_domain, source_paths
from temporal_lora.data import chunk_documents
from temporal_lora.errors import BundleError, CorpusError, InputError
from temporal_lora.evolve.common import Addition, check_kept, place_adapter
from temporal_lora.rewards import REWARDS, complete_sentences, score, words
from temporal_lora.routing.hierarchy import route_name
from temporal_lora.routing.styles import AUTO, NONE
from temporal_lora.sampling import eos_ids, sample_batch
from temporal_lora.storage import read_splits, read_styles, style_folder
from temporal_lora.text import pad_batch, read_jsonl, tokenize
from temporal_lora.train import validate_domains
from temporal_lora.versions import commit, copy_files

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class StyleConfig:
    """Pair building and DPO settings for one style adapter."""

    budget: str = "quick"
    prompts: int = 48  # built-in rewards: prompts drawn from the domain's training documents
    samples: int = 4  # K completions per prompt
    prompt_tokens: int = 48
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    min_gap: float = 5.0  # a pair is kept only if best and worst differ by this much reward
    rounds: int = 1  # built-in rewards: on-policy rounds (round r samples from round r-1's policy)
    steps: int = 48  # DPO steps per round
    batch_size: int = 4
    lr: float = 5e-4
    beta: float = 0.1
    sft_weight: float = 0.2  # TRL's "sft" loss on the chosen answer beside DPO: keeps the domain's fluency
    max_length: int = 256  # prompt + answer tokens DPO reads
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def quick_style_config(seed: int = 0) -> StyleConfig:
    """`--budget quick` for a style adapter."""
    return StyleConfig(budget="quick", seed=seed)


def full_style_config(seed: int = 0) -> StyleConfig:
    """`--budget full` for a style adapter: more prompts and samples, longer answers, 300 DPO steps."""
    return StyleConfig(budget="full", seed=seed, prompts=200, samples=6, max_new_tokens=64, steps=300, lr=2e-4)


STYLE_PRESETS: dict[str, Callable[[int], StyleConfig]] = {"quick": quick_style_config, "full": full_style_config}


def style_config(budget: str | None = None, seed: int | None = None) -> StyleConfig:
    """The style settings of preset `budget` (default quick) with `seed` (default 0)."""
    return from_preset(STYLE_PRESETS, budget or "quick", 0 if seed is None else seed)


# ------------------------------------------------------------------------------------------ preferences
def read_preferences(path: str | Path) -> list[dict]:
    """Pairs from a JSONL file in TRL's standard preference format: one {"prompt", "chosen",
    "rejected"} object of non-empty strings per line, chosen != rejected. One clear error otherwise."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"preference file {file} does not exist")
    pairs = []
    for where, record in read_jsonl(file, InputError, "preference pairs"):
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object with prompt, chosen and rejected")
        for key in PREFERENCE_FIELDS:
            if key not in record:
                raise InputError(f"{where}: missing field {key!r} (TRL's preference format: prompt, chosen, rejected)")
            if not isinstance(record[key], str):
                raise InputError(f"{where}: field {key!r} must be a string")
            if not record[key].strip():
                raise InputError(f"{where}: field {key!r} is empty")
        if record["chosen"].strip() == record["rejected"].strip():
            raise InputError(f"{where}: chosen and rejected are identical")
        pairs.append({k: record[k] for k in PREFERENCE_FIELDS})
    if not pairs:
        raise InputError(f"preference file {file} holds no pairs")
    return pairs


def check_pair_lengths(pairs: list[dict], tokenizer, limit: int, what: str) -> None:
    """Every prompt must leave room for an answer inside `limit` tokens."""
    for i, pair in enumerate(pairs, 1):
        n = len(tokenize(tokenizer, pair["prompt"], f"{what} pair {i} prompt"))
        if n >= limit:
            raise InputError(f"{what} pair {i}: the prompt has {n} tokens; style training reads at most "
                             f"{limit} tokens of prompt and answer")
        for key in ("chosen", "rejected"):
            tokenize(tokenizer, pair[key], f"{what} pair {i} {key}")


# ------------------------------------------------------------------------------------------ on-policy pairs
def domain_prompts(tokenizer, docs, n: int, tokens: int, seed: int) -> list[str]:
    """`n` prompts of about `tokens` tokens from `docs`, each cut after its last whole sentence
    when that keeps at least half of it (the answer then starts a sentence)."""
    windows = chunk_documents(docs, tokenizer, block_size=tokens, max_chunks=n, seed=seed)
    prompts = []
    for ids in windows:
        text = tokenizer.decode(ids).strip()
        cut = complete_sentences(text)
        prompts.append(cut if len(words(cut)) * 2 >= len(words(text)) else text)
    return [p for p in prompts if p.strip()]


def training_documents(bundle: Path, manifest: dict, domain: str) -> tuple[list, list]:
    """(training documents, test documents) of `domain`, as its recorded split says."""
    info = read_splits(bundle, manifest.get("data")).get(domain)
    if not info:
        raise BundleError(f"bundle has no recorded data split for {domain!r}: cannot draw training prompts")
    docs = load_domain(domain, source_paths(domain, info["source"]), progress=False)
    held = set(info["val_ids"]) | set(info["test_ids"])
    train = [d for d in docs if d.id not in held]
    test = [d for d in docs if d.id in set(info["test_ids"])]
    if not train:
        raise CorpusError(f"the training documents of {domain!r} are no longer in {info['source']}")
    return train, test


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, k: int, max_new_tokens: int, temperature: float,
                       top_p: float, seed: int, batch: int = 8, progress: bool = False) -> list[list[str]]:
    """`k` sampled completions of each prompt from `model` (its active adapter)."""
    from tqdm.auto import tqdm

    out: list[list[str]] = []
    generator = torch.Generator().manual_seed(seed)  # one stream for all batches
    stop_ids = eos_ids(tokenizer, model)
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", disable=not progress):
        ids = [tokenize(tokenizer, p, "prompt") for p in prompts[start : start + batch]]
        input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, left=True)
        # each prompt k times in a row: row i * k + j is prompt i's j-th sample
        new = sample_batch(model, input_ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0),
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, generator=generator)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
        out += [texts[i * k : (i + 1) * k] for i in range(len(ids))]
    return out


def build_pairs(prompts: list[str], completions: list[list[str]], reward: str, min_gap: float) -> tuple[list[dict], dict]:
    """Best vs worst completion of each prompt under `reward`; pairs whose best is degenerate or
    whose gap is below `min_gap` are dropped. The kept texts are the scored whole sentences."""
    pairs, dropped, gaps = [], 0, []
    for prompt, texts in zip(prompts, completions, strict=True):
        scored = sorted((score(reward, t) for t in texts), key=lambda s: s.reward)
        worst, best = scored[0], scored[-1]
        if best.degenerate or best.reward - worst.reward < min_gap:
            dropped += 1
            continue
        rejected = worst.text if worst.text.strip() else texts[0]
        if not rejected.strip() or rejected.strip() == best.text.strip():
            dropped += 1
            continue
        gaps.append(best.reward - worst.reward)
        pairs.append({"prompt": prompt, "chosen": " " + best.text.strip(), "rejected": " " + rejected.strip()})
    return pairs, {"prompts": len(prompts), "pairs": len(pairs), "dropped": dropped,
                   "mean_reward_gap": round(sum(gaps) / len(gaps), 3) if gaps else None}


# ------------------------------------------------------------------------------------------ DPO
def train_dpo(peft_model, tokenizer, pairs: list[dict], cfg: StyleConfig, work: Path, *, progress: bool,
              policy_state: dict[str, torch.Tensor] | None = None) -> dict:
    """DPO on `peft_model`, whose adapter "default" is the policy (a copy of the parent adapter);
    TRL adds the frozen reference "ref" as a copy of it. `policy_state` (a later on-policy round) is the
    policy's LoRA state to continue from, loaded after TRL copied the parent into "ref", so the
    reference stays the parent. Returns a training summary."""
    import time

    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    args = DPOConfig(
        output_dir=str(work / "dpo"), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=max(1, cfg.steps // 10), beta=cfg.beta,
        loss_type=["sigmoid", "sft"] if cfg.sft_weight else ["sigmoid"],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None, max_length=cfg.max_length,
        logging_steps=1, report_to=[], save_strategy="no", seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=not progress,
        bf16=False, fp16=False,
        # The reference is frozen: its log-probs are computed once, not again every epoch.
        precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer)
    if "ref" not in trainer.model.peft_config:
        raise RuntimeError("TRL did not set up the parent adapter as the DPO reference")
    if policy_state is not None:
        set_peft_model_state_dict(trainer.model, policy_state, adapter_name="default")
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if not reference or any(not torch.equal(reference[n], p) for n, p in trainer.model.named_parameters()
                            if ".ref." in n):
        raise RuntimeError("the DPO reference adapter changed during training")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tail = logs[-max(1, len(logs) // 5):]

    def mean(key: str) -> float | None:
        vals = [float(h[key]) for h in tail if key in h]
        return round(sum(vals) / len(vals), 4) if vals else None

    return {"steps": cfg.steps, "pairs": len(pairs), "batch_size": cfg.batch_size, "lr": cfg.lr, "beta": cfg.beta,
            "sft_weight": cfg.sft_weight, "first_loss": round(float(logs[0]["loss"]), 4) if logs else None,
            "final_loss": mean("loss"), "final_margin": mean("rewards/margins"),
            "final_accuracy": mean("rewards/accuracies"), "seconds": round(seconds, 2),
            "reference": "parent adapter (TRL 'ref' copy, frozen)"}


@torch.no_grad()
def implicit_margins(peft_model, tokenizer, pairs: list[dict], policy: str, reference: str, beta: float) -> list[float]:
    """DPO's implicit reward margin per pair: beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))),
    with adapters `policy` and `reference` of `peft_model` (log-probs of the answer tokens only)."""

    def logp(adapter: str, prompt: str, answer: str) -> float:
        p = tokenize(tokenizer, prompt, "prompt")
        a = tokenize(tokenizer, answer, "answer")
        ids = torch.tensor([p + a])
        peft_model.set_adapter(adapter)
        logits = peft_model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(a)[:, None]).sum())

    out = []
    for pair in pairs:
        c = logp(policy, pair["prompt"], pair["chosen"]) - logp(reference, pair["prompt"], pair["chosen"])
        r = logp(policy, pair["prompt"], pair["rejected"]) - logp(reference, pair["prompt"], pair["rejected"])
        out.append(beta * (c - r))
    return out


def on_policy_pairs(add: Addition, domain: str, parent_dir: Path, state: dict | None, reward: str,
                    cfg: StyleConfig, r: int, run: RunContext) -> tuple[list[dict], dict]:
    """Round r's pairs: fresh prompts from the domain's training documents, K answers each sampled
    from the parent adapter (round 0) or from the policy that round r-1 trained (`state`), best vs
    worst under `reward`."""
    from peft import PeftModel, set_peft_model_state_dict

    tokenizer = add.tokenizer
    with add.timed("prompts"):
        train_docs, _ = training_documents(add.bundle, add.manifest, domain)
        prompts = domain_prompts(tokenizer, train_docs, cfg.prompts, cfg.prompt_tokens, cfg.seed + r)
    if not prompts:
        raise CorpusError(f"no training document of {domain!r} is {cfg.prompt_tokens} tokens long")
    with add.timed("sampling"):
        sampler = PeftModel.from_pretrained(add.model, str(parent_dir))
        if state is not None:
            set_peft_model_state_dict(sampler, state)
        sampler.eval()
        run.log(f"sampling {cfg.samples} answers to each of {len(prompts)} prompts from "
            f"{'the parent' if state is None else f'the round-{r} policy'} of '{domain}'")
        completions = sample_completions(sampler, tokenizer, prompts, k=cfg.samples,
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=cfg.seed + r, progress=run.progress)
        sampler.unload()
    with add.timed("scoring"):
        pairs, info = build_pairs(prompts, completions, reward, cfg.min_gap)
    if len(pairs) < 2:
        raise CorpusError(f"reward {reward!r} found fewer than 2 usable pairs in {len(prompts)} prompts of "
                          f"{domain!r}; use a larger budget")
    random.Random(cfg.seed + r).shuffle(pairs)
    return pairs, info


# ------------------------------------------------------------------------------------------ the recipe
def check_style_name(manifest: dict, bundle: Path, domain: str, name: str) -> None:
    if domain not in manifest["domains"]:
        raise InputError(f"bundle {bundle} has no domain {domain!r}; it has {', '.join(manifest['domains'])}")
    validate_domains([name])
    if name in (AUTO, NONE):
        raise InputError(f"style name {name!r} is reserved; choose another")
    if name in manifest["domains"]:
        raise InputError(f"style name {name!r} clashes with the domain {name!r}; choose another")
    children = ((manifest.get("subdomains") or {}).get(domain) or {}).get("children", [])
    if name in children:
        raise InputError(f"style name {name!r} clashes with the subdomain {route_name(domain, name)!r}")
    if name in ((manifest.get("styles") or {}).get(domain) or {}).get("adapters", {}):
        raise InputError(f"{route_name(domain, name)!r} is already a style of bundle {bundle}")


def add_style(bundle: str | Path, domain: str, name: str, *, preferences: str | Path | None = None,
              reward: str | None = None, budget: str | None = None, seed: int | None = None,
              config: StyleConfig | None = None, make_default: bool = False, base: str | None = None,
              run: RunContext | None = None, progress: bool | None = None,
              log: Callable[[str], object] | None = None) -> dict:
    """Train the style adapter `domain/name` with DPO and save it as a new bundle version.

    Exactly one of `preferences` (a JSONL of {"prompt", "chosen", "rejected"}) or `reward` (a
    built-in reward: plain, formal, concise) gives the pairs. `make_default` makes it the style
    the domain answers in when a request names none. Every other file is carried over byte for byte.

    Settings: `config`, or preset `budget` (default quick) with `seed` (default: the bundle's); a
    budget or seed that disagrees with a given config is an InputError (config.settings_for).
    `run` says how to report (progress bars, log lines); `progress`/`log` override its fields.
    """
    from peft import PeftModel, get_peft_model_state_dict

    add = Addition(bundle, budget=None, seed=seed, config=None)
    bundle, manifest = add.bundle, add.manifest
    cfg = settings_for(config, budget, seed, STYLE_PRESETS, default_seed=add.cfg.seed)
    run = RunContext.of(run, progress=progress, log=log)
    check_style_name(manifest, bundle, domain, name)
    if (preferences is None) == (reward is None):
        raise InputError("give exactly one of --preferences or --reward")
    if reward is not None and reward not in REWARDS:
        raise InputError(f"unknown reward {reward!r}; built-in rewards: {', '.join(REWARDS)}")
    read_styles(bundle, manifest)  # an inconsistent styles entry is refused before any work
    user_pairs = read_preferences(preferences) if preferences is not None else None
    add.load_model(base)
    tokenizer = add.tokenizer
    limit = min(cfg.max_length, getattr(add.model.config, "max_position_embeddings", cfg.max_length))
    label = route_name(domain, name)
    parent_dir = safe_path(bundle, manifest["adapters"][domain]["path"])
    work = Path(tempfile.mkdtemp(prefix=f"tlora-style-{domain}-{name}-"))
    try:
        if user_pairs is not None:
            check_pair_lengths(user_pairs, tokenizer, limit, str(preferences))
            # The user's pairs are fixed: one round with the steps of every on-policy round.
            rounds = [(user_pairs, cfg.steps * cfg.rounds)]
            source_info: dict = {"preferences": str(Path(preferences).resolve()), "pairs": len(user_pairs)}
        else:
            rounds = [(None, cfg.steps)] * cfg.rounds
            source_info = {"reward": reward, "pairs": 0, "rounds": []}
        state, pairs_made, summaries = None, [], []
        for r, (pairs, steps) in enumerate(rounds):
            if pairs is None:
                pairs, pair_info = on_policy_pairs(add, domain, parent_dir, state, reward, cfg, r, run)
                source_info["rounds"].append(pair_info)
                source_info["pairs"] += len(pairs)
                pairs_made += pairs
            with add.timed("dpo"):
                policy = PeftModel.from_pretrained(add.model, str(parent_dir), is_trainable=True)
                run.log(f"training style '{label}' with DPO on {len(pairs)} pairs ({steps} steps"
                    f"{f', round {r + 1} of {len(rounds)}' if len(rounds) > 1 else ''}; reference: the '{domain}' adapter)")
                summaries.append(train_dpo(policy, tokenizer, pairs, replace(cfg, steps=steps), work,
                                           progress=run.progress, policy_state=state))
                state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy).items()}
                if r == len(rounds) - 1:
                    save_peft_adapters(policy, work / name, selected_adapters=["default"])
                policy.unload()
        summary = {**summaries[-1], "steps": sum(x["steps"] for x in summaries), "pairs": source_info["pairs"]}
        if len(summaries) > 1:
            summary["rounds"] = summaries
        pairs = pairs_made
        if fingerprint(add.model) != manifest["base_model"]["fingerprint"]:
            raise RuntimeError("base model weights changed during style training")
        if user_pairs is None:
            (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        training = {**summary, "source": source_info, "seed": cfg.seed, "budget": cfg.budget,
                    "config": cfg.to_dict(), "init": "parent", "parent": domain}

        def fill(tmp: Path, old_manifest: dict) -> dict:
            new = json.loads(json.dumps(old_manifest))
            copy_files(bundle, list(old_manifest["files"]), tmp)
            entry = new.setdefault("styles", {}).setdefault(domain, {"default": None, "adapters": {}})
            entry["adapters"][name] = place_adapter(work / name, tmp, style_folder(domain, name), training)
            if user_pairs is None:
                shutil.copyfile(work / "pairs.jsonl", tmp / style_folder(domain, name) / "pairs.jsonl")
            if make_default:
                entry["default"] = name
            return new

        with add.timed("save"):
            result = commit(bundle, fill, {"change": "add-style", "domain": label,
                                           "source": reward and f"reward:{reward}" or "preferences"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_kept(manifest["files"], result["files"], lambda rel: True, "bundle file", "adding a style")
    timing = add.rounded_timing()
    return {"version": result["version"], "domain": domain, "style": name, "route": label,
            "default": result["styles"][domain]["default"], "source": source_info, "training": summary,
            "timing": timing, "seconds_total": round(sum(v for k, v in timing.items() if k != "load_base_model"), 2),
            "margin_ok": summary["final_margin"] is None or not math.isnan(summary["final_margin"])}

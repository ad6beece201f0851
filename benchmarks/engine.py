"""CPU engines side by side: llama.cpp alone, our llama.cpp engine (library and `tlora serve`), and
the torch engine (the float32 reference) — batch-1 speed, greedy agreement, 16-client load.

Every number comes from this one run on this machine, every engine with the same CPU threads.
Batch-1 figures: greedy, up to `new_tokens` new tokens, tokens/s = completion tokens / wall time of
the whole request (routing and prompt included), median over prompts x repeats. "llama.cpp alone" is
the minimal loop over the same GGUF file: llama_decode + argmax, the adapter set chosen in advance.

    OMP_NUM_THREADS=1 python -m benchmarks engine --bundle runs/demo/bundle
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.flags import flag
from benchmarks.load import build_requests, free_port, load, references, start_server
from temporal_lora.llamacpp import LlamaContext, LlamaModel
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.decisions import plan_routes
from temporal_lora.server.engine import Engine, Route, Sampling
from temporal_lora.server.llamacpp_engine import LlamaCppEngine, generate
from temporal_lora.text import tokenize

OUT = Path("benchmarks/results/serve")
ENGINES = ("llama.cpp", "tlora", "tlora_pytorch")


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def _agree(texts: list[str], refs: list[str]) -> float:
    """Share of prompts whose greedy continuation is identical to the reference's."""
    return round(float(np.mean([a == b for a, b in zip(texts, refs, strict=True)])), 3)


def _engine_tok_s(engine, ids: list[int], route: Route, new_tokens: int) -> float:
    start = time.perf_counter()
    got = generate(engine, [ids], route=route, sampling=Sampling(max_new_tokens=new_tokens, temperature=0))[0]
    return got["completion_tokens"] / (time.perf_counter() - start)


def _raw_tok_s(ctx: LlamaContext, ids: list[int], adapters, new_tokens: int, eos: set[int]) -> float:
    """llama.cpp alone: prompt, then argmax + llama_decode per token; the adapter set fixed beforehand."""
    ctx.set_adapters(adapters)
    start = time.perf_counter()
    ctx.clear(0)
    logits = ctx.decode([(0, ids, 0)])[0]
    n = 0
    for n in range(1, new_tokens + 1):
        token = int(logits.argmax())
        if token in eos or n == new_tokens:
            break
        logits = ctx.decode([(0, [token], len(ids) + n - 1)])[0]
    return n / (time.perf_counter() - start)


def _weights_for(tl: TemporalLoRA, ids: list[int], mode: str) -> torch.Tensor:
    return plan_routes(tl, [ids], mode=mode).weights[0]


def _logprob_gap(tl, runtime, ids: list[int], weights: torch.Tensor) -> float:
    """Mean |log p(token)| difference, llama.cpp vs torch, over every position of `ids` (teacher-forced)."""
    with torch.no_grad(), tl.mixer.weights(weights[None]):
        ref = torch.log_softmax(tl.model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    runtime.ctx.set_adapters(runtime.adapter_set(weights))
    runtime.ctx.clear(0)
    got = runtime.ctx.decode([(0, ids, 0)], all_logits=True)[0]
    got = got - got.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    nxt = np.array(ids[1:])
    rows = np.arange(len(nxt))
    return float(np.abs(got[rows, nxt] - ref[rows, nxt]).mean())


def _llamacpp_step_tok_s(ctx: LlamaContext, sets: list[tuple], batch: int, steps: int) -> float:
    """Tokens/s of decoding steps of `batch` sequences on one context, the sequences split evenly over
    the adapter `sets` (one decode call per set per step, as the engine runs them)."""
    ctx.clear()
    seqs = list(range(batch))
    ctx.set_adapters(sets[0])
    ctx.decode([(q, list(range(100, 116)), 0) for q in seqs])
    start = time.perf_counter()
    for i in range(steps):
        for g, adapters in enumerate(sets):
            members = seqs[g::len(sets)]
            if members:
                ctx.set_adapters(adapters)
                ctx.decode([(q, [200 + i], 16 + i) for q in members])
    return batch * steps / (time.perf_counter() - start)


def _torch_step_tok_s(tl: TemporalLoRA, weights: torch.Tensor, steps: int) -> float:
    """Tokens/s of the torch engine's decoding step: one forward of the whole batch, per-row adapters."""
    batch = len(weights)
    with torch.no_grad(), tl.mixer.weights(weights):
        cache = tl.model(input_ids=torch.arange(100, 116).repeat(batch, 1), use_cache=True).past_key_values
        start = time.perf_counter()
        for i in range(steps):
            cache = tl.model(input_ids=torch.full((batch, 1), 200 + i), past_key_values=cache,
                             use_cache=True).past_key_values
    return batch * steps / (time.perf_counter() - start)


def step_throughput(tl: TemporalLoRA, runtime, threads: int, batches=(1, 4, 16), steps: int = 8,
                    reps: int = 3) -> dict:
    """Decoding-step tokens/s by batch size: llama.cpp with one adapter set for the whole batch, and
    with the batch spread over every domain (hard routing of mixed requests), vs the torch step.
    This is why the engines rank as they do under load (see the module docstring of the engine)."""
    n = len(tl.domains)
    one = [runtime.adapter_set(torch.eye(len(runtime.adapter_files))[0])]
    every = [runtime.adapter_set(torch.eye(len(runtime.adapter_files))[i]) for i in range(n)]
    ctx = LlamaContext(runtime.model, n_seq=max(batches), n_ctx_seq=64, n_threads=threads,
                       kv_f32=runtime.weights == "f32")
    rows: dict[str, dict[str, float]] = {"llama.cpp, one adapter set": {}, f"llama.cpp, {n} adapter sets": {},
                                         "torch, per-row adapters": {}}
    try:
        for b in batches:
            mixed = torch.eye(len(runtime.adapter_files))[[i % n for i in range(b)]]
            calls = {"llama.cpp, one adapter set": lambda b=b: _llamacpp_step_tok_s(ctx, one, b, steps),
                     f"llama.cpp, {n} adapter sets": lambda b=b: _llamacpp_step_tok_s(ctx, every, b, steps),
                     "torch, per-row adapters": lambda w=mixed: _torch_step_tok_s(tl, w, steps)}
            for name, fn in calls.items():
                rows[name][str(b)] = _median([fn() for _ in range(reps)])
    finally:
        ctx.close()
    return rows


def _machine() -> dict:
    """What the settings record about the machine, read when a run ends (the load average then)."""
    return {"hardware": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU)",
            "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _serve_phase(bundle: Path, engine: str, threads: int, requests: list[dict], clients: int, duration: float,
                 batch1: list[str], new_tokens: int, reps: int, mode: str, weights: str = "f32") -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(bundle, port, 16, clients, extra=["--engine", engine, "--engine-threads", str(threads),
                                                          "--mode", mode, "--engine-weights", weights])
    try:
        rates = []
        for _ in range(reps):
            for prompt in batch1:
                start = time.perf_counter()
                resp = httpx.post(url + "/v1/completions", timeout=600, json={
                    "model": "auto", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0})
                resp.raise_for_status()
                rates.append(resp.json()["usage"]["completion_tokens"] / (time.perf_counter() - start))
        refs, ref_wall = asyncio.run(references(url, requests))
        result = asyncio.run(load(url, requests, refs, clients, duration))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    result["batch1_tok_s"] = _median(rates)
    result["sequential_tok_s"] = round(sum(r[2] for r in refs) / ref_wall, 2)
    return result


def run_engine_bench(bundle: Path, out: Path = OUT, *, threads: int = 1, reps: int = 3, new_tokens: int = 128,
                     clients: int = 16, duration: float = 30.0, load_max_tokens: int = 24,
                     n_prompts: int = 3) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the torch engine here and in the servers started
    torch.set_num_threads(threads)
    tl = TemporalLoRA.from_pretrained(bundle)
    requests = build_requests(bundle, 16, load_max_tokens)
    prompts = [r["prompt"] for r in requests]
    ids = [tokenize(tl.tokenizer, p, "prompt") for p in prompts]
    batch1 = ids[:n_prompts]
    t0 = time.perf_counter()

    reference = Engine(tl, max_batch=8)
    fast = LlamaCppEngine(tl, max_batch=8, n_threads=threads, n_ctx_seq=512)
    alone_model = LlamaModel(fast.runtime.base_path)
    alone = LlamaContext(alone_model, n_seq=1, n_ctx_seq=512, n_threads=threads)
    eos = fast.eos_ids
    speed: dict[str, dict[str, list[float]]] = {}
    try:
        for variant, route_of in (("routed (hard)", lambda x: Route(route_ids=x)),
                                  ("no adapter", lambda x: Route(domain="base")),
                                  ("soft mix", lambda x: Route(route_ids=x, mode="soft"))):
            rows = speed.setdefault(variant, {"llama.cpp": [], "tlora": [], "tlora_pytorch": [], "ratio": [],
                                              "decode_share": []})
            for _ in range(reps):
                for x in batch1:
                    route = route_of(x)
                    w = (_weights_for(tl, x, route.mode) if route.domain is None
                         else torch.zeros(len(tl.mixer.adapter_names)))
                    rows["llama.cpp"].append(_raw_tok_s(alone, x, fast.runtime.adapter_set(w), new_tokens, eos))
                    fast.decode_seconds, start = 0.0, time.perf_counter()
                    rows["tlora"].append(_engine_tok_s(fast, x, route, new_tokens))
                    # Of the request's wall time, the share inside llama.cpp's decode calls (the rest:
                    # routing, sampling, detokenising, the worker thread's hand-offs).
                    rows["decode_share"].append(fast.decode_seconds / (time.perf_counter() - start))
                    rows["ratio"].append(rows["tlora"][-1] / rows["llama.cpp"][-1])  # pairs measured back to back
                    rows["tlora_pytorch"].append(_engine_tok_s(reference, x, route, new_tokens))
        greedy32 = Sampling(max_new_tokens=32, temperature=0)
        ref_texts = [generate(reference, [x], route=Route(route_ids=x), sampling=greedy32)[0]["text"] for x in ids]
        fast_texts = [generate(fast, [x], route=Route(route_ids=x), sampling=greedy32)[0]["text"] for x in ids]
        gaps = [_logprob_gap(tl, fast.runtime, x, _weights_for(tl, x, "hard")) for x in ids]
        steps = step_throughput(tl, fast.runtime, threads)
    finally:
        alone.close()
        alone_model.close()
        fast.close()
    quantised = {}
    for weights in ("q8_0", "q4_1"):
        engine = LlamaCppEngine(tl, weights=weights, max_batch=8, n_threads=threads, n_ctx_seq=512)
        try:
            rates = [_engine_tok_s(engine, x, Route(route_ids=x), new_tokens) for _ in range(reps) for x in batch1]
            texts = [generate(engine, [x], route=Route(route_ids=x), sampling=greedy32)[0]["text"] for x in ids]
            qgaps = [_logprob_gap(tl, engine.runtime, x, _weights_for(tl, x, "hard")) for x in ids]
        finally:
            engine.close()
        quantised[weights] = {"batch1_tok_s": _median(rates),
                              "agreement_first32": _agree(texts, ref_texts),
                              "mean_logprob_gap": round(float(np.mean(qgaps)), 4)}
    reference.close()
    library_s = time.perf_counter() - t0

    serve = {}
    batch1_prompts = prompts[:len(batch1)]
    for engine in ("llama-cpp", "torch"):
        serve[engine] = {mode: _serve_phase(bundle, engine, threads, requests, clients, duration,
                                            batch1_prompts, new_tokens, reps, mode)
                         for mode in ("hard", "soft")}
    # The declared fast mode under load: a quantised base is ~3x faster per decode call, which is
    # what one call per adapter set costs when requests are routed to several domains.
    fast_load = _serve_phase(bundle, "llama-cpp", threads, requests, clients, duration, batch1_prompts,
                             new_tokens, reps, "hard", weights="q8_0")
    quantised["q8_0"] |= {"load16_tok_s": fast_load["tokens_per_s"], "load16_errors": fast_load["errors"],
                          "load16_mismatches": fast_load["mismatches"], "serve": fast_load}
    hard = {e: serve[e]["hard"] for e in serve}
    result = {
        "weights": "f32",
        "batch1_ratio_vs_llamacpp": {v: round(statistics.median(speed[v]["ratio"]), 3) for v in speed},
        "batch1_decode_share": {v: round(statistics.median(speed[v]["decode_share"]), 4) for v in speed},
        "batch1_tok_s": {"llama.cpp": _median(speed["routed (hard)"]["llama.cpp"]),
                         "tlora": _median(speed["routed (hard)"]["tlora"]),
                         "tlora_serve": hard["llama-cpp"]["batch1_tok_s"],
                         "tlora_pytorch": _median(speed["routed (hard)"]["tlora_pytorch"]),
                         "tlora_pytorch_serve": hard["torch"]["batch1_tok_s"]},
        "agreement_first32": _agree(fast_texts, ref_texts),
        "mean_logprob_gap": round(float(np.mean(gaps)), 5),
        "load16_tok_s": {"tlora": hard["llama-cpp"]["tokens_per_s"], "tlora_pytorch": hard["torch"]["tokens_per_s"]},
        "load16_errors": {e: hard[e]["errors"] for e in hard},
        "load16_mismatches": {e: hard[e]["mismatches"] for e in hard},
        "soft": {"batch1_tok_s": {k: _median(v) for k, v in speed["soft mix"].items() if k in ENGINES},
                 "load16_tok_s": {"tlora": serve["llama-cpp"]["soft"]["tokens_per_s"],
                                  "tlora_pytorch": serve["torch"]["soft"]["tokens_per_s"]},
                 "load16_errors": {e: serve[e]["soft"]["errors"] for e in serve},
                 "load16_mismatches": {e: serve[e]["soft"]["mismatches"] for e in serve}},
        "no_adapter_batch1_tok_s": {k: _median(v) for k, v in speed["no adapter"].items() if k in ENGINES},
        "quantised": quantised,
        "step_tok_s": steps,
        "settings": {"bundle": str(bundle), "threads": threads, "repeats": reps, "new_tokens": new_tokens,
                     "batch1_prompts": len(batch1), "agreement_prompts": len(ids), "clients": clients,
                     "load_duration_s": duration, "load_max_tokens": load_max_tokens, "server_max_batch": 16,
                     **_machine(),
                     "library_phase_s": round(library_s, 1)},
        "serve": serve,
    }
    write_results(out, "engine", result, table(result))
    return result


def run_load_comparison(bundle: Path, out: Path = OUT, *, threads: int = 1, reps: int = 1, new_tokens: int = 128,
                        clients: int = 16, duration: float = 30.0, load_max_tokens: int = 24,
                        n_prompts: int = 3) -> dict:
    """Only the 16-client hard-routing load, back to back: the llama.cpp engine with the exact F32
    base and with q8_0 (the declared fast mode), and the torch engine; engine_load.json."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the servers started here
    requests = build_requests(bundle, 16, load_max_tokens)
    prompts = [r["prompt"] for r in requests[:n_prompts]]
    runs = {f"{engine} {weights}": _serve_phase(bundle, engine, threads, requests, clients, duration, prompts,
                                                new_tokens, reps, "hard", weights=weights)
            for engine, weights in (("llama-cpp", "q8_0"), ("torch", "f32"), ("llama-cpp", "f32"))}
    result = {"load16_tok_s": {k: v["tokens_per_s"] for k, v in runs.items()},
              "load16_errors": {k: v["errors"] for k, v in runs.items()},
              "load16_mismatches": {k: v["mismatches"] for k, v in runs.items()},
              "settings": {"bundle": str(bundle), "threads": threads, "clients": clients, "load_duration_s": duration,
                           "load_max_tokens": load_max_tokens, "server_max_batch": 16, "mode": "hard",
                           **_machine()},
              "serve": runs}
    lines = ["| 16 clients, hard routing, mixed domains | completion tokens/s | errors | mismatches vs alone |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['tokens_per_s']} | {v['errors']} | {v['mismatches']} |" for k, v in runs.items()]
    write_results(out, "engine_load", result, "\n".join(lines) + "\n")
    return result


def table(r: dict) -> str:
    b, s, q, n = r["batch1_tok_s"], r["soft"], r["quantised"], r["no_adapter_batch1_tok_s"]
    cfg = r["settings"]
    lines = [
        f"CPU engines on {cfg['bundle']} ({cfg['hardware']}, {cfg['threads']} thread(s) for every engine; "
        f"greedy, up to {cfg['new_tokens']} new tokens, medians of {cfg['repeats']} x {cfg['batch1_prompts']} "
        f"prompts; 1-min load average at the end {cfg['load_average_at_end']:.1f}).",
        "",
        "| tokens/s | llama.cpp alone (adapter chosen in advance) | tlora, llama.cpp engine (library) | "
        "tlora, llama.cpp engine (`tlora serve`) | tlora, torch engine (library) | tlora, torch engine (serve) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| batch 1, routed (hard), F32 | {b['llama.cpp']} | {b['tlora']} | {b['tlora_serve']} | "
        f"{b['tlora_pytorch']} | {b['tlora_pytorch_serve']} |",
        f"| batch 1, no adapter | {n['llama.cpp']} | {n['tlora']} | | {n['tlora_pytorch']} | |",
        f"| batch 1, soft mix | {s['batch1_tok_s']['llama.cpp']} | {s['batch1_tok_s']['tlora']} | | "
        f"{s['batch1_tok_s']['tlora_pytorch']} | |",
        f"| {cfg['clients']} clients, hard routing, mixed domains | | | {r['load16_tok_s']['tlora']} "
        f"({r['load16_errors']['llama-cpp']} errors, {r['load16_mismatches']['llama-cpp']} mismatches) | | "
        f"{r['load16_tok_s']['tlora_pytorch']} ({r['load16_errors']['torch']} errors, "
        f"{r['load16_mismatches']['torch']} mismatches) |",
        f"| {cfg['clients']} clients, soft routing | | | {s['load16_tok_s']['tlora']} "
        f"({s['load16_errors']['llama-cpp']} errors, {s['load16_mismatches']['llama-cpp']} mismatches) | | "
        f"{s['load16_tok_s']['tlora_pytorch']} ({s['load16_errors']['torch']} errors, "
        f"{s['load16_mismatches']['torch']} mismatches) |",
        "",
        "Our llama.cpp engine (library) / llama.cpp alone, median of the ratios of requests measured back to "
        "back: " + ", ".join(f"{v} {x}x" for v, x in r.get("batch1_ratio_vs_llamacpp", {}).items())
        + "; share of a request's time inside llama.cpp's decode calls: "
        + ", ".join(f"{v} {x:.1%}" for v, x in r.get("batch1_decode_share", {}).items()) + ".",
        "",
        f"Agreement with the torch float32 engine, greedy first 32 tokens on the load test's "
        f"{cfg['agreement_prompts']} prompts: F32 {r['agreement_first32']:.0%} (mean log-prob gap "
        f"{r['mean_logprob_gap']}).",
        "",
        "| quantised base (declared fast mode, not exact) | batch 1 tokens/s (library) | agreement, first 32 | "
        "mean log-prob gap | 16 clients, hard routing (`tlora serve`) |",
        "|---|---:|---:|---:|---:|",
        *[f"| {w} | {v['batch1_tok_s']} | {v['agreement_first32']:.0%} | {v['mean_logprob_gap']} | "
          + (f"{v['load16_tok_s']} ({v['load16_errors']} errors, {v['load16_mismatches']} mismatches)"
             if "load16_tok_s" in v else "") + " |" for w, v in q.items()],
        "",
        "Decoding steps alone (tokens/s of one step of B sequences, F32, no sampling or serving; medians of 3):",
        "",
        "| step | " + " | ".join(f"B={b}" for b in r["step_tok_s"]["torch, per-row adapters"]) + " |",
        "|---|" + "---:|" * len(r["step_tok_s"]["torch, per-row adapters"]),
        *[f"| {name} | " + " | ".join(str(v) for v in row.values()) + " |" for name, row in r["step_tok_s"].items()],
        "",
    ]
    return "\n".join(lines)


@dataclass
class EngineSettings:
    """The flags of `python -m benchmarks engine`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle every engine serves")
    out: Path = flag(OUT, "engine.json, engine.md (--load-only: engine_load.json, .md)")
    threads: int = flag(1, "CPU threads of every engine")
    repeats: int = flag(3, "repeats of the batch-1 measurements (medians reported)")
    new_tokens: int = flag(128, "greedy new tokens per request")
    clients: int = flag(16, "concurrent clients of the load runs")
    duration: float = flag(30.0, "seconds of each load run")
    prompts: int = flag(3, "prompts of the batch-1 measurements")
    load_only: bool = flag(False, "only the 16-client hard-routing load: llama.cpp F32 and q8_0, torch, one "
                           "repeat each (engine_load.json)")


def run(settings: EngineSettings) -> dict:
    """Measure every engine (or only the load comparison), print the table; returns what
    engine.json (engine_load.json) holds."""
    if settings.load_only:
        result = run_load_comparison(settings.bundle, settings.out, threads=settings.threads,
                                     clients=settings.clients, duration=settings.duration,
                                     new_tokens=settings.new_tokens, n_prompts=settings.prompts)
        print((settings.out / "engine_load.md").read_text())
        return result
    result = run_engine_bench(settings.bundle, settings.out, threads=settings.threads, reps=settings.repeats,
                              new_tokens=settings.new_tokens, clients=settings.clients, duration=settings.duration,
                              n_prompts=settings.prompts)
    print(table(result))
    return result

"""Load test of `tlora serve` over loopback: N concurrent clients for a bounded time.

Starts the server as a separate process, sends every distinct request once alone (the references,
and the one-at-a-time throughput baseline), then lets N clients loop over the same requests for
`--duration` seconds — plain and streaming, auto-routed and forced — and checks every answer
against its reference. Writes JSON and a markdown table.

    python -m benchmarks load --bundle runs/demo/bundle --clients 16 --duration 60
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.flags import flag
from temporal_lora.evaluate import held_out_chunks
from temporal_lora.model import TemporalLoRA


def build_requests(bundle: Path, n: int, max_tokens: int) -> list[dict]:
    """Distinct requests from held-out test documents of every domain, in several settings."""

    tl = TemporalLoRA.from_pretrained(bundle)
    sets = held_out_chunks(tl, 4, block_size=48, seed=11)
    prompts = [(d, tl.tokenizer.decode(c)) for i in range(4) for d, chunks in sets.items() for c in chunks[i:i + 1]]
    requests = []
    for i in range(n):
        domain, prompt = prompts[i % len(prompts)]
        model = ["auto", "auto", domain, "base"][i % 4]
        requests.append({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": [0, 0.8][i % 2], "seed": 1000 + i, "repetition_penalty": 1.2,
                         "stream": i % 3 == 0})
    return requests


async def send(client: httpx.AsyncClient, body: dict, pause: float = 0.0) -> tuple[str, str, int]:
    """(text, route, completion tokens) of one request, reading streams to the end (a slow reader
    waits `pause` seconds after each event)."""
    if not body["stream"]:
        resp = await client.post("/v1/completions", json=body)
        resp.raise_for_status()
        data = resp.json()
        return data["choices"][0]["text"], resp.headers["x-route"], data["usage"]["completion_tokens"]
    text, tokens = [], 0
    async with client.stream("POST", "/v1/completions",
                             json={**body, "stream_options": {"include_usage": True}}) as resp:
        resp.raise_for_status()
        route = resp.headers["x-route"]
        async for line in resp.aiter_lines():
            if pause:
                await asyncio.sleep(pause)
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text.append(choice["text"])
    return "".join(text), route, tokens


async def references(url: str, requests: list[dict]) -> tuple[list[tuple[str, str, int]], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        refs = [await send(client, r) for r in requests]
        return refs, time.perf_counter() - start


async def load(url: str, requests: list[dict], refs, clients: int, duration: float) -> dict:
    latencies, errors, mismatches, tokens, served = [], [], 0, 0, 0
    stop_at = time.perf_counter() + duration

    async def client_loop(cid: int, client: httpx.AsyncClient):
        nonlocal mismatches, tokens, served
        i = cid
        while time.perf_counter() < stop_at:
            body = requests[i % len(requests)]
            t0 = time.perf_counter()
            try:
                got = await send(client, body)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            else:
                latencies.append(time.perf_counter() - t0)
                served += 1
                tokens += got[2]
                if got[:2] != refs[i % len(requests)][:2]:
                    mismatches += 1
            i += clients

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "wall_s": round(wall, 2), "requests": served, "errors": len(errors),
            "error_samples": errors[:5], "mismatches": mismatches, "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(served / wall, 3),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, max_batch: int, clients: int,
                 max_concurrency: int | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    """`extra`: more `tlora serve` arguments (e.g. ["--engine", "llama-cpp"])."""
    limit = max_concurrency or max(clients * 2, 32)
    cmd = [sys.executable, "-m", "temporal_lora.cli", "serve", "--bundle", str(bundle), "--port", str(port),
           "--max-batch", str(max_batch), "--max-concurrency", str(limit), *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)


def prepare(bundle: Path, n_requests: int, max_tokens: int) -> tuple[list[dict], int, str]:
    """Offline, quiet library logs; the distinct requests; a free loopback port and its URL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    requests = build_requests(bundle, n_requests, max_tokens)
    port = free_port()
    return requests, port, f"http://127.0.0.1:{port}"


@dataclass
class LoadSettings:
    """The flags of `python -m benchmarks load`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle the server serves")
    clients: int = flag(16, "concurrent clients")
    duration: float = flag(60.0, "seconds of concurrent load")
    requests: int = flag(16, "distinct requests (each gets a reference)")
    max_tokens: int = flag(24, "max_tokens of every request")
    max_batch: int = flag(16, "the server's --max-batch")
    out: Path = flag(Path("runs/bench/load"), "load.json, load.md")


def run(settings: LoadSettings) -> dict:
    """Run the load test, print the table; returns what load.json holds."""
    requests, port, url = prepare(settings.bundle, settings.requests, settings.max_tokens)
    proc = start_server(settings.bundle, port, settings.max_batch, settings.clients)
    try:
        refs, ref_wall = asyncio.run(references(url, requests))
        before = _batch_stats(httpx.get(url + "/metrics").text)
        result = asyncio.run(load(url, requests, refs, settings.clients, settings.duration))
        after = _batch_stats(httpx.get(url + "/metrics").text)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    sequential_tps = sum(r[2] for r in refs) / ref_wall
    report = {"bundle": str(settings.bundle), "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU)",
              "settings": {"max_tokens": settings.max_tokens, "max_batch": settings.max_batch,
                           "distinct_requests": len(requests), "duration_s": settings.duration},
              "sequential": {"requests": len(refs), "wall_s": round(ref_wall, 2),
                             "tokens_per_s": round(sequential_tps, 2)},
              "concurrent": result,
              "throughput_ratio_vs_sequential": round(result["tokens_per_s"] / sequential_tps, 2),
              # rows per decoding step during the concurrent phase (the engine's histogram, differenced)
              "mean_batch_size": round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)}
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "load.json").write_text(json.dumps(report, indent=2))
    md = table(report)
    (settings.out / "load.md").write_text(md)
    print(md)
    return report


def _batch_stats(metrics: str) -> tuple[float, float]:
    """(sum, count) of the engine's batch-size histogram: rows summed over decoding steps, steps."""
    values = {"tlora_batch_size_sum": 0.0, "tlora_batch_size_count": 0.0}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values["tlora_batch_size_sum"], values["tlora_batch_size_count"]


def table(r: dict) -> str:
    c, s = r["concurrent"], r["sequential"]
    return "\n".join([
        f"Load test: {c['clients']} concurrent clients for {r['settings']['duration_s']:.0f} s over loopback, "
        f"{r['settings']['max_tokens']} new tokens per request ({r['hardware']}).",
        "",
        "| | requests | errors | mismatches vs alone | completion tokens/s | p50 latency | p95 latency |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| one at a time | {s['requests']} | 0 | (reference) | {s['tokens_per_s']:.1f} | | |",
        f"| {c['clients']} concurrent | {c['requests']} | {c['errors']} | {c['mismatches']} | "
        f"{c['tokens_per_s']:.1f} | {c['latency_p50_s']} s | {c['latency_p95_s']} s |",
        "",
        f"Throughput vs one at a time: **{r['throughput_ratio_vs_sequential']:.2f}x** "
        f"(mean engine batch {r['mean_batch_size']}).",
        "",
    ])



"""Soak test of `tlora serve` under faults: is anything lost, wrong or leaking after a long run?

The server runs as its own process with a low concurrency limit. Every distinct request is first
sent alone (its reference). Then, for `--rounds` rounds of `--round-seconds` each, at the same time:
normal clients loop over the requests (plain and streamed), slow readers pause between events,
clients hang up after the first event, and bursts of 3x the limit arrive at once. Every accepted
answer (slow readers' included) is compared with its reference; shed requests must get 429. The server's RSS is sampled
after every round. Writes soak.json and soak.md.

    python -m benchmarks soak --bundle runs/demo/bundle --rounds 6 --round-seconds 30
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.flags import flag
from benchmarks.load import prepare, references, send, start_server


class Tally:
    def __init__(self, refs):
        self.refs = refs
        self.counts: Counter = Counter()
        self.errors: list[str] = []

    async def one(self, client: httpx.AsyncClient, requests: list[dict], i: int, kind: str,
                  pause: float = 0.0) -> bool:
        """Send request i; count it as served (and check it), shed (429) or an error. False if shed."""
        body = requests[i % len(requests)]
        if pause:
            body = {**body, "stream": True}
        try:
            got = await send(client, body, pause)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 429:
                self.counts[f"{kind} shed (429)"] += 1
                return False
            self._error(exc)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self._error(exc)
        else:
            self.counts[f"{kind} served"] += 1
            if got[:2] != self.refs[i % len(requests)][:2]:
                self.counts["mismatches"] += 1
        return True

    def _error(self, exc: Exception) -> None:
        self.counts["errors"] += 1
        self.errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def hang_up(client: httpx.AsyncClient, body: dict, tally: Tally) -> None:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        if resp.status_code == 429:
            tally.counts["hang-up shed (429)"] += 1
            await asyncio.sleep(0.5)
            return
        async for _ in resp.aiter_lines():
            break  # the first event, then the connection is closed
    tally.counts["hung up mid-stream"] += 1


async def soak_round(url: str, requests: list[dict], tally: Tally, seconds: float, clients: int,
                     limit: int, offset: int) -> None:
    stop_at = time.perf_counter() + seconds

    async def normal(cid: int, client):
        i = offset + cid
        while time.perf_counter() < stop_at:
            if not await tally.one(client, requests, i, "normal"):
                await asyncio.sleep(0.5)  # a polite client backs off when shed (the server says Retry-After: 1)
            i += clients

    async def faults(client):
        k = offset
        while time.perf_counter() < stop_at:
            slow = tally.one(client, requests, k, "slow reader", pause=0.3)
            served, _ = await asyncio.gather(slow, hang_up(client, requests[(k + 1) % len(requests)], tally))
            if not served:
                await asyncio.sleep(0.5)  # backs off, as a polite client does
            k += 2

    async def bursts(client):
        b = offset
        while time.perf_counter() < stop_at - 2:
            await asyncio.sleep(seconds / 4)
            await asyncio.gather(*(tally.one(client, requests, b + j, "burst") for j in range(3 * limit)))
            b += 3 * limit

    limits = httpx.Limits(max_connections=clients + 4 * limit + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(normal(c, client) for c in range(clients)), faults(client), bursts(client))


@dataclass
class SoakSettings:
    """The flags of `python -m benchmarks soak` (soak.json records them)."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle the server serves")
    rounds: int = flag(6, "rounds of load (RSS sampled after each)")
    round_seconds: float = flag(30.0, "seconds of each round")
    clients: int = flag(6, "normal clients looping over the requests")
    limit: int = flag(8, "the server's --max-concurrency")
    requests: int = flag(16, "distinct requests (each gets a reference)")
    max_tokens: int = flag(16, "max_tokens of every request")
    out: Path = flag(Path("runs/bench/soak"), "soak.json, soak.md")


def run(settings: SoakSettings) -> dict:
    """Run the soak test, print the table; returns what soak.json holds."""
    requests, port, url = prepare(settings.bundle, settings.requests, settings.max_tokens)
    proc = start_server(settings.bundle, port, max_batch=16, clients=settings.clients, max_concurrency=settings.limit)
    server = psutil.Process(proc.pid)
    mb = lambda: round(server.memory_info().rss / 2**20, 1)  # noqa: E731
    try:
        refs, _ = asyncio.run(references(url, requests))
        tally = Tally(refs)
        rss = [mb()]  # after the references: model loaded, every code path warmed up once
        in_flight = []
        for r in range(settings.rounds):
            asyncio.run(soak_round(url, requests, tally, settings.round_seconds, settings.clients, settings.limit,
                                   offset=r * 7))
            time.sleep(1.0)
            in_flight.append(httpx.get(url + "/health").json()["in_flight"])
            rss.append(mb())
            print(f"round {r + 1}/{settings.rounds}: RSS {rss[-1]} MiB, in flight {in_flight[-1]}, {dict(tally.counts)}",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    half = len(rss) // 2
    report = {"bundle": str(settings.bundle), "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU)",
              "settings": asdict(settings) | {"bundle": str(settings.bundle), "out": str(settings.out)},
              "counts": dict(sorted(tally.counts.items())), "error_samples": tally.errors[:5],
              "served": sum(v for k, v in tally.counts.items() if k.endswith("served")),
              "shed_429": sum(v for k, v in tally.counts.items() if "shed" in k),
              "errors": tally.counts["errors"], "mismatches": tally.counts["mismatches"],
              "in_flight_after_each_round": in_flight,
              "rss_mib": rss, "rss_growth_mib": round(rss[-1] - rss[0], 1),
              "rss_growth_second_half_mib": round(rss[-1] - rss[half], 1)}
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "soak.json").write_text(json.dumps(report, indent=2))
    md = table(report)
    (settings.out / "soak.md").write_text(md)
    print(md)
    return report


def table(r: dict) -> str:
    s = r["settings"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in r["counts"].items())
    return "\n".join([
        f"Soak test: {s['rounds']} rounds x {s['round_seconds']:.0f} s, {s['clients']} normal clients, "
        f"concurrency limit {s['limit']}, slow readers, hang-ups and bursts of {3 * s['limit']} "
        f"({r['hardware']}).",
        "",
        "| requests | count |",
        "|---|---:|",
        rows,
        "",
        f"Served {r['served']}, shed with 429: {r['shed_429']}, errors {r['errors']}, "
        f"mismatches vs alone {r['mismatches']}; in flight after each round: {r['in_flight_after_each_round']}.",
        "",
        f"Server RSS (MiB) after warm-up and after each round: {r['rss_mib']} — growth "
        f"{r['rss_growth_mib']:+.1f} MiB in all, {r['rss_growth_second_half_mib']:+.1f} MiB over the second half.",
        "",
    ])



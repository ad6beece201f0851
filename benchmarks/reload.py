"""Hot reload under load: a new bundle version goes live in a running `tlora serve`, nothing dropped.

Copies `--bundle` to a scratch directory (the original is untouched) and serves the copy as its own
process. Sends every distinct request once alone (references on the old version), then lets N
clients loop over them while `add-domain` commits a new version of the copy and `POST /admin/reload`
swaps it in. Every answer says which bundle version produced it (`routing.bundle_version`); each is
compared with that version's one-at-a-time reference (the new version's are taken right after the
swap). Then a deliberately corrupted version is committed: it must be refused while the clients keep
getting the new version's answers. The server's RSS is sampled throughout (psutil).

    python -m benchmarks reload --bundle runs/demo/bundle --clients 16

Writes reload.json and reload.md to --out and copies them to benchmarks/results/serve/ (--no-copy: not).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.flags import flag
from benchmarks.load import build_requests, free_port
from temporal_lora.bundle import write_atomic_dir
from temporal_lora.evolve import add_domain
from temporal_lora.evolve.common import bundle_train_config
from temporal_lora.model import TemporalLoRA
from temporal_lora.train import load_domain_data

RESULTS = Path("benchmarks/results/serve")  # relative to the repository root, where the script runs
BUILTIN = ["medical", "legal", "technical", "code", "literature"]


async def send(client: httpx.AsyncClient, body: dict) -> dict:
    """One request, streams read to the end: text, route, bundle version, completion tokens."""
    if not body["stream"]:
        resp = await client.post("/v1/completions", json=body)
        resp.raise_for_status()
        data = resp.json()
        return {"text": data["choices"][0]["text"], "route": resp.headers["x-route"],
                "version": data["routing"]["bundle_version"], "tokens": data["usage"]["completion_tokens"]}
    text, tokens, version = [], 0, None
    async with client.stream("POST", "/v1/completions",
                             json={**body, "stream_options": {"include_usage": True}}) as resp:
        resp.raise_for_status()
        route = resp.headers["x-route"]
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("routing"):
                version = chunk["routing"]["bundle_version"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            text += [c["text"] for c in chunk["choices"]]
    return {"text": "".join(text), "route": route, "version": version, "tokens": tokens}


async def references(url: str, requests: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await send(client, r) for r in requests]


class Load:
    """N clients looping over the requests until `stop` is set; every answer kept with its start time."""

    def __init__(self, url: str, requests: list[dict], clients: int):
        self.url, self.requests, self.clients = url, requests, clients
        self.answers: list[tuple[float, int, dict]] = []  # (start time, request index, answer)
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async def loop(cid: int, client: httpx.AsyncClient):
            i = cid
            while not self.stop.is_set():
                index = i % len(self.requests)
                t0 = time.monotonic()
                try:
                    self.answers.append((t0, index, await send(client, self.requests[index])))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                i += self.clients

        limits = httpx.Limits(max_connections=self.clients + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits) as client:
            await asyncio.gather(*(loop(c, client) for c in range(self.clients)))


class RSS:
    """Samples the server's resident memory every `every` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.25):
        self.proc, self.every, self.samples = psutil.Process(pid), every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except psutil.Error:
                return

    def now(self) -> int:
        return self.proc.memory_info().rss

    def peak(self, since: float, until: float) -> int:
        return max((r for t, r in self.samples if since <= t <= until), default=0)

    def close(self):
        self._stop.set()
        self._thread.join()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def new_domain_requests(bundle: Path, name: str, data: Path | None, n: int, max_tokens: int) -> list[dict]:
    """Auto-routed requests on held-out (test split) text of the domain about to be added."""

    tok = TemporalLoRA.from_pretrained(bundle).tokenizer
    manifest = json.loads((bundle / "manifest.json").read_text())
    seed = (manifest.get("train_config") or {}).get("seed", 0)
    docs = load_domain_data(name, {name: data} if data else {}, seed).splits.test
    out = []
    for i, doc in enumerate(docs[:n]):
        prompt = tok.decode(tok(doc.text)["input_ids"][:48])
        out.append({"model": "auto", "prompt": prompt, "max_tokens": max_tokens, "temperature": [0, 0.8][i % 2],
                    "seed": 5000 + i, "repetition_penalty": 1.2, "stream": i % 2 == 0})
    return out


def corrupt_commit(bundle: Path) -> str:
    """Commit a new version whose manifest is valid but one adapter file's bytes were flipped after
    its checksum was recorded (atomically, as every tlora change is). Returns the corrupted file."""

    manifest = json.loads((bundle / "manifest.json").read_text())
    version = int(manifest["history"][-1]["version"]) + 1
    victim = next(rel for rel in manifest["files"] if rel.endswith("adapter_model.safetensors"))

    def fill(tmp: Path) -> None:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        m = dict(manifest, version=version)
        m["history"] = [*manifest["history"], {**manifest["history"][-1], "version": version, "change": "corrupt"}]
        (tmp / "manifest.json").write_text(json.dumps(m, indent=2))
        data = bytearray((tmp / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp / victim).write_bytes(bytes(data))

    write_atomic_dir(bundle, fill)
    return victim


def check(answers, refs_by_version: dict[int, list[dict]], swap_at: float | None = None) -> dict:
    """Mismatches against the reference of the version that answered; requests started after the
    swap that an old version answered."""
    mismatches, late, by_version = 0, 0, {}
    samples = []
    for t0, index, got in answers:
        by_version[got["version"]] = by_version.get(got["version"], 0) + 1
        ref = refs_by_version[got["version"]][index]
        if (got["text"], got["route"]) != (ref["text"], ref["route"]):
            mismatches += 1
            if len(samples) < 3:
                samples.append({"index": index, "version": got["version"], "got": got["route"], "ref": ref["route"]})
        if swap_at is not None and t0 > swap_at and got["version"] != max(refs_by_version):
            late += 1
    return {"requests": len(answers), "mismatches": mismatches, "by_version": by_version,
            "started_after_swap_on_old_version": late, "mismatch_samples": samples}


@dataclass
class ReloadSettings:
    """The flags of `python -m benchmarks reload`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle to copy and serve (left untouched)")
    name: str | None = flag(None, "domain to add (default: the first built-in one the bundle lacks)")
    data: Path | None = flag(None, "its corpus folder (default: the built-in corpus)")
    steps: int = flag(4, "training steps of the new adapter (kept short)")
    clients: int = flag(16, "concurrent clients")
    requests: int = flag(16, "distinct requests on the old domains")
    new_requests: int = flag(4, "distinct auto requests on the new domain's text")
    max_tokens: int = flag(24, "max_tokens of every request")
    max_batch: int = flag(16, "the server's --max-batch")
    settle: float = flag(10.0, "seconds of load before the change and after the swap")
    out: Path = flag(Path("runs/bench/reload"), "reload.json, reload.md, server.log")
    no_copy: bool = flag(False, "do not copy the results to benchmarks/results/serve/")


def run(settings: ReloadSettings) -> dict:
    """Run the hot-reload test, print the table; returns what reload.json holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    scratch = Path(tempfile.mkdtemp(prefix="tlora-reload-"))
    bundle = scratch / "bundle"
    shutil.copytree(settings.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = settings.name or next(d for d in BUILTIN if d not in manifest["domains"])
    requests = build_requests(bundle, settings.requests, settings.max_tokens)
    requests += new_domain_requests(bundle, name, settings.data, settings.new_requests, settings.max_tokens)
    new_idx = range(settings.requests, len(requests))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "temporal_lora.cli", "serve", "--bundle", str(bundle), "--port", str(port),
           "--max-batch", str(settings.max_batch), "--max-concurrency", str(max(2 * settings.clients, 32)),
           "--reload-poll", "0"]
    log_path = settings.out / "server.log"
    settings.out.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as server_log:
        proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        wait(lambda: _up(url) or proc.poll() is not None, 600, "the server")
        if proc.poll() is not None:
            raise SystemExit(f"server did not start; see {log_path}")
        rss = RSS(proc.pid)
        refs = {1: asyncio.run(references(url, requests))}
        rss_before = rss.now()
        cfg = dataclasses.replace(bundle_train_config(manifest), steps=settings.steps)
        timing: dict[str, float] = {}

        async def hot_reload() -> tuple[Load, dict]:
            load = Load(url, requests, settings.clients)
            runner = asyncio.create_task(load.run())
            await asyncio.sleep(settings.settle)
            t0 = time.monotonic()
            await asyncio.to_thread(add_domain, bundle, name, data=settings.data, corpus=None if settings.data else name,
                                    config=cfg, progress=False, log=lambda *a: None)
            timing["add_domain_s"] = round(time.monotonic() - t0, 1)
            t1 = time.monotonic()
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                done = (await client.post("/admin/reload")).json()
            timing["reload_s"] = round(time.monotonic() - t1, 2)
            timing["swap_at"] = time.monotonic()
            await asyncio.sleep(settings.settle)
            load.stop.set()
            await runner
            timing["end"] = time.monotonic()
            return load, done

        t_start = time.monotonic()
        load, done = asyncio.run(hot_reload())
        wait(lambda: metric(url, "tlora_bundle_versions_alive") == 1, 300, "the old version to drain")
        time.sleep(2)
        rss_peak, rss_after = rss.peak(t_start, time.monotonic()), rss.now()
        refs[2] = asyncio.run(references(url, requests))
        swap = check(load.answers, refs, swap_at=timing["swap_at"])
        new_routed = sum(1 for t0, i, got in load.answers if got["version"] == 2 and i in new_idx and got["route"] == name)
        new_sent = sum(1 for t0, i, got in load.answers if got["version"] == 2 and i in new_idx)

        # A corrupted version: refused, the clients keep getting version 2's answers.
        victim = corrupt_commit(bundle)

        async def corrupt_phase() -> tuple[Load, httpx.Response]:
            load = Load(url, requests, settings.clients)
            runner = asyncio.create_task(load.run())
            await asyncio.sleep(settings.settle / 2)
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                resp = await client.post("/admin/reload")
            await asyncio.sleep(settings.settle / 2)
            load.stop.set()
            await runner
            return load, resp

        bad_load, refused = asyncio.run(corrupt_phase())
        bad = check(bad_load.answers, {2: refs[2]})
        still = httpx.get(url + "/v1/bundle").json()
        failures = metric(url, "tlora_reload_failures_total")
        swaps = int(metric(url, "tlora_reloads_total"))
        rss_end = rss.now()
        rss.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)

    answered = [a for _, _, a in load.answers + bad_load.answers]
    mb = 1 / 2**20
    report = {
        "requests": len(answered), "errors": len(load.errors) + len(bad_load.errors),
        "mismatches": swap["mismatches"] + bad["mismatches"], "swaps": swaps,
        "corrupt_version_refused": refused.status_code == 409 and still["version"] == 2 and failures >= 1
        and bad["by_version"].keys() <= {2},
        "bundle": str(settings.bundle), "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU)",
        "settings": {"clients": settings.clients, "distinct_requests": len(requests), "max_tokens": settings.max_tokens,
                     "max_batch": settings.max_batch, "settle_s": settings.settle, "new_domain": name,
                     "new_adapter_steps": settings.steps, "trigger": "POST /admin/reload"},
        "hot_reload": {**swap, "errors": len(load.errors), "error_samples": load.errors[:5],
                       "add_domain_s": timing["add_domain_s"], "reload_s": timing["reload_s"],
                       "reload_answer": done, "new_domain_requests_after_swap": new_sent,
                       "new_domain_requests_routed_to_it": new_routed,
                       "tokens_per_s": round(sum(a["tokens"] for _, _, a in load.answers)
                                             / (timing["end"] - t_start), 2)},
        "corrupt_version": {**bad, "errors": len(bad_load.errors), "error_samples": bad_load.errors[:5],
                            "corrupted_file": victim, "reload_status": refused.status_code,
                            "reload_message": refused.json().get("error", {}).get("message"),
                            "version_after": still["version"], "reload_failures": failures},
        "rss_mb": {"before": round(rss_before * mb), "peak_during_swap": round(rss_peak * mb),
                   "after_drain": round(rss_after * mb), "end": round(rss_end * mb)},
        "median_completion_tokens": statistics.median([a["tokens"] for a in answered]) if answered else None,
    }
    (settings.out / "reload.json").write_text(json.dumps(report, indent=2))
    md = table(report)
    (settings.out / "reload.md").write_text(md)
    if not settings.no_copy:
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(settings.out / "reload.json", RESULTS / "reload.json")
        shutil.copyfile(settings.out / "reload.md", RESULTS / "reload.md")
    print(md)
    return report


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


def table(r: dict) -> str:
    h, c, m = r["hot_reload"], r["corrupt_version"], r["rss_mb"]
    s = r["settings"]
    return "\n".join([
        f"Hot reload under load: {s['clients']} clients over loopback, {s['max_tokens']} new tokens per request, "
        f"`add-domain {s['new_domain']}` ({s['new_adapter_steps']} steps) committed mid-run, then "
        f"{s['trigger']} ({r['hardware']}; bundle {r['bundle']}).",
        "",
        "| phase | requests | errors | mismatches vs alone (same version) | answered by version | "
        "started after the swap on the old version |",
        "|---|---:|---:|---:|---|---:|",
        f"| add-domain + reload | {h['requests']} | {h['errors']} | {h['mismatches']} | "
        f"{_versions(h['by_version'])} | {h['started_after_swap_on_old_version']} |",
        f"| corrupted version committed | {c['requests']} | {c['errors']} | {c['mismatches']} | "
        f"{_versions(c['by_version'])} | - |",
        "",
        f"- Swaps: {r['swaps']}; add-domain {h['add_domain_s']} s, load beside + swap {h['reload_s']} s. "
        f"New-domain requests after the swap routed to `{s['new_domain']}`: "
        f"{h['new_domain_requests_routed_to_it']} of {h['new_domain_requests_after_swap']}.",
        f"- Corrupted version ({c['corrupted_file']}): refused = **{r['corrupt_version_refused']}** "
        f"(HTTP {c['reload_status']}, still version {c['version_after']}).",
        f"- Server RSS: {m['before']} MB before, {m['peak_during_swap']} MB peak with two versions, "
        f"{m['after_drain']} MB after the old one drained, {m['end']} MB at the end.",
        "",
    ])


def _versions(counts: dict) -> str:
    return ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items(), key=lambda kv: int(kv[0])))



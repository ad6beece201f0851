"""The server under faults: bursts above the concurrency limit, a slow reader that stalls mid-stream,
clients that hang up mid-stream. It sheds with 429, keeps serving, every accepted answer equals its
one-at-a-time reference, and nothing stays allocated afterwards. Also: no request field is a path."""

import concurrent.futures as cf
import json
import sys
import threading

import httpx
import pytest
from support.serving import load_served, pick_domain_texts, running, wait_until

from temporal_lora.server import ServerSettings, create_app

LIMIT = 4  # max concurrent requests


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return load_served(tiny_bundle)


@pytest.fixture(scope="module")
def bodies(tl):
    """Distinct requests: every domain's text, routed/forced/base, greedy/sampled, plain/streamed."""
    texts = pick_domain_texts(tl)
    out = []
    for i, (domain, text) in enumerate(sorted(texts.items()) * 2):
        out.append({"model": ["auto", domain, "base"][i % 3], "prompt": text, "max_tokens": 8,
                    "temperature": [0, 0.9][i % 2], "seed": 100 + i, "stream": i % 2 == 0})
    return out


def call(url: str, body: dict, *, stall: tuple[threading.Event, threading.Event] | None = None,
         hang_up: bool = False):
    """(status, text, route) of one completion; a stream is read to the end unless `hang_up`.
    With `stall=(stalled, resume)`, the client sets `stalled` after the first event and reads no
    more until `resume` is set."""
    if not body["stream"]:
        resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
        text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else None
        return resp.status_code, text, resp.headers.get("x-route")
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, None, None
        parts = []
        for line in resp.iter_lines():
            if hang_up:
                return 200, None, "hung up"
            if stall is not None:
                stall[0].set()
                stall[1].wait(120)
                stall = None
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                parts.extend(c["text"] for c in event["choices"])
        return 200, "".join(parts), resp.headers["x-route"]


def test_bursts_slow_readers_and_hang_ups(tl, bodies):
    app = create_app(tl, ServerSettings(max_concurrency=LIMIT, max_new_tokens=16, max_batch=8))
    engine = app.state.service.engine
    with running(app) as url:
        refs = [call(url, b) for b in bodies]
        assert all(status == 200 for status, _, _ in refs)
        health = lambda: httpx.get(url + "/health").json()["in_flight"]  # noqa: E731

        # A slow reader reads one event, then stops reading until told. (Its slot is freed when its
        # generation ends: what it has not read yet waits in its own stream's buffer.)
        stalled, resume = threading.Event(), threading.Event()
        with cf.ThreadPoolExecutor(1) as slow_pool:
            slow = slow_pool.submit(call, url, bodies[0] | {"max_tokens": 16}, stall=(stalled, resume))
            assert stalled.wait(60)

            # Clients that hang up mid-stream, while the reader stalls.
            for body in bodies[:4:2]:
                assert call(url, body | {"max_tokens": 16}, hang_up=True)[2] == "hung up"
            wait_until(lambda: health() == 0)

            # Bursts of 3x the limit while the engine is held busy: exactly LIMIT are accepted and
            # queue; every other one is shed at once with 429.
            accepted = shed = served = 0
            for burst in range(3):
                batch = [bodies[(burst * 5 + k) % len(bodies)] for k in range(3 * LIMIT)]
                with cf.ThreadPoolExecutor(len(batch)) as pool, engine._lock:
                    futures = [pool.submit(call, url, b) for b in batch]
                    shed_now = len(batch) - LIMIT
                    wait_until(lambda fs=futures, n=shed_now: sum(f.done() for f in fs) == n)
                    assert health() == LIMIT
                    assert {f.result()[0] for f in futures if f.done()} == {429}
                # Released: the queued ones finish and equal their references.
                for body, future in zip(batch, futures, strict=True):
                    status, text, route = future.result()
                    if status == 429:
                        shed += 1
                        continue
                    accepted += 1
                    ref = refs[bodies.index(body)]
                    assert (text, route) == ref[1:], body
                    served += 1
            assert (accepted, shed) == (3 * LIMIT, 3 * 2 * LIMIT)

            # Still serving while the slow reader stalls; then it reads on and gets its whole answer.
            assert call(url, bodies[1])[1:] == refs[1][1:]
            resume.set()
            slow_ref = call(url, bodies[0] | {"max_tokens": 16})
            assert slow.result()[1:] == slow_ref[1:]

        wait_until(lambda: health() == 0)
        assert engine._queue.empty()
        assert all(call(url, b)[1:] == r[1:] for b, r in zip(bodies, refs, strict=True))
        metrics = httpx.get(url + "/metrics").text
        assert f"tlora_requests_shed_total {float(shed)}" in metrics


def test_no_request_field_makes_the_server_touch_a_file(tl, tmp_path):
    """Every string field set to a file path (existing, missing, traversal): the server opens no file
    and writes none while answering (Python audit hook on `open`), and answers with 200 or a 4xx."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    paths = [str(secret), str(tmp_path / "new.txt"), "../../etc/passwd", "/etc/passwd", "file:///etc/passwd",
             str(tmp_path)]
    opened: list[str] = []
    watching = threading.Event()

    def audit(event, args):
        if watching.is_set() and event == "open" and isinstance(args[0], str) and str(tmp_path) in args[0]:
            opened.append(args[0])
        if watching.is_set() and event == "open" and args[0] in ("/etc/passwd", "../../etc/passwd"):
            opened.append(args[0])

    sys.addaudithook(audit)  # cannot be removed; it only records while `watching` is set
    app = create_app(tl, ServerSettings(max_new_tokens=4))
    with running(app) as url:
        requests = []
        for path in paths:
            requests += [
                ("/v1/completions", {"model": path, "prompt": "x"}),
                ("/v1/completions", {"model": "auto", "prompt": path, "max_tokens": 2, "stop": [path]}),
                ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": path}],
                                          "max_tokens": 2}),
                ("/v1/route", {"input": path, "segments": path}),
                ("/v1/route", {"input": [path, path]}),
                ("/v1/completions", {"model": "auto", "prompt": "x", "max_tokens": 2, "user": path,
                                     "adapter": path, "bundle": path, "lora_path": path, "file": path}),
            ]
        watching.set()
        secret.read_text()  # the hook sees opens: this one is recorded, then forgotten
        assert opened == [str(secret)]
        opened.clear()
        try:
            statuses = [httpx.post(url + route, json=body, timeout=60).status_code for route, body in requests]
        finally:
            watching.clear()
    assert opened == []
    assert all(s == 200 or 400 <= s < 500 for s in statuses), statuses
    assert not (tmp_path / "new.txt").exists() and secret.read_text() == "do not read"

"""Run a real uvicorn server for an app on a free loopback port, in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

# A minimal chat template for the tiny test tokenizer (the real model brings its own).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")

# Headless Chromium on a closed network: no background connections, first-run or component updates.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def load_served(bundle):
    """A bundle loaded for serving; the tiny test tokenizer gets a chat template. Each server in a
    test gets its own copy: in production every server process owns its model."""
    from temporal_lora.model import TemporalLoRA

    tl = TemporalLoRA.from_pretrained(bundle)
    if not getattr(tl.tokenizer, "chat_template", None):
        tl.tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tl


def pick_domain_texts(tl, seed: int = 5) -> dict[str, str]:
    """One held-out test text per domain that the router sends to that domain."""
    from temporal_lora.evaluate import held_out_chunks

    picked = {}
    for d, chunks in held_out_chunks(tl, 3, block_size=64, seed=seed).items():
        for chunk in chunks:
            text = tl.tokenizer.decode(chunk)
            if tl.route([text])[0].domain == d:
                picked[d] = text
                break
    assert set(picked) == set(tl.domains)
    return picked


@contextmanager
def running(app) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) while the server runs."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(check, timeout: float = 30.0) -> None:
    """Poll `check()` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)

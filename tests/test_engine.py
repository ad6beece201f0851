"""The server's batching engine on a tiny bundle: joining and leaving a running batch changes nothing."""

import threading

import pytest
import torch
from support.serving import load_served, pick_domain_texts

from temporal_lora.server.engine import Engine, Job, Route, Sampling


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return load_served(tiny_bundle)


class Collector:
    def __init__(self):
        self.text, self.reason, self.route, self.events = "", None, None, 0
        self.done = threading.Event()
        self.started = threading.Event()

    def __call__(self, kind, *args):
        self.events += 1
        if kind == "route":
            self.route = args[1]
        elif kind == "text":
            self.text += args[0]
            self.started.set()
        elif kind == "done":
            self.reason = args[0]
            self.done.set()
        elif kind == "error":
            self.reason = f"error: {args[0]}"
            self.done.set()


def run(engine, tl, text, domain, sampling, *, wait=True):
    out = Collector()
    ids = tl.tokenizer(text, add_special_tokens=False)["input_ids"]
    route = Route(domain=domain, route_ids=None if domain else ids)
    engine.submit(Job(ids, route, sampling, out))
    if wait:
        assert out.done.wait(60)
    return out


def test_jobs_joining_a_running_batch_get_their_alone_output(tl):
    texts = pick_domain_texts(tl)
    sizes = []
    engine = Engine(tl, max_batch=4, on_batch=sizes.append)
    try:
        long = Sampling(max_new_tokens=60, temperature=0.9, seed=5)
        short = [Sampling(max_new_tokens=n, temperature=t, top_p=p, seed=s, repetition_penalty=r)
                 for n, t, p, s, r in [(5, 0, 1, 0, 1.3), (9, 1.2, 0.8, 1, 1), (3, 0.7, 1, 2, 1)]]
        plan = [(texts["code"], None), (texts["legal"], "literature"), (texts["literature"], "base")]
        ref_long = run(engine, tl, texts["legal"], None, long)
        refs = [run(engine, tl, t, d, s) for (t, d), s in zip(plan, short, strict=True)]
        sizes.clear()
        # the long job runs; the others arrive while it decodes, join, and leave before it ends
        first = run(engine, tl, texts["legal"], None, long, wait=False)
        assert first.started.wait(60)
        late = [run(engine, tl, t, d, s, wait=False) for (t, d), s in zip(plan, short, strict=True)]
        for out in [first, *late]:
            assert out.done.wait(60)
        assert max(sizes) > 1 and sizes[-1] == 1  # they shared steps, and the long one finished alone
        for got, ref in zip([first, *late], [ref_long, *refs], strict=True):
            assert got.reason == ref.reason and got.text == ref.text and got.route == ref.route
    finally:
        engine.close()


def test_cancelled_jobs_stop_and_free_their_row(tl):
    engine = Engine(tl, max_batch=2)
    try:
        out = Collector()
        job = Job([5, 6, 7, 8], Route(domain="code"), Sampling(max_new_tokens=200, temperature=1.0, seed=1), out)
        engine.submit(job)
        assert out.started.wait(60)
        job.cancelled.set()  # what the server does when the client disconnects
        assert out.done.wait(60) and out.reason == "cancelled"
        gone = Collector()
        early = Job([5, 6, 7], Route(domain="code"), Sampling(max_new_tokens=5), gone)
        early.cancelled.set()  # cancelled before the engine even saw it
        engine.submit(early)
        assert gone.done.wait(60) and gone.reason == "cancelled" and gone.text == "" and gone.route is None
        after = run(engine, tl, "x = 1", "legal", Sampling(max_new_tokens=3, temperature=0))
        assert after.reason in ("length", "stop")
    finally:
        engine.close()


def test_a_decoder_stops_on_any_id_of_the_eos_set(tl):
    from temporal_lora.server.engine import Decoder

    out = Collector()
    job = Job([5, 6], Route(domain="code"), Sampling(max_new_tokens=10, temperature=0), out)
    decoder = Decoder(job, tl.tokenizer, {tl.tokenizer.eos_token_id, 42})
    for token in (7, 42):  # 42: a second end-of-sequence id (chat models have several)
        logits = torch.zeros(tl.model.config.vocab_size)
        logits[token] = 1.0
        decoder.next_token(logits)
    assert out.reason == "stop" and decoder.finished and decoder.tokens == [7]
    assert out.text == tl.tokenizer.decode([7], skip_special_tokens=True)

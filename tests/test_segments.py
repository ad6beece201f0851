"""Segment routing: hysteresis state machine, segmentation, per-token adapter weights, generation."""

import json

import pytest
import torch

from temporal_lora.cli import main
from temporal_lora.errors import InputError
from temporal_lora.mixing import one_hot
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.segments import (
    HysteresisState,
    SegmentConfig,
    SegmentRouter,
    generate_segmented,
    merge_short,
    split_spans,
)


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return TemporalLoRA.from_pretrained(tiny_bundle)


def _run(probs, smoothing=0.6, margin=0.2, confirm=1, min_confidence=0.0):
    state = HysteresisState(smoothing, margin, confirm, min_confidence)
    return [state.step(torch.tensor(p))[1] for p in probs], state.switches


def test_one_odd_segment_does_not_flap():
    a, b = [0.95, 0.05], [0.1, 0.9]
    active, switches = _run([a, a, b, a, a, b, a])
    assert active == [0] * 7 and switches == 0


def test_a_real_change_switches_within_one_segment_and_returns():
    a, b = [0.97, 0.03], [0.03, 0.97]
    active, switches = _run([a, a, a, b, b, b, b, a, a, a])
    assert active[3:5] in ([0, 1], [1, 1])  # lag of at most one segment
    assert active[4:7] == [1, 1, 1] and active[8:] == [0, 0] and switches == 2


def test_margin_and_no_smoothing():
    # without smoothing and margin every argmax change is a switch
    assert _run([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4]], smoothing=1.0, margin=0.0)[1] == 2
    # a wide margin holds the first decision against weak evidence
    assert _run([[0.6, 0.4], [0.4, 0.6], [0.35, 0.65]], smoothing=1.0, margin=0.5)[1] == 0


def test_confirmation_needs_consecutive_segments():
    a, b = [0.97, 0.03], [0.03, 0.97]
    # without smoothing or margin a single odd segment flips twice; confirm=2 ignores it ...
    assert _run([a, b, a, a], smoothing=1.0, margin=0.0)[1] == 2
    assert _run([a, b, a, a], smoothing=1.0, margin=0.0, confirm=2)[1] == 0
    # ... and a real change switches on its second segment
    assert _run([a, a, b, b, b], smoothing=1.0, margin=0.0, confirm=2)[0] == [0, 0, 0, 1, 1]


def test_confidence_gate_keeps_the_adapter_on_unsure_segments():
    a, unsure, b = [0.97, 0.03], [0.42, 0.58], [0.03, 0.97]
    # no smoothing, no margin: an unsure segment flips the adapter twice; the gate holds it ...
    assert _run([a, unsure, a], smoothing=1.0, margin=0.0)[1] == 2
    assert _run([a, unsure, a], smoothing=1.0, margin=0.0, min_confidence=0.8)[1] == 0
    # ... while a confident change still switches on its first segment
    assert _run([a, a, b, b], smoothing=1.0, margin=0.0, min_confidence=0.8)[0] == [0, 0, 1, 1]
    with pytest.raises(InputError, match="min_confidence"):
        SegmentConfig(min_confidence=1.0)


def test_config_validation():
    assert SegmentConfig.parse("tokens:48").size == 48
    with pytest.raises(InputError, match="unknown segment unit"):
        SegmentConfig.parse("chapters")
    with pytest.raises(InputError, match="smoothing"):
        SegmentConfig(smoothing=0)
    with pytest.raises(InputError, match="tokens:K"):
        SegmentConfig.parse("tokens:x")


def test_merge_short():
    assert merge_short([(0, 3), (3, 20), (20, 22)], 5) == [(0, 22)]
    assert merge_short([(0, 10), (10, 12), (12, 30)], 5) == [(0, 10), (10, 30)]
    assert merge_short([(0, 2)], 5) == [(0, 2)]


def test_sentence_and_paragraph_spans_cover_the_text(tl):
    text = ("def parse(argv):\n    return argv\n\nThe licensee shall not sublicense the Work. "
            "Any redistribution must retain this notice!\n\nO Romeo, wherefore art thou Romeo? Deny thy father.")
    for unit, expect_min in (("sentence", 4), ("paragraph", 3)):
        ids, spans = split_spans(text, tl.tokenizer, SegmentConfig(unit=unit, min_tokens=2))
        assert spans[0][0] == 0 and spans[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert len(spans) >= expect_min, (unit, spans)
    ids, spans = split_spans(text, tl.tokenizer, SegmentConfig(unit="paragraph", min_tokens=2))
    assert tl.tokenizer.decode(ids[spans[1][0]:spans[1][1]]).strip().startswith("The licensee")


def test_per_token_weights_match_whole_sequence_weights(tl):
    x = torch.tensor([tl.encode(["The licensee shall not sublicense the Work to anyone at all."])[0]])
    n, k = x.shape[1], len(tl.domains)
    with torch.no_grad():
        with tl.mixer.weights(one_hot([1], k)):
            whole = tl.model(input_ids=x).logits
        with tl.mixer.weights(one_hot([1] * n, k).unsqueeze(0)):
            per_token = tl.model(input_ids=x).logits
        assert torch.allclose(whole, per_token, atol=1e-5)
        # switching adapters at position t leaves every earlier position's logits unchanged (causal)
        w = one_hot([1] * n, k)
        w[n // 2:] = one_hot([2] * (n - n // 2), k)
        with tl.mixer.weights(w.unsqueeze(0)):
            switched = tl.model(input_ids=x).logits
    assert torch.allclose(switched[:, : n // 2], whole[:, : n // 2], atol=1e-5)
    assert not torch.allclose(switched[:, n // 2:], whole[:, n // 2:], atol=1e-4)


def test_segment_router_and_token_weights(tl):
    text = " ".join(["Permission is hereby granted, free of charge, to any person obtaining a copy."] * 6)
    router = SegmentRouter(tl, SegmentConfig(size=16))
    segments = router.route(text)
    n = segments[-1].end
    assert segments[0].start == 0 and all(s.end - s.start <= 16 for s in segments)
    assert all(abs(sum(s.smoothed) - 1) < 1e-4 and s.domain in tl.domains for s in segments)
    hard = router.token_weights(segments, n, "hard")
    assert hard.shape == (n, len(tl.domains)) and torch.all(hard.sum(-1) == 1)
    soft = router.token_weights(segments, n, "soft", causal=True)
    assert torch.allclose(soft[: segments[0].end], torch.tensor(segments[0].smoothed).expand(segments[0].end, -1))
    with pytest.raises(InputError):
        router.route("   ")


def test_generate_segmented_switches_between_blocks(tl, monkeypatch):
    """A scripted router (first domain for the prompt and the first block, last domain after): the
    route switches after the second block, and from the next token on the new adapter is used."""
    first, last = one_hot([0], len(tl.domains)), one_hot([len(tl.domains) - 1], len(tl.domains))
    calls = []

    def scripted_route_probs(ids, batch_size=16):
        calls.append(ids)  # the prompt's segments in one call, then each generated block alone
        return (first if len(calls) <= 2 else last).expand(len(ids), -1)

    used, mix, model, eos = [], tl.mixer.weights, tl.model, tl.tokenizer.eos_token_id

    def recording_weights(weights):
        used.append(weights)
        return mix(weights)

    def model_without_eos(**kwargs):  # so that exactly max_new_tokens are generated
        out = model(**kwargs)
        out.logits[..., eos] = -float("inf")
        return out

    monkeypatch.setattr(tl, "route_probs", scripted_route_probs)
    monkeypatch.setattr(tl.mixer, "weights", recording_weights)
    monkeypatch.setattr(tl, "model", model_without_eos)
    prompt = "def main(argv):\n    return 0\n"
    out = generate_segmented(tl, prompt, cfg=SegmentConfig(size=4, smoothing=1.0), max_new_tokens=12)
    n = len(split_spans(prompt, tl.tokenizer, SegmentConfig(size=4))[0])
    a, b = tl.domains[0], tl.domains[-1]
    assert out["routes"] == [
        {"tokens": [0, n], "domain": a, "source": "prompt"},
        {"tokens": [n, n + 4], "domain": a, "switched": False, "source": "generated"},
        {"tokens": [n + 4, n + 8], "domain": b, "switched": True, "source": "generated"},
        {"tokens": [n + 8, n + 12], "domain": b, "switched": False, "source": "generated"},
    ]
    # the router read each block of 4 generated tokens, and the blocks are the generated text
    blocks = [c[0] for c in calls[1:]]
    assert out["switches"] == 1 and [len(c) for c in calls[1:]] == [1, 1, 1] and [len(b) for b in blocks] == [4] * 3
    assert tl.tokenizer.decode([t for block in blocks for t in block], skip_special_tokens=True) == out["text"]
    assert len(used) == 12  # one forward per new token: 8 with the first adapter, then 4 with the last
    assert all(torch.equal(w, first) for w in used[:8]) and all(torch.equal(w, last) for w in used[8:])


def test_route_segments_cli(tiny_bundle, capsys):
    assert main(["route", "--bundle", str(tiny_bundle), "--segments", "tokens:8",
                 "The patient was given metformin. def f(x): return x"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert row["segments"] and {"start", "end", "domain", "probs", "smoothed", "switched", "text"} <= set(
        row["segments"][0])


def test_server_route_returns_segments_on_request(tl):
    import httpx
    from support.serving import running

    from temporal_lora.server import ServerSettings, create_app

    with running(create_app(tl, ServerSettings(max_prompt_tokens=200))) as url:
        text = "The patient was given metformin twice daily. def f(x):\n    return x + 1\n"
        plain = httpx.post(url + "/v1/route", json={"input": text}).json()["data"][0]
        assert "segments" not in plain
        rows = httpx.post(url + "/v1/route", json={"input": [text], "segments": "tokens:8"}).json()["data"]
        segs = rows[0]["segments"]
        assert segs[0]["start"] == 0 and all(s["domain"] in tl.domains for s in segs)
        assert httpx.post(url + "/v1/route", json={"input": text, "segments": "chapters"}).status_code == 400


def test_generate_segments_cli(tiny_bundle, capsys):
    assert main(["generate", "--bundle", str(tiny_bundle), "--segments", "tokens:4", "--max-new-tokens", "8",
                 "--json", "def main(argv):"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert out["routes"][0]["source"] == "prompt" and isinstance(out["text"], str)
    assert main(["generate", "--bundle", str(tiny_bundle), "--segments", "sentence", "x"]) == 2

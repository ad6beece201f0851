"""Property-based tests: arbitrary text never crashes routing or generation. Every input gets a valid
route or one clear TemporalLoRAError. Counts of inputs tried go to runs/test-artifacts/inputs.json."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from temporal_lora import TemporalLoRA
from temporal_lora.cli import main as cli_main
from temporal_lora.errors import TemporalLoRAError

ARTIFACTS = Path(__file__).parents[1] / "runs" / "test-artifacts"
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any code point, lone surrogates included (what invalid UTF-8 becomes with surrogateescape).
any_char = st.characters(exclude_categories=())
whitespace = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x85\xa0\u2028\u2029\u3000\ufeff"), max_size=40)
control = st.text(st.characters(categories=["Cc", "Cf", "Co", "Cn"]), min_size=1, max_size=40)
invalid_utf8 = st.binary(max_size=60).map(lambda b: (b + b"\xff\xc3(").decode("utf-8", "surrogateescape"))
# Far over the router's window and the model's context (256 tokens for the tiny model).
very_long = st.tuples(st.text(any_char, min_size=1, max_size=20), st.integers(200, 3000)).map(lambda t: t[0] * t[1])
texts = st.one_of(st.text(any_char, max_size=200), st.just(""), whitespace, control, invalid_utf8, very_long,
                  st.text(st.characters(codec="utf-8"), min_size=1, max_size=300))


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return TemporalLoRA.from_pretrained(tiny_bundle)


@pytest.fixture(scope="module")
def tried():
    """Inputs tried, by test and outcome; written to inputs.json after this module's last test,
    whichever tests ran and in whatever order."""
    counts: Counter = Counter()
    yield counts
    if counts:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "inputs.json").write_text(json.dumps(dict(sorted(counts.items())), indent=2))


def check_route(tl, text: str) -> str:
    try:
        (decision,) = tl.route([text])
    except TemporalLoRAError as exc:
        assert str(exc)  # a message a user can read
        return "error"
    probs = list(decision.probs.values())
    assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
    assert abs(sum(probs) - 1.0) < 1e-4
    assert decision.domain in (*tl.domains, None)
    return "route"


@settings(max_examples=150, **SETTINGS)
@given(text=texts)
def test_routing_gives_a_route_or_a_clear_error(tl, tried, text):
    tried[f"route:{check_route(tl, text)}"] += 1


@settings(max_examples=25, **SETTINGS)
@given(batch=st.lists(texts, min_size=2, max_size=5))
def test_routing_in_a_batch_equals_routing_each_alone(tl, tried, batch):
    valid = [t for t in batch if check_route(tl, t) == "route"]
    tried["batch route"] += len(batch)
    if len(valid) < 2:
        return
    together = tl.route(valid)
    for text, got in zip(valid, together, strict=True):
        (alone,) = tl.route([text])
        assert got.domain == alone.domain
        assert all(abs(got.probs[d] - alone.probs[d]) < 1e-4 for d in tl.domains)


@settings(max_examples=40, **SETTINGS)
@given(text=texts, unit=st.sampled_from(["sentence", "paragraph", "tokens:8"]))
def test_segment_routing_gives_segments_or_a_clear_error(tl, tried, text, unit):
    from temporal_lora.routing.segments import SegmentConfig, SegmentRouter

    try:
        segments = SegmentRouter(tl, SegmentConfig.parse(unit)).route(text)
    except TemporalLoRAError as exc:
        assert str(exc)
        tried["segments:error"] += 1
        return
    assert segments and all(s.domain in (*tl.domains, None) for s in segments)
    tried["segments:routed"] += 1


# Sampling settings a caller can pass, extreme ones included (overflow to inf, nan, zero, negative).
knob = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([5e-324, 1e-30, 1e30, 1.0]))


@settings(max_examples=40, **SETTINGS)
@given(text=texts, mode=st.sampled_from(["hard", "soft", "topk"]), chat=st.booleans(),
       sample=st.booleans(), temperature=knob, penalty=knob)
def test_generation_gives_text_or_a_clear_error(tl, tried, text, mode, chat, sample, temperature, penalty):
    try:
        (gen,) = tl.generate([text], mode=mode, max_new_tokens=2, chat=chat and bool(tl.tokenizer.chat_template),
                             do_sample=sample, temperature=temperature, repetition_penalty=penalty)
    except TemporalLoRAError as exc:
        assert str(exc)
        tried["generate:error"] += 1
        return
    assert isinstance(gen.text, str)
    assert all(math.isfinite(w) for w in gen.weights.values())
    tried["generate:text"] += 1


@settings(max_examples=30, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=300),
                     st.lists(texts, min_size=1, max_size=3).map(
                         lambda ts: "\n".join(json.dumps({"text": t}) for t in ts).encode("utf-8", "surrogatepass"))))
def test_cli_route_on_arbitrary_jsonl_bytes(tiny_bundle, tmp_path_factory, capsys, tried, raw):
    """Whatever bytes a user's file holds: JSON routes on stdout (exit 0) or one error line (exit 2)."""
    path = tmp_path_factory.mktemp("jsonl") / "in.jsonl"
    path.write_bytes(raw)
    code = cli_main(["route", "--bundle", str(tiny_bundle), "--jsonl", str(path)])
    out, err = capsys.readouterr()
    if code == 0:
        assert all("probs" in json.loads(line) for line in out.splitlines())
        tried["cli jsonl:routed"] += 1
    else:
        assert code == 2 and err.startswith("tlora: error:") and len(err.strip().splitlines()) == 1, err
        tried["cli jsonl:error"] += 1

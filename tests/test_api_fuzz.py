"""Fuzz the HTTP API with schemathesis against the server's own OpenAPI schema: schema-valid
(positive) and schema-violating (negative) requests to every operation; no 5xx, and no stream
that fails after its 200. Counts of requests go to runs/test-artifacts/fuzz.json."""

import json
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from support.serving import load_served, running
from support.tiny import TINY_DOMAINS

from temporal_lora.server import ServerSettings, create_app

ARTIFACTS = Path(__file__).parents[1] / "runs" / "test-artifacts"
EXAMPLES = 50  # per operation and mode: bounded, so the run takes about a minute on the tiny model


@pytest.fixture(scope="module")
def url(tiny_bundle):
    settings_ = ServerSettings(max_prompt_tokens=200, max_new_tokens=8, default_max_tokens=4,
                               max_body_bytes=50_000, max_concurrency=64)
    with running(create_app(load_served(tiny_bundle), settings_)) as base:
        yield base


MODELS = ["auto", "base", *TINY_DOMAINS]


def steer(case_and_model):
    """A schema-valid request moved into the region the server accepts (a real model, no
    echo/logprobs, a small max_tokens), so that generation itself is fuzzed, not only refusals."""
    case, model = case_and_model
    case.body["model"] = model
    for key in ("echo", "logprobs"):
        case.body.pop(key, None)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(case.body.get(key), int):
            case.body[key] = 1 + case.body[key] % 8
    return case


def fuzz(operation, mode: str, url: str, statuses: Counter) -> None:
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode.split()[0]))
    if mode == "positive steered":
        strategy = st.tuples(strategy, st.sampled_from(MODELS)).map(steer)

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def call(case):
        response = case.call(base_url=url, timeout=120)
        statuses[f"{mode} {response.status_code}"] += 1
        assert response.status_code < 500, (case.body, response.text[:500])
        assert '"server_error"' not in response.text, (case.body, response.text[:500])

    try:
        call()
    except Unsatisfiable:  # an operation without parameters has no schema-violating request
        assert mode == "negative" and not operation.body and not operation.query


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_server_error(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: Counter = Counter()
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(f"{operation.method.upper()} {operation.path}")
        modes = ["positive", "negative"]
        if operation.path in ("/v1/completions", "/v1/chat/completions"):
            modes.append("positive steered")
        for mode in modes:
            fuzz(operation, mode, url, statuses)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/route"} <= set(operations)
    # Both kinds of request really reached the server: successes and refusals.
    # Generation itself was exercised (24-31 of 100 in runs here: the examples vary with the hash seed).
    assert statuses["positive steered 200"] >= 10, statuses
    assert any(k.startswith("negative 4") for k in statuses), statuses
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(
        {"operations": operations, "requests": sum(statuses.values()), "by_status": dict(sorted(statuses.items()))},
        indent=2))

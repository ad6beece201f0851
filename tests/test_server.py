"""The OpenAI-compatible server on a tiny bundle, driven by the real `openai` client over loopback."""

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
from support.serving import load_served, pick_domain_texts, running, wait_until
from support.tiny import TINY_DOMAINS

from temporal_lora.server import ServerSettings, create_app

KEY = "test-key-123"


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return load_served(tiny_bundle)


@pytest.fixture(scope="module")
def texts(tl):
    return pick_domain_texts(tl)


@pytest.fixture(scope="module")
def server(tl):
    settings = ServerSettings(max_prompt_tokens=200, max_new_tokens=40, default_max_tokens=12,
                              max_body_bytes=50_000, max_concurrency=16)
    app = create_app(tl, settings)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models_list_auto_every_domain_and_base(client):
    assert [m.id for m in client.models.list()] == ["auto", *TINY_DOMAINS, "base"]


def test_auto_routes_each_request_and_reports_the_decision(client, texts):
    for domain, text in texts.items():
        raw = client.completions.with_raw_response.create(model="auto", prompt=text, max_tokens=5,
                                                          temperature=0, seed=1)
        resp = raw.parse()
        assert raw.headers["x-route"] == domain
        routing = resp.model_extra["routing"]
        assert routing["domain"] == domain and routing["routed"] and routing["mode"] == "hard"
        assert routing["weights"][domain] == 1.0 and sum(routing["weights"].values()) == 1.0
        assert abs(sum(routing["probs"].values()) - 1) < 1e-4
        assert 1 <= resp.usage.completion_tokens <= 5


def test_forced_domain_and_base_model(client, texts, tl):
    text = texts["code"]
    for model in ["legal", "base"]:
        raw = client.completions.with_raw_response.create(model=model, prompt=text, max_tokens=4, temperature=0)
        routing = raw.parse().model_extra["routing"]
        assert raw.headers["x-route"] == model
        assert routing["mode"] == "forced" and routing["domain"] == model and not routing["routed"]
        assert routing["weights"] == {d: float(d == model) for d in tl.domains}


def test_forced_output_equals_the_library_generation(client, texts, tl):
    text = texts["literature"]
    resp = client.completions.create(model="literature", prompt=text, max_tokens=8, temperature=0)
    expected = tl.generate([text], domain="literature", max_new_tokens=8)[0].text
    got = resp.choices[0]
    # Same greedy tokens. The engine stops at the end-of-sequence token; the library's generate pads
    # after it, and the padding decodes to nothing, so the texts are equal either way.
    assert got.text and got.text == expected
    assert (got.finish_reason, resp.usage.completion_tokens == 8) in {("length", True), ("stop", False)}


def test_unknown_model_is_404_listing_the_valid_ones(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="astrology", prompt="hello", max_tokens=2)
    assert err.value.status_code == 404
    message = err.value.body["message"]
    for name in ["auto", *TINY_DOMAINS, "base"]:
        assert name in message


def test_streaming_equals_the_whole_response(client, texts):
    for kind in ("completions", "chat"):
        kwargs = {"model": "auto", "max_tokens": 12, "temperature": 0.9, "seed": 7}
        if kind == "chat":
            messages = [{"role": "user", "content": texts["legal"]}]
            whole = client.chat.completions.create(messages=messages, **kwargs)
            parts = list(client.chat.completions.create(messages=messages, stream=True, **kwargs))
            streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            assert streamed == whole.choices[0].message.content
            assert whole.model_extra["routing"]["domain"] == "legal"
        else:
            whole = client.completions.create(prompt=texts["code"], **kwargs)
            parts = list(client.completions.create(prompt=texts["code"], stream=True, **kwargs))
            streamed = "".join(p.choices[0].text for p in parts)
            assert streamed == whole.choices[0].text
        assert parts[0].model_extra["routing"] == whole.model_extra["routing"]
        assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_routes_on_the_newest_turns(client, texts):
    first = texts["literature"]
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "Indeed."},
                {"role": "user", "content": texts["code"]}]
    resp = client.chat.completions.create(model="auto", messages=messages, max_tokens=3, temperature=0)
    assert resp.model_extra["routing"]["domain"] == "code"  # the later turn switched the domain


def test_concurrent_requests_are_batched_and_never_leak(server, client, texts):
    """Each request alone, then all at once: identical outputs, and the engine batched them."""
    url, app = server
    requests = []
    for i in range(12):
        domain = TINY_DOMAINS[i % 3]
        requests.append({"model": ["auto", domain, "base"][i % 3], "prompt": texts[domain],
                         "max_tokens": 6 + i % 5, "temperature": [0, 0.8, 1.3][i % 3], "top_p": [1, 0.9][i % 2],
                         "seed": 100 + i, "frequency_penalty": 0.5 * (i % 2)})
    alone = [client.completions.create(**r) for r in requests]
    single = 'tlora_batch_size_bucket{le="1.0"}'
    steps_before, single_before = _metric(url, "tlora_batch_size_count"), _metric(url, single)
    with cf.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.completions.create(**r), requests))
    steps = _metric(url, "tlora_batch_size_count") - steps_before
    single_steps = _metric(url, single) - single_before
    for a, b in zip(alone, together, strict=True):
        assert a.choices[0].text == b.choices[0].text
        assert a.model_extra["routing"] == b.model_extra["routing"]
    assert single_steps < steps  # some decoding steps served several requests at once


def test_n_choices_use_consecutive_seeds(client, texts):
    resp = client.completions.create(model="code", prompt=texts["code"], max_tokens=6, temperature=1.0, seed=3, n=2)
    second = client.completions.create(model="code", prompt=texts["code"], max_tokens=6, temperature=1.0, seed=4)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[1].text == second.choices[0].text


def test_stop_strings_cut_the_text(client, texts):
    free = client.completions.create(model="code", prompt=texts["code"], max_tokens=20, temperature=0).choices[0]
    # a stop string that first occurs after the start, so that some text comes before it
    text = free.text
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text.index(text[i:i + 2]) == i), None)
    assert stop, f"no usable stop string in the tiny model's greedy text {text!r}"
    cut = client.completions.create(model="code", prompt=texts["code"], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)] != ""  # everything before the stop string


def test_limits_and_bad_input_get_openai_errors(server, client, texts):
    url, _ = server
    with pytest.raises(openai.BadRequestError, match="limit is 200"):
        client.completions.create(model="auto", prompt=texts["code"] * 10, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the server's limit of 40"):
        client.completions.create(model="auto", prompt="x = 1", max_tokens=41)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="auto", prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="auto", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="at most 32 sequences"):
        client.completions.create(model="auto", prompt=["x = 1"] * 5, n=8)
    surrogate = httpx.post(url + "/v1/completions", content=b'{"model": "auto", "prompt": "\\ud800x"}',
                           headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and "not valid Unicode" in surrogate.json()["error"]["message"]
    huge_seed = client.completions.create(model="code", prompt="x = 1", max_tokens=2, n=2, seed=2**63 - 1)
    assert len(huge_seed.choices) == 2
    big = httpx.post(url + "/v1/completions", content=b'{"prompt": "' + b"a" * 60_000 + b'"}',
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and "limit of 50000 bytes" in big.json()["error"]["message"]
    bad = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_concurrency_limit_sheds_with_429_and_keeps_serving(tl, texts):
    app = create_app(tl, ServerSettings(max_concurrency=2, default_max_tokens=4))
    engine = app.state.service.engine
    with running(app) as url:
        body = {"model": "code", "prompt": texts["code"], "max_tokens": 4, "temperature": 0}
        with cf.ThreadPoolExecutor(2) as pool:
            with engine._lock:  # the engine is busy: the two accepted requests wait in its queue
                waiting = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
                wait_until(lambda: httpx.get(url + "/health").json()["in_flight"] == 2)
                shed = httpx.post(url + "/v1/completions", json=body)
                assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
                assert shed.json()["error"]["type"] == "rate_limit_error"
            assert all(f.result().status_code == 200 for f in waiting)
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        assert httpx.get(url + "/health").json()["in_flight"] == 0


def test_client_that_disconnects_mid_stream_frees_its_slot(server, texts):
    url, _ = server
    body = {"model": "auto", "prompt": texts["legal"], "max_tokens": 40, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as resp:
        next(resp.iter_lines())  # read the first event, then hang up
    wait_until(lambda: httpx.get(url + "/health").json()["in_flight"] == 0)
    ok = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert ok.status_code == 200


def test_api_key_is_required_when_set(tl):
    app = create_app(tl, ServerSettings(api_key=KEY))
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert len(good.models.list().data) == len(TINY_DOMAINS) + 2
        assert httpx.get(url + "/health").status_code == 200  # health checks need no key


def test_api_key_is_compared_in_constant_time(tl, monkeypatch):
    import hmac

    compared = []

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with running(create_app(tl, ServerSettings(api_key=KEY))) as url:
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert compared == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_route_endpoint_matches_the_library(server, tl, texts):
    url, _ = server
    resp = httpx.post(url + "/v1/route", json={"input": list(texts.values())})
    assert resp.status_code == 200
    got = [d["domain"] for d in resp.json()["data"]]
    assert got == list(texts) == [r.domain for r in tl.route(list(texts.values()))]
    assert httpx.post(url + "/v1/route", json={"input": []}).status_code == 400


def test_metrics_and_openapi(server, client, texts):
    url, _ = server
    client.completions.create(model="auto", prompt=texts["legal"], max_tokens=2)
    text = httpx.get(url + "/metrics").text
    assert 'tlora_routes_total{domain="legal",how="routed"}' in text
    assert 'tlora_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "tlora_request_latency_seconds_bucket" in text
    assert _metric(url, 'tlora_tokens_total{kind="completion"}') > 0
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/route", "/v1/models", "/health"} <= set(schema["paths"])


def test_playground_page_is_served(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "Temporal LoRA playground" in page.text


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_error_body_shape(server):
    url, _ = server
    resp = httpx.post(url + "/v1/chat/completions", json={"model": "auto", "messages": []})
    err = resp.json()["error"]
    assert resp.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert json.dumps(err)

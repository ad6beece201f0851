"""Scale-out: a front server routes and forwards to a second, real server acting as the multi-LoRA engine."""

import httpx
import openai
import pytest
from support.serving import load_served, pick_domain_texts, running

from temporal_lora.server import ServerSettings, create_app


@pytest.fixture(scope="module")
def pair(tiny_bundle):
    """(front URL, engine URL): the engine is a second real server of ours (it serves adapters by
    domain name, as vLLM --lora-modules does); the front routes and forwards. Each owns its model."""
    engine_app = create_app(load_served(tiny_bundle), ServerSettings(api_key="engine-key"))
    with running(engine_app) as engine_url:
        front_app = create_app(load_served(tiny_bundle),
                               ServerSettings(backend_url=engine_url + "/v1", backend_api_key="engine-key"))
        with running(front_app) as front_url:
            yield front_url, engine_url


@pytest.fixture(scope="module")
def texts(tiny_bundle):
    return pick_domain_texts(load_served(tiny_bundle))


def clients(pair):
    front, engine = pair
    return (openai.OpenAI(base_url=front + "/v1", api_key="x", max_retries=0),
            openai.OpenAI(base_url=engine + "/v1", api_key="engine-key", max_retries=0))


def test_front_routes_then_the_engine_generates_with_that_adapter(pair, texts):
    front, engine = clients(pair)
    for domain, text in texts.items():
        raw = front.completions.with_raw_response.create(model="auto", prompt=text, max_tokens=6,
                                                         temperature=0.8, seed=11)
        resp = raw.parse()
        direct = engine.completions.create(model=domain, prompt=text, max_tokens=6, temperature=0.8, seed=11)
        assert raw.headers["x-route"] == domain
        assert resp.model_extra["routing"]["domain"] == domain and resp.model == "auto"
        assert resp.choices[0].text == direct.choices[0].text


def test_forwarded_streams_and_chat(pair, texts):
    front, engine = clients(pair)
    messages = [{"role": "user", "content": texts["legal"]}]
    kwargs = {"max_tokens": 8, "temperature": 0, "seed": 1}
    parts = list(front.chat.completions.create(model="auto", messages=messages, stream=True, **kwargs))
    streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    direct = engine.chat.completions.create(model="legal", messages=messages, **kwargs)
    assert parts[0].model_extra["routing"]["domain"] == "legal"
    assert streamed == direct.choices[0].message.content
    text_parts = list(front.completions.create(model="base", prompt=texts["code"], stream=True, **kwargs))
    direct = engine.completions.create(model="base", prompt=texts["code"], **kwargs)
    assert "".join(p.choices[0].text for p in text_parts) == direct.choices[0].text


def test_forwarding_errors_are_clear(pair, tiny_bundle):
    front_url, _ = pair
    soft = httpx.post(front_url + "/v1/completions", json={"model": "auto", "prompt": "x = 1",
                                                           "routing_mode": "soft"})
    assert soft.status_code == 400 and "only hard routing" in soft.json()["error"]["message"]
    dead = create_app(load_served(tiny_bundle), ServerSettings(backend_url="http://127.0.0.1:9/v1"))
    with running(dead) as url:
        resp = httpx.post(url + "/v1/completions", json={"model": "code", "prompt": "x = 1", "max_tokens": 2})
        assert resp.status_code == 502 and "unreachable" in resp.json()["error"]["message"]

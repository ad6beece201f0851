"""The server answers chat requests of a grounded bundle from the answering department's passages and
cites them in `routing` (whole and streamed); `grounded: false`, a forced department and the base
model; a bundle without grounding answers exactly as before (no new keys)."""

import json
import shutil

import httpx
import pytest
from support.departments import department, grounded_config
from support.serving import TINY_CHAT_TEMPLATE, load_served, running

from temporal_lora.server import ServerSettings, create_app

VPN = "Which VPN host do I connect to from home?"
SICK = "From which day of absence is a sick note needed?"


@pytest.fixture(scope="module")
def grounded_url(tiny_llama, tmp_path_factory):
    from transformers import AutoTokenizer

    from temporal_lora.train import train_bundle

    root = tmp_path_factory.mktemp("served-departments")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(model)
    data = {name: department(root, name) for name in ("hr", "it")}
    train_bundle(["hr", "it"], root / "bundle", base=str(model), data=data, config=grounded_config(),
                 progress=False, log=lambda *a: None)
    app = create_app(load_served(root / "bundle"), ServerSettings(default_max_tokens=4, max_prompt_tokens=256))
    with running(app) as url:
        yield url


def chat(url: str, question: str, **extra) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": question}], "max_tokens": 4, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["routing"]


def test_a_routed_chat_answer_cites_the_answering_departments_passages(grounded_url):
    routing = chat(grounded_url, VPN, model="it")
    assert routing["grounded"] is True and routing["domain"] == "it"
    assert "vpn.kestrel.example" in routing["sources"][0]["text"]
    assert set(routing["sources"][0]) == {"source", "title", "text", "score"}
    auto = chat(grounded_url, VPN)  # routed: the passages are the routed department's
    assert auto["routed"] and auto["sources"] == chat(grounded_url, VPN, model=auto["domain"])["sources"]
    assert auto["grounded"] is bool(auto["sources"])  # (the tiny router may pick hr, whose handbook has no match)
    hr = chat(grounded_url, SICK, model="hr")
    assert hr["sources"][0]["title"] == "Sick leave" and hr["sources"][0]["source"] == "handbook.md"


def test_grounded_false_and_the_base_model_cite_nothing(grounded_url):
    off = chat(grounded_url, VPN, model="it", grounded=False)
    assert off["grounded"] is False and off["sources"] == []
    base = chat(grounded_url, VPN, model="base")
    assert base["grounded"] is False and base["sources"] == [] and base["answered_by"] == "base"


def test_a_streamed_answer_carries_its_sources_in_the_first_chunk(grounded_url):
    body = {"model": "it", "messages": [{"role": "user", "content": VPN}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{grounded_url}/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["routing"]["sources"] == chat(grounded_url, VPN, model="it")["sources"]


def test_a_bundle_without_grounding_has_no_grounding_keys(tiny_bundle):
    app = create_app(load_served(tiny_bundle), ServerSettings(default_max_tokens=2))
    with running(app) as url:
        routing = chat(url, "def parse(argv): return argv")
    assert "grounded" not in routing and "sources" not in routing

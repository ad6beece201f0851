"""The server answers chat requests of a grounded bundle from the answering department's passages and
cites them in `routing` (whole and streamed); `grounded: false`, a forced department and the base
model; a failed grounded prompt frees its slot; a bundle without grounding answers exactly as before
(no new keys)."""

import json
import shutil

import httpx
import pytest
from support.departments import department, grounded_config
from support.serving import CHROMIUM_ARGS, load_served, running

from temporal_lora.server import ServerSettings, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The tiny router is barely sure of anything (confidence about 0.5), and another CPU may train it to
# other decisions: tests that need an auto route to 'it' take the first of these questions it routes
# there (each finds the IT handbook's 'Remote access' passage).
VPN_QUESTIONS = ["What is the VPN host?", "Which VPN host do I use?", "VPN host?", "Is the VPN client preinstalled?",
                 "What does the VPN need on my phone?", "Which certificate does the VPN client renew?"]
VPN = "Which VPN host do I connect to from home?"
SICK_PASSWORD = "Do I need a sick note when my password expires?"  # hr's documents: 'Sick leave'


@pytest.fixture(scope="module")
def grounded_bundle(chat_llama, tmp_path_factory):
    from temporal_lora.train import train_bundle

    root = tmp_path_factory.mktemp("served-departments")
    data = {name: department(root, name) for name in ("hr", "it")}
    train_bundle(["hr", "it"], root / "bundle", base=str(chat_llama), data=data, config=grounded_config(),
                 progress=False, log=lambda *a: None)
    return root / "bundle"


@pytest.fixture(scope="module")
def VPN_HOST(grounded_bundle):  # noqa: N802 - read as the constant it stands for
    routes = load_served(grounded_bundle).route(VPN_QUESTIONS)
    picked = [q for q, r in zip(VPN_QUESTIONS, routes, strict=True) if r.domain == "it"]
    assert picked, f"the tiny router sends none of {VPN_QUESTIONS} to 'it'"
    return picked[0]


@pytest.fixture(scope="module")
def grounded_url(grounded_bundle):
    app = create_app(load_served(grounded_bundle), ServerSettings(default_max_tokens=4, max_prompt_tokens=256))
    with running(app) as url:
        yield url


def ask(url: str, question: str, **extra) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": question}], "max_tokens": 4, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat(url: str, question: str, **extra) -> dict:
    return ask(url, question, **extra)["routing"]


def test_an_auto_answer_routed_to_a_grounded_department_cites_its_handbook(grounded_url, VPN_HOST):
    routing = chat(grounded_url, VPN_HOST)
    assert routing["routed"] and routing["domain"] == "it" and routing["answered_by"] == "it"
    assert routing["grounded"] is True
    first = routing["sources"][0]
    assert set(first) == {"source", "title", "text", "score"}
    assert (first["source"], first["title"]) == ("handbook.md", "Remote access")
    assert "vpn.kestrel.example" in first["text"] and first["score"] > 0
    # Every other routing key is still there, unchanged in meaning.
    assert {"model", "domain", "mode", "routed", "abstained", "answered_by", "confidence", "probs", "weights",
            "bundle_version"} <= set(routing)


def test_the_passages_are_the_routed_departments(grounded_url):
    auto = chat(grounded_url, VPN)
    assert auto["routed"] and auto["sources"] == chat(grounded_url, VPN, model=auto["domain"])["sources"]
    assert auto["grounded"] is bool(auto["sources"])  # hr's documents have nothing on VPN hosts
    forced = chat(grounded_url, VPN, model="it")
    assert forced["domain"] == "it" and forced["grounded"] is True
    assert forced["sources"][0]["title"] == "Remote access"


def test_a_forced_department_cites_its_own_passages(grounded_url):
    hr = chat(grounded_url, SICK_PASSWORD, model="hr")
    assert hr["mode"] == "forced" and hr["domain"] == "hr" and hr["grounded"] is True
    assert (hr["sources"][0]["title"], hr["sources"][0]["source"]) == ("Sick leave", "handbook.md")
    assert "third day of absence" in hr["sources"][0]["text"]


def test_the_answer_continues_the_grounded_prompt(grounded_url, grounded_bundle, VPN_HOST):
    tl = load_served(grounded_bundle)
    messages = [{"role": "user", "content": VPN_HOST}]
    prompt, hits = tl.grounded_chat(messages, "it", 8)
    assert hits
    expected = tl.generate([prompt], domain="it", max_new_tokens=8)[0].text
    on = ask(grounded_url, VPN_HOST, model="it", max_tokens=8, temperature=0)
    # (The tiny model may say the same with or without the passage; the prompt's length tells them apart.)
    off = ask(grounded_url, VPN_HOST, model="it", max_tokens=8, temperature=0, grounded=False)
    assert on["choices"][0]["message"]["content"] == expected
    assert on["usage"]["prompt_tokens"] == len(tl.tokenizer(prompt)["input_ids"])
    assert on["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]


def test_grounded_false_and_the_base_model_cite_nothing(grounded_url, VPN_HOST):
    for model in ("auto", "it"):
        off = chat(grounded_url, VPN_HOST, model=model, grounded=False)
        assert off["domain"] == "it" and off["grounded"] is False and off["sources"] == []
    assert chat(grounded_url, VPN_HOST, grounded=True)["sources"][0]["title"] == "Remote access"
    base = chat(grounded_url, VPN_HOST, model="base")  # the router would pick it, which has passages
    assert base["grounded"] is False and base["sources"] == [] and base["answered_by"] == "base"


def test_a_streamed_answer_carries_its_sources_in_the_first_chunk(grounded_url, VPN_HOST):
    for model in ("auto", "it"):
        body = {"model": model, "messages": [{"role": "user", "content": VPN_HOST}], "max_tokens": 4,
                "stream": True}
        with httpx.stream("POST", f"{grounded_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        routing = events[0]["routing"]
        assert routing["grounded"] is True and routing["sources"][0]["title"] == "Remote access"
        assert routing["sources"] == chat(grounded_url, VPN_HOST, model=model)["sources"]


def test_completions_are_not_grounded(grounded_url, VPN_HOST):
    r = httpx.post(f"{grounded_url}/v1/completions", json={"model": "it", "prompt": VPN_HOST, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert "grounded" not in r.json()["routing"] and "sources" not in r.json()["routing"]


def test_a_grounded_prompt_over_the_limit_is_refused_and_frees_its_slot(grounded_bundle, VPN_HOST):
    # The plain prompt (about 30 tokens) fits 100 tokens; with its passage (about 200) it does not.
    app = create_app(load_served(grounded_bundle),
                     ServerSettings(default_max_tokens=4, max_prompt_tokens=100, max_concurrency=1))
    body = {"model": "it", "messages": [{"role": "user", "content": VPN_HOST}], "max_tokens": 4}
    with running(app) as url:
        for _ in range(3):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "grounded": False}, timeout=60)
        assert r.status_code == 200 and r.json()["routing"]["sources"] == []


def test_a_bundle_without_grounding_has_no_grounding_keys(tiny_bundle):
    app = create_app(load_served(tiny_bundle), ServerSettings(default_max_tokens=2))
    with running(app) as url:
        routing = chat(url, "def parse(argv): return argv")
        text = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "def f(x):", "max_tokens": 2},
                          timeout=60).json()["routing"]
    assert "grounded" not in routing and "sources" not in routing
    assert "grounded" not in text and "sources" not in text


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make browser installs it)")
def test_the_playground_lists_the_cited_passages(grounded_url, VPN_HOST):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(grounded_url + "/")
        expect(page.locator("#model option")).to_have_count(4)  # auto, hr, it, base
        page.fill("#prompt", VPN_HOST)
        page.fill("#max-tokens", "4")  # the tiny model's context: room for the passage
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("Route: it", timeout=30_000)
        expect(page.locator("#sources-box")).to_be_visible()
        item = page.locator("#sources li").first
        expect(item).to_contain_text("Remote access")
        expect(item).to_contain_text("(handbook.md)")
        expect(item).to_contain_text("vpn.kestrel.example")
        expect(page.locator("#send")).to_be_enabled(timeout=30_000)
        page.select_option("#model", "base")  # no passages: the list is emptied and hidden
        page.click("#send")
        expect(page.locator("#route-line")).to_contain_text("Route: base (forced)", timeout=30_000)
        expect(page.locator("#sources-box")).to_be_hidden()
        assert page.locator("#sources li").count() == 0
        browser.close()

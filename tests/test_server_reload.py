"""Hot reload: a running server takes new bundle versions without a restart and drops nothing."""

import concurrent.futures as cf
import gc
import json
import shutil
import weakref

import httpx
import pytest
from support.serving import load_served, pick_domain_texts, running, wait_until
from support.tiny import TINY_DOMAINS, tiny_config

from temporal_lora.bundle import write_atomic_dir
from temporal_lora.evolve import add_domain
from temporal_lora.server import ServerSettings, create_app

KEY = "reload-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _quiet(*_args):
    pass


@pytest.fixture(scope="module")
def v2(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle grown by `add-domain medical` (version 2)."""
    dst = tmp_path_factory.mktemp("v2") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    add_domain(dst, "medical", config=tiny_config(), progress=False, log=_quiet)
    return dst


@pytest.fixture(scope="module")
def texts(v2):
    return pick_domain_texts(load_served(v2))  # one text per domain, medical included


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "served"
    shutil.copytree(tiny_bundle, dst)
    return dst


def commit_copy(bundle, source, corrupt: str | None = None):
    """Commit `source`'s files as the bundle's new version, atomically (as every tlora change is);
    `corrupt` names a file whose bytes are flipped after its checksum was recorded."""
    def fill(tmp):
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if corrupt:
            data = bytearray((tmp / corrupt).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (tmp / corrupt).write_bytes(bytes(data))

    write_atomic_dir(bundle, fill)


def serve(bundle, **settings):
    settings = {"max_new_tokens": 120, "reload_poll_s": 0, **settings}
    return create_app(load_served(bundle), ServerSettings(**settings), bundle=bundle, loader=load_served)


def complete(url, text, model="auto", max_tokens=6, **kw):
    resp = httpx.post(url + "/v1/completions", json={"model": model, "prompt": text, "max_tokens": max_tokens,
                                                     "temperature": 0, **kw}, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_admin_reload_swaps_while_a_running_stream_finishes_on_the_old_version(bundle, v2, texts):
    app = serve(bundle, api_key=KEY)
    old_engine = app.state.service.engine
    old_lock, old_thread, old_model = old_engine._lock, old_engine._thread, weakref.ref(old_engine.tl)
    del old_engine  # only weak references from here: the old version must be freed when it drains
    with running(app) as url:
        info = httpx.get(url + "/v1/bundle", headers=AUTH).json()
        assert info["version"] == 1 and info["domains"] == TINY_DOMAINS and info["versions_alive"] == [1]
        assert [e["version"] for e in info["history"]] == [1]
        long = {"model": "auto", "prompt": texts["legal"], "max_tokens": 100, "temperature": 0.9, "seed": 4}
        reference = complete(url, long["prompt"], max_tokens=100, temperature=0.9, seed=4).json()

        assert httpx.post(url + "/admin/reload").status_code == 401  # the API key guards reloads too
        commit_copy(bundle, v2)
        with cf.ThreadPoolExecutor(1) as pool:
            with old_lock:  # the old version is mid-answer: its request must survive the swap
                started = pool.submit(_stream, url, long)
                wait_until(lambda: httpx.get(url + "/health").json()["in_flight"] == 1)
                done = httpx.post(url + "/admin/reload", headers=AUTH, timeout=120).json()
                assert done["reloaded"] and done["previous"] == 1 and done["version"] == 2
                assert done["versions_alive"] == [1, 2]  # the old one still holds the running request
                new = complete(url, texts["medical"]).json()  # a new request runs on the new version
                assert new["routing"]["domain"] == "medical" and new["routing"]["bundle_version"] == 2
                assert "tlora_bundle_versions_alive 2.0" in httpx.get(url + "/metrics").text
            text, routing = started.result(timeout=120)
        assert routing["bundle_version"] == 1 and routing["domain"] == reference["routing"]["domain"]
        assert text == reference["choices"][0]["text"]
        wait_until(lambda: httpx.get(url + "/v1/bundle", headers=AUTH).json()["versions_alive"] == [2])
        wait_until(lambda: not old_thread.is_alive())  # the old engine was closed
        wait_until(lambda: gc.collect() is not None and old_model() is None)  # nothing keeps the old model
        info = httpx.get(url + "/v1/bundle", headers=AUTH).json()
        assert info["version"] == 2 and info["domains"] == [*TINY_DOMAINS, "medical"]
        assert [e["change"] for e in info["history"]] == ["train", "add-domain"]
        models = [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]]
        assert models == ["auto", *TINY_DOMAINS, "medical", "base"]
        assert complete(url, texts["code"], model="medical").headers["x-bundle-version"] == "2"
        routed = httpx.post(url + "/v1/route", json={"input": texts["medical"]}, headers=AUTH).json()["data"][0]
        assert routed["domain"] == "medical" and routed["bundle_version"] == 2
        again = httpx.post(url + "/admin/reload", headers=AUTH).json()
        assert not again["reloaded"] and again["version"] == 2  # nothing new committed
        assert metric(url, "tlora_reloads_total") == 1 and metric(url, "tlora_bundle_version") == 2


def _stream(url, body):
    text, first = [], None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            first = first or chunk.get("routing")
            text += [c["text"] for c in chunk["choices"]]
    return "".join(text), first


@pytest.mark.slow
def test_polling_picks_up_add_domain(bundle):
    app = serve(bundle, reload_poll_s=0.2)
    with running(app) as url:
        add_domain(bundle, "medical", config=tiny_config(), progress=False, log=_quiet)  # the real command
        wait_until(lambda: httpx.get(url + "/health").json()["bundle_version"] == 2, timeout=120)
        texts = pick_domain_texts(load_served(bundle))
        resp = complete(url, texts["medical"])
        assert resp.headers["x-route"] == "medical" and resp.json()["routing"]["bundle_version"] == 2
        wait_until(lambda: metric(url, "tlora_bundle_versions_alive") == 1)
        assert metric(url, "tlora_reloads_total") == 1 and metric(url, "tlora_reload_failures_total") == 0


def test_corrupt_version_is_refused_and_the_old_one_keeps_serving(bundle, v2, texts):
    app = serve(bundle, reload_poll_s=0.2)
    with running(app) as url:
        before = complete(url, texts["code"]).json()
        commit_copy(bundle, v2, corrupt="adapters/medical/adapter_model.safetensors")
        wait_until(lambda: metric(url, "tlora_reload_failures_total") == 1, timeout=120)
        info = httpx.get(url + "/v1/bundle").json()
        assert info["version"] == 1 and info["versions_alive"] == [1]
        assert "checksum" in info["last_reload_error"]["message"]
        after = complete(url, texts["code"]).json()
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        assert after["routing"]["bundle_version"] == 1
        refused = httpx.post(url + "/admin/reload")
        assert refused.status_code == 409 and "still serving version 1" in refused.json()["error"]["message"]
        assert metric(url, "tlora_reload_failures_total") == 2  # the watcher does not retry the same manifest
        commit_copy(bundle, v2)  # a good version afterwards goes live
        wait_until(lambda: httpx.get(url + "/health").json()["bundle_version"] == 2, timeout=120)
        assert httpx.get(url + "/v1/bundle").json()["last_reload_error"] is None


def test_forwarding_front_tells_the_engine_about_new_adapters(bundle, tiny_bundle, v2, texts, tmp_path):
    """The front reloads with the new router and loads the new adapter into the engine (our own
    server, offering vLLM's runtime adapter endpoints) before it routes anything there."""
    engine_bundle = tmp_path / "engine"
    shutil.copytree(tiny_bundle, engine_bundle)
    engine_app = serve(engine_bundle, api_key="engine-key", runtime_lora_updates=True)
    with running(engine_app) as engine_url:
        front = serve(bundle, backend_url=engine_url + "/v1", backend_api_key="engine-key")
        with running(front) as url:
            commit_copy(bundle, v2)
            assert httpx.post(url + "/admin/reload", timeout=120).json()["version"] == 2
            eng = {"Authorization": "Bearer engine-key"}
            served = [m["id"] for m in httpx.get(engine_url + "/v1/models", headers=eng).json()["data"]]
            assert served == ["auto", *TINY_DOMAINS, "medical", "base"]
            engine_info = httpx.get(engine_url + "/v1/bundle", headers=eng).json()
            assert engine_info["runtime_adapters"] == ["medical"] and engine_info["version"] == 1
            resp = complete(url, texts["medical"], temperature=0.8, seed=3)
            assert resp.headers["x-route"] == "medical" and resp.json()["routing"]["bundle_version"] == 2
            direct = httpx.post(engine_url + "/v1/completions", headers=eng, json={
                "model": "medical", "prompt": texts["medical"], "max_tokens": 6, "temperature": 0.8, "seed": 3})
            assert resp.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
            local = create_app(load_served(v2), ServerSettings())
            with running(local) as local_url:  # the engine's runtime adapter = the bundle's adapter
                same = complete(local_url, texts["medical"], model="medical", temperature=0.8, seed=3)
                assert same.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        # vLLM's answers for the engine endpoints' mistakes; unload, and the name is gone.
        load = engine_url + "/v1/load_lora_adapter"
        unload = engine_url + "/v1/unload_lora_adapter"
        assert httpx.post(load, json={"lora_name": "medical", "lora_path": str(v2 / "adapters/medical")},
                          headers=eng).status_code == 400
        assert httpx.post(load, json={"lora_name": "hr", "lora_path": str(tmp_path)},
                          headers=eng).status_code == 400
        assert httpx.post(unload, json={"lora_name": "medical"}).status_code == 401
        assert httpx.post(unload, json={"lora_name": "medical"}, headers=eng).status_code == 200
        assert httpx.post(unload, json={"lora_name": "medical"}, headers=eng).status_code == 404
        served = [m["id"] for m in httpx.get(engine_url + "/v1/models", headers=eng).json()["data"]]
        assert served == ["auto", *TINY_DOMAINS, "base"]


def test_runtime_adapter_endpoints_are_off_by_default(bundle):
    with running(serve(bundle)) as url:
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}).status_code == 404
        no_bundle = create_app(load_served(bundle), ServerSettings())
        with running(no_bundle) as other:
            assert httpx.post(other + "/admin/reload").status_code == 409

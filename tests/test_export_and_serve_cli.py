"""`tlora export vllm` and `tlora serve` as real commands."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
from support.tiny import TINY_DOMAINS

from temporal_lora.cli import main


def test_export_vllm_writes_peft_folders_and_the_command(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "vllm"
    assert main(["export", "vllm", "--bundle", str(tiny_bundle), "--out", str(out), "--port", "9001"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "export.json").read_text())
    assert info["domains"] == TINY_DOMAINS
    command = info["vllm_command"]
    assert command[:2] == ["vllm", "serve"] and "--enable-lora" in command and "9001" in command
    modules = command[command.index("--lora-modules") + 1:]
    assert modules == [f"{d}={(out / d).resolve()}" for d in TINY_DOMAINS]
    assert command[command.index("--max-lora-rank") + 1] == "8"
    for d in TINY_DOMAINS:  # byte-identical standard PEFT folders
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / d / name).read_bytes() == (tiny_bundle / "adapters" / d / name).read_bytes()
    assert "vllm serve" in printed and "--backend-url http://127.0.0.1:9001/v1" in printed
    # a second export onto the same folder is refused and changes nothing
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", "vllm", "--bundle", str(tiny_bundle), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_serve_cli_needs_a_url_for_the_backend(tiny_bundle, capsys):
    assert main(["serve", "--bundle", str(tiny_bundle), "--backend", "openai-compatible"]) == 2
    assert "--backend-url" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tlora_serve_process_answers_openai_clients(tiny_bundle):
    port = _free_port()
    env = {**os.environ, "TLORA_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "temporal_lora.cli", "serve", "--bundle", str(tiny_bundle),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not come up: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.2)
        # Without --host it listens on loopback only.
        listening = {c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}, listening
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        resp = client.completions.create(model="auto", prompt="def main(argv):\n    return 0\n", max_tokens=3)
        assert resp.model_extra["routing"]["domain"] in TINY_DOMAINS
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0

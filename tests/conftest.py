"""Fixtures only; shared helpers live in tests/support/."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from support.tiny import REAL_DOMAINS, TINY_DOMAINS, build_tiny_model, real_config, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def chat_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny random Llama with a chat template (conversations and grounded prompts need one)."""
    import shutil

    from support.serving import TINY_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_llama) -> Path:
    """A bundle trained end to end on real built-in corpora with a tiny random Llama."""
    from temporal_lora.train import train_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    train_bundle(TINY_DOMAINS, out, base=str(tiny_llama), config=tiny_config(), progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory):
    """(TemporalLoRA, path): tiny adapters on the real embedded SmolLM2, shared by the `real` tests."""
    from temporal_lora.train import train_bundle

    out = tmp_path_factory.mktemp("real") / "bundle"
    tl = train_bundle(REAL_DOMAINS, out, config=real_config(), progress=False, log=lambda *a: None)
    return tl, out

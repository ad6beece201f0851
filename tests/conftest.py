import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny import build_tiny_model  # noqa: E402

from temporal_lora.config import RouterConfig, TrainConfig  # noqa: E402

TINY_DOMAINS = ["code", "literature", "legal"]


def tiny_config(seed: int = 0) -> TrainConfig:
    """A budget that trains on a tiny random model in seconds."""
    return TrainConfig(budget="test", block_size=64, batch_size=2, steps=4, lr=1e-3, warmup_steps=1,
                       router_chunks=40, calib_chunks=8, eval_chunks=6, seed=seed,
                       router=RouterConfig(features="embeddings", hidden_dim=32, epochs=200))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_llama) -> Path:
    """A bundle trained end to end on real built-in corpora with a tiny random Llama."""
    from temporal_lora.train import train_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    train_bundle(TINY_DOMAINS, out, base=str(tiny_llama), config=tiny_config(), progress=False, log=lambda *a: None)
    return out


REAL_DOMAINS = ["medical", "code", "literature"]


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory):
    """(TemporalLoRA, path): tiny adapters on the real embedded SmolLM2, shared by the `real` tests."""
    from temporal_lora.train import train_bundle

    cfg = TrainConfig(budget="test", block_size=64, batch_size=2, steps=3, lr=1e-3, warmup_steps=1,
                      router_chunks=24, calib_chunks=8, eval_chunks=4,
                      router=RouterConfig(features="hidden:-1", epochs=200))
    out = tmp_path_factory.mktemp("real") / "bundle"
    tl = train_bundle(REAL_DOMAINS, out, config=cfg, progress=False, log=lambda *a: None)
    return tl, out

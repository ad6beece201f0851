"""Tiny random GPT-2 / Llama models with a small byte-level BPE tokenizer, built in seconds offline."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from temporal_lora.config import RouterConfig, TrainConfig

TINY_DOMAINS = ["code", "literature", "legal"]
REAL_DOMAINS = ["medical", "code", "literature"]


def tiny_config(seed: int = 0) -> TrainConfig:
    """A budget that trains on a tiny random model in seconds."""
    return TrainConfig(budget="test", block_size=64, batch_size=2, steps=4, lr=1e-3, warmup_steps=1,
                       router_chunks=40, calib_chunks=8, eval_chunks=6, seed=seed,
                       router=RouterConfig(features="embeddings", hidden_dim=32, epochs=200))


def real_config() -> TrainConfig:
    """Tiny adapters on the real embedded SmolLM2 (the `real` tests' shared bundle)."""
    return TrainConfig(budget="test", block_size=64, batch_size=2, steps=3, lr=1e-3, warmup_steps=1,
                       router_chunks=24, calib_chunks=8, eval_chunks=4,
                       router=RouterConfig(epochs=200))  # the default router features


def _training_text() -> list[str]:
    # Real text that is always on disk: a few standard-library modules (code and docstrings).
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "calendar.py"]
    return [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).exists()]


def build_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a random tiny causal LM plus tokenizer to `folder`; load it with `--base folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    vocab = tokenizer.vocab_size
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=4, n_head=4,
                            bos_token_id=1, eos_token_id=1, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(arch)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

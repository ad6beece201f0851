"""Train one LoRA adapter per domain on the frozen base and save it as a standard PEFT adapter folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from temporal_lora.config import AdapterConfig, RunContext, TrainConfig
from temporal_lora.conversations import pad_examples

# Domain names are also PEFT adapter names and server model names; these would collide.
RESERVED_NAMES = ("default", "base", "auto", "none")  # "none": out-of-scope examples (tlora examples)


def distributed_state():
    """accelerate's process state. Created the way `Accelerator()` creates it, so that CPU-only
    multi-process runs (`ACCELERATE_USE_CPU=true`, set by `accelerate launch --cpu`) agree on it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def lora_config(model: nn.Module, cfg: AdapterConfig):
    """A PEFT LoraConfig for this architecture. GPT-2's Conv1D layers need fan_in_fan_out=True."""
    from peft import LoraConfig

    is_gpt2 = getattr(model.config, "model_type", "") == "gpt2"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        fan_in_fan_out=is_gpt2,
    )


def train_adapter(
    model: nn.Module,
    chunks: list[list[int]],
    out_dir: Path,
    cfg: TrainConfig,
    *,
    desc: str = "adapter",
    run: RunContext | None = None,
    progress: bool | None = None,
    init_from: Path | None = None,
    conversations: list[tuple[list[int], list[int]]] | None = None,
) -> dict:
    """Train one LoRA adapter on `chunks` (equal-length token windows) and save it to `out_dir`.

    `conversations` are more rows, (input ids, labels) with -100 wherever no loss is taken (every
    token outside the assistant turns; conversations.py): they train in the same loop and batches
    as the chunks, padded to the batch's longest row. Without them nothing changes.

    The base model is modified in place while training (PEFT injects LoRA layers) and restored
    with `unload()` afterwards, so the next domain starts from the same frozen base. Training runs
    through accelerate: under `accelerate launch` the same code uses every GPU/process.
    Returns a JSON-ready training summary. `init_from` (a saved adapter folder with the same
    config) starts from those weights instead of a fresh LoRA: the sequential-fine-tuning baseline.
    `run.progress` shows a progress bar (`progress`, if given, overrides it).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from tqdm.auto import tqdm

    conversations = list(conversations or [])
    if not chunks and not conversations:
        raise ValueError("no training chunks")
    set_seed(cfg.seed)
    accelerator = Accelerator()
    peft_model = get_peft_model(model, lora_config(model, cfg.adapter))
    if init_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(Path(init_from) / "adapter_model.safetensors")))
    if conversations:  # rows of different lengths, each with its labels
        data = [(c, None) for c in chunks] + conversations
        collate = _pad_rows
    else:
        data, collate = torch.utils.data.TensorDataset(torch.tensor(chunks, dtype=torch.long)), None
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(data) >= cfg.batch_size,
        generator=generator,
        collate_fn=collate,
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup_steps, cfg.steps))
    peft_model, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)

    peft_model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    run = RunContext.of(run, progress=progress)
    bar = tqdm(total=cfg.steps, desc=desc, disable=not (run.progress and accelerator.is_main_process))
    batches = _cycle(loader)
    for _ in range(cfg.steps):
        batch = next(batches)
        if len(batch) == 1:  # document chunks: every token is a target
            (input_ids,) = batch
            loss = peft_model(input_ids=input_ids, labels=input_ids).loss
            real = input_ids.numel()
        else:
            input_ids, labels, mask = batch
            loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            real = int(mask.sum())
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += real * accelerator.num_processes
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    peft_model.eval()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(peft_model)
    if accelerator.is_main_process:
        # Adapter name "default" makes PEFT write the files at the top of out_dir.
        save_peft_adapters(unwrapped, Path(out_dir))
    accelerator.wait_for_everyone()
    unwrapped.unload()  # removes the LoRA layers; base weights were frozen, so the base is unchanged
    tail = losses[-max(1, len(losses) // 5) :]
    return {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "block_size": len(chunks[0]) if chunks else cfg.block_size,
        "train_chunks": len(chunks),
        **({"train_conversations": len(conversations)} if conversations else {}),
        "tokens_seen": tokens,
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "processes": accelerator.num_processes,
    }


def _pad_rows(rows: list[tuple[list[int], list[int] | None]]):
    """Right-padded ids, labels (a chunk's labels are its ids; -100 on padding) and attention mask."""
    rows = [(ids, ids if labels is None else labels) for ids, labels in rows]
    return pad_examples(rows, 0, max(len(ids) for ids, _ in rows))


def _cycle(loader):
    while True:
        yield from loader


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def save_peft_adapters(peft_model, folder: Path, **kwargs) -> None:
    """PEFT's save_pretrained (safetensors), with adapter_config.json written the same way in every process.

    PEFT writes set-valued fields (target_modules) in the set's iteration order, which depends on
    the process's hash seed, so the same adapter saved by two processes had different bytes and
    checksums. Those fields are rewritten sorted, in PEFT's own format (indent 2, sorted keys), so
    PEFT and other tools read the folders as before. Every adapter we write goes through here.
    """
    peft_model.save_pretrained(folder, safe_serialization=True, **kwargs)
    for path in sorted(Path(folder).rglob("adapter_config.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("target_modules", "exclude_modules"):  # the fields PEFT keeps as sets
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")

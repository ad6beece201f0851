"""Export a bundle's adapters for a multi-LoRA serving engine (vLLM), with the exact serve command.

The adapters are already standard PEFT folders, so exporting is copying them out under their domain
names and writing down how to start the engine; our server then routes in front of it
(`tlora serve --backend openai-compatible --backend-url ...`).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from temporal_lora.backbone import resolve_base
from temporal_lora.bundle import read_manifest, safe_path, write_atomic_dir
from temporal_lora.errors import InputError

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def export_vllm(bundle: str | Path, out: str | Path, *, port: int = 8001) -> dict:
    """Copy every adapter to `out/<domain>/` and write `serve-vllm.sh` + `export.json`.

    Returns {"command": the vllm serve command, "front": the tlora serve command, "out": path}.
    """
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)  # verifies every checksum before anything is copied
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose a new directory")
    domains = manifest["domains"]
    rank = max(int(manifest["adapters"][d]["config"]["r"]) for d in domains)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    base = resolve_base(manifest["base_model"]["id"])
    final = out.resolve()
    command = ["vllm", "serve", base, "--served-model-name", "base", "--port", str(port), "--enable-lora",
               "--max-loras", str(len(domains)), "--max-lora-rank", str(max_rank), "--lora-modules",
               *[f"{d}={final / d}" for d in domains]]
    front = ["tlora", "serve", "--bundle", str(bundle.resolve()), "--backend", "openai-compatible",
             "--backend-url", f"http://127.0.0.1:{port}/v1"]

    def fill(tmp: Path) -> None:
        for d in domains:
            src = safe_path(bundle, manifest["adapters"][d]["path"])
            (tmp / d).mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(src / name, tmp / d / name)
        script = "#!/bin/sh\n# Start vLLM with one LoRA per domain; adapter names = domain names.\n"
        (tmp / "serve-vllm.sh").write_text(script + shlex.join(command) + "\n", encoding="utf-8")
        info = {"base_model": manifest["base_model"], "domains": domains, "vllm_command": command,
                "front_command": front}
        (tmp / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    write_atomic_dir(out, fill)
    return {"command": shlex.join(command), "front": shlex.join(front), "out": str(out)}

"""Temporal LoRA against base, oracle, sequential/multitask LoRA, merged adapters, PEFT Arrow and a
MiniLM router — quality, forgetting, routing, abstention, confusable domains, speed and memory.

The same as `tlora bench`; the measurements live in `temporal_lora.bench`.

    OMP_NUM_THREADS=1 python benchmarks/compare_strategies.py --out runs/bench --bundle runs/demo/bundle
"""

from __future__ import annotations

import argparse
from pathlib import Path

from temporal_lora.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--bundle", type=Path, default=None, help="default: train one into OUT/work/bundle")
    parser.add_argument("--budget", default="quick", choices=["quick", "full"])
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    run_bench(args.out, bundle=args.bundle, base=args.base, budget=args.budget)
    print((args.out / "bench.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()

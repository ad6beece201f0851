"""The crossover curve: routed per-domain adapters vs one multitask LoRA at equal compute, 8/32/128 steps per domain.

A thin entry point: the measurement lives in `temporal_lora.bench.crossover` (see its docstring)."""

from temporal_lora.bench.crossover import main

if __name__ == "__main__":
    main()

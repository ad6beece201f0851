"""Soak test of `tlora serve` under faults: is anything lost, wrong or leaking after a long run?

A thin entry point: the measurement lives in `temporal_lora.bench.soak` (see its docstring)."""

from temporal_lora.bench.soak import main

if __name__ == "__main__":
    main()

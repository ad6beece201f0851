"""Domains over time: start from one domain and add the others one at a time (N = 1..5).

A thin entry point: the measurement lives in `temporal_lora.bench.add_domain` (see its docstring)."""

from temporal_lora.bench.add_domain import main

if __name__ == "__main__":
    main()

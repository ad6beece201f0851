"""Hierarchical routing on the real model: subdomain adapters under `medical` and `literature`.

A thin entry point: the measurement lives in `temporal_lora.bench.hierarchy` (see its docstring)."""

from temporal_lora.bench.hierarchy import main

if __name__ == "__main__":
    main()

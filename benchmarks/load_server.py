"""Load test of `tlora serve` over loopback: N concurrent clients for a bounded time.

A thin entry point: the measurement lives in `temporal_lora.bench.load` (see its docstring)."""

from temporal_lora.bench.load import main

if __name__ == "__main__":
    main()

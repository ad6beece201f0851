"""Hot reload under load: a new bundle version goes live in a running `tlora serve`, nothing dropped.

A thin entry point: the measurement lives in `temporal_lora.bench.reload` (see its docstring)."""

from temporal_lora.bench.reload import main

if __name__ == "__main__":
    main()

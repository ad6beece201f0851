"""Segment routing with hysteresis on concatenations of real held-out documents.

A thin entry point: the measurement lives in `temporal_lora.bench.segments` (see its docstring)."""

from temporal_lora.bench.segments import main

if __name__ == "__main__":
    main()

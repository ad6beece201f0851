"""Why segment routing flaps on single-domain documents, and whether a confidence gate fixes it.

A thin entry point: the measurement lives in `temporal_lora.bench.segment_flaps` (see its docstring)."""

from temporal_lora.bench.segment_flaps import main

if __name__ == "__main__":
    main()

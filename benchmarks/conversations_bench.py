"""Conversations as training data, measured on the Django FAQ (issue 13, part 0).

A thin entry point: the measurement lives in `temporal_lora.bench.conversations` (see its docstring).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conversations_bench.py [--bundle runs/demo/bundle]
"""

from temporal_lora.bench.conversations import main

if __name__ == "__main__":
    main()

"""CPU engines side by side: llama.cpp alone, our llama.cpp engine (library, `tlora serve`), the torch engine.

A thin entry point: the measurement lives in `temporal_lora.bench.engine` (see its docstring)."""

from temporal_lora.bench.engine import main

if __name__ == "__main__":
    main()

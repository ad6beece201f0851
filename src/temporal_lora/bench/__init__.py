"""`tlora bench`: Temporal LoRA against merging, sequential and multitask LoRA, Arrow and an
embedder router — quality, forgetting, routing, abstention, confusable domains, speed, memory —
on one base model, the same corpora, document splits and per-adapter training budget; and
`tlora bench scaling` (bench.scaling): one adapter per domain against one multitask adapter as
the number of domains grows.

The measurement layer: it sits on top of the library and nothing in the library imports it.
Modules, by what they measure:

- common: budgets, the phase cache (the resume point), the machine, timing helpers
- baselines: the strategies compared against (sequential, multitask, merged, Arrow, MiniLM router)
- quality: perplexity per strategy, forgetting along the domain sequence
- routing: calibration, abstention, the MiniLM router, confusable domains
- speed: generation speed, the LoRA layers alone, memory
- report: bench.json, bench.md and plots
- run: `run_bench`, every phase in turn
- scaling (with scaling_train, scaling_measure, scaling_report): `run_scaling`
- crossover: `run_crossover`, routed vs multitask at equal compute by budget per domain and init

Every phase stores its result under `<out>/work/` as soon as it finishes (trained baseline
adapters as PEFT folders, measurements as JSON), so an interrupted run resumes where it stopped.
The report (bench.json, bench.md, plots) is written at the end.
"""

from temporal_lora.bench.run import run_bench

__all__ = ["run_bench"]

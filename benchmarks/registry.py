"""Every benchmark by name: its module, its settings dataclass and what it measures.

`python -m benchmarks NAME [flags]` and `tlora bench NAME [flags]` read this table. Each module
exposes `run(settings) -> results` (the dict it writes as JSON) and a settings dataclass whose
fields are its flags (benchmarks/flags.py). Modules are imported on first use, so listing the
benchmarks or asking one for `--help` does not load the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Benchmark:
    """One registry entry: `module` (import path) defines `settings` (a dataclass) and `run`."""

    name: str
    module: str
    settings: str
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def settings_type(self) -> type:
        return getattr(self.load(), self.settings)

    def run(self, settings: Any) -> dict:
        return self.load().run(settings)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("all", "benchmarks.compare", "CompareSettings",
              "Temporal LoRA vs merging, sequential/multitask LoRA, Arrow, a MiniLM router (bench.json)"),
    Benchmark("scaling", "benchmarks.scaling", "ScalingSettings",
              "one adapter per domain vs one multitask LoRA as domains grow 2-16 (scaling.json)"),
    Benchmark("crossover", "benchmarks.crossover", "CrossoverSettings",
              "routed vs multitask LoRA at equal compute, by steps per domain and init (crossover.json)"),
    Benchmark("generalisation", "benchmarks.generalisation", "GeneralisationSettings",
              "router accuracy in-source, on held-out sources and on questions (generalisation.json)"),
    Benchmark("requests", "benchmarks.requests", "RequestsSettings",
              "short requests by department and out-of-scope ones: our router vs TF-IDF / MiniLM + LR (requests.json)"),
    Benchmark("answers", "benchmarks.answers", "AnswersSettings",
              "a department chatbot judged by its answers' facts: worked example and Django FAQ, by lever (answers.json)"),
    Benchmark("conversations", "benchmarks.conversations", "ConversationsSettings",
              "conversations as training data on the Django FAQ (styles.json: conversations)"),
    Benchmark("styles", "benchmarks.styles", "StylesSettings",
              "plain and formal style adapters vs their parent domain on held-out prompts (styles.json)"),
    Benchmark("add-domain", "benchmarks.add_domain", "AddDomainSettings",
              "time to add domain N = 2..5 and the old domains' router accuracy before/after (add_domain.json)"),
    Benchmark("hierarchy", "benchmarks.hierarchy", "HierarchySettings",
              "subdomain adapters under medical and literature: routing and perplexity (hierarchy.json)"),
    Benchmark("segments", "benchmarks.segments", "SegmentsSettings",
              "segment routing with hysteresis on concatenated held-out documents (segments.json)"),
    Benchmark("segment-flaps", "benchmarks.segment_flaps", "SegmentFlapsSettings",
              "why segment routing flaps on single-domain documents; a confidence gate (segment_flaps.json)"),
    Benchmark("engine", "benchmarks.engine", "EngineSettings",
              "CPU engines side by side: llama.cpp alone, our llama.cpp engine, the torch engine (engine.json)"),
    Benchmark("load", "benchmarks.load", "LoadSettings",
              "`tlora serve` under N concurrent clients vs sequential requests (load.json)"),
    Benchmark("reload", "benchmarks.reload", "ReloadSettings",
              "a new bundle version goes live in a running server under load, nothing dropped (reload.json)"),
    Benchmark("soak", "benchmarks.soak", "SoakSettings",
              "`tlora serve` under faults for a long run: anything lost, wrong or leaking? (soak.json)"),
    Benchmark("dedupe", "benchmarks.dedupe", "DedupeSettings",
              "near-duplicate removal on synthetic documents, seconds by corpus size (dedupe.json)"),
    Benchmark("playground", "benchmarks.playground", "PlaygroundSettings",
              "screenshot of the playground page serving a real bundle, in headless Chromium (PNG)"),
]}

"""Settings: budgets are named presets, a passed config never silently drops a budget or seed, and
a run's reporting (progress bars, log lines) travels as one RunContext."""

from dataclasses import replace

import pytest
from support.tiny import tiny_config

from temporal_lora.config import (
    BUDGETS,
    PRESETS,
    QUIET,
    RunContext,
    TrainConfig,
    budget_config,
    settings_for,
)
from temporal_lora.errors import InputError
from temporal_lora.evolve.common import derive_config
from temporal_lora.evolve.styles import STYLE_PRESETS, StyleConfig, style_config
from temporal_lora.train import train_bundle


def test_presets_are_named_factories_of_the_seed():
    assert BUDGETS == tuple(PRESETS) == ("quick", "full") and tuple(STYLE_PRESETS) == BUDGETS
    assert budget_config() == TrainConfig()
    full = budget_config("full", seed=3)
    assert (full.budget, full.seed, full.steps, full.adapter.r, full.adapter.alpha) == ("full", 3, 600, 16, 32)
    assert budget_config("full", 3) == PRESETS["full"](3) and budget_config("full", 3) is not budget_config("full", 3)
    assert style_config("full", 5) == StyleConfig(budget="full", seed=5, prompts=200, samples=6, max_new_tokens=64,
                                                  steps=300, lr=2e-4)
    assert style_config(None, None) == StyleConfig()
    for make in (budget_config, style_config):
        with pytest.raises(InputError, match="unknown budget 'huge'; choose from quick, full"):
            make("huge", 0)


def test_a_config_with_a_conflicting_budget_or_seed_is_refused():
    cfg = tiny_config(seed=1)  # budget "test"
    assert settings_for(cfg, None, None, PRESETS) is cfg
    assert settings_for(cfg, "test", 1, PRESETS) is cfg  # agreeing arguments are no conflict
    assert settings_for(None, None, 7, PRESETS) == budget_config("quick", 7)
    assert settings_for(None, None, None, PRESETS, default_budget="full", default_seed=2) == budget_config("full", 2)
    with pytest.raises(InputError, match=r"budget='full' conflicts with the config given \(budget='test', seed=1\)"):
        settings_for(cfg, "full", None, PRESETS)
    with pytest.raises(InputError, match="seed=2 conflicts"):
        settings_for(cfg, None, 2, PRESETS)
    with pytest.raises(InputError, match="budget='quick' and seed=0 conflicts"):
        settings_for(StyleConfig(budget="full", seed=3), "quick", 0, STYLE_PRESETS)


def test_train_bundle_refuses_a_budget_it_would_have_ignored(tmp_path):
    # Before: the config won and budget="full" was silently dropped (here: on to reading the corpus).
    with pytest.raises(InputError, match="conflicts with the config given"):
        train_bundle(["code"], tmp_path / "b", data={"code": tmp_path / "missing"}, config=tiny_config(),
                     budget="full", run=QUIET)
    with pytest.raises(InputError, match="seed=4 conflicts"):
        train_bundle(["code"], tmp_path / "b", data={"code": tmp_path / "missing"}, config=tiny_config(), seed=4,
                     run=QUIET)
    assert not (tmp_path / "b").exists()


def test_evolve_settings_default_to_the_bundles_and_refuse_conflicts():
    own = replace(budget_config("full", seed=9), block_size=64)
    manifest = {"train_config": own.to_dict(), "router": {"config": own.router.__dict__}}
    cfg = derive_config(manifest, budget=None, seed=None, config=None)
    assert (cfg.budget, cfg.seed, cfg.steps, cfg.block_size) == ("full", 9, 600, 64)
    assert derive_config(manifest, budget="quick", seed=1, config=None).steps == budget_config("quick").steps
    given = tiny_config(seed=5)
    assert derive_config(manifest, budget=None, seed=None, config=given).seed == 5
    with pytest.raises(InputError, match="seed=6 conflicts"):
        derive_config(manifest, budget=None, seed=6, config=given)
    with pytest.raises(InputError, match="budget='quick' conflicts"):
        derive_config(manifest, budget="quick", seed=None, config=given)


def test_run_context_carries_progress_and_log():
    lines: list[str] = []
    run = RunContext(log=lines.append)
    assert RunContext.of(None) == RunContext(progress=True, log=print)
    assert RunContext.of(run) is run
    assert RunContext.of(run, progress=False) == RunContext(progress=False, log=lines.append)
    assert RunContext.of(QUIET, log=lines.append) == RunContext(progress=False, log=lines.append)
    RunContext.of(QUIET, log=lines.append).log("hello")
    QUIET.log("nothing")
    assert lines == ["hello"]

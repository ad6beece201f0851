"""`tlora bench crossover` on a tiny random Llama: the JSON shape, equal compute on both sides, the
warm-start chains, the cell order, and resuming (an interrupted run keeps its cells; a finished one
trains nothing when run again)."""

import json
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
from support.tiny import tiny_config

from benchmarks.crossover import (
    INITS,
    Cell,
    CrossoverBudget,
    crossover_recipe,
    load_cells,
    plan,
    report_crossover,
    run_crossover,
)
from temporal_lora.corpora import Document

_AREAS = {
    "text": ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "difflib.py", "csv.py"],
    "net": ["ftplib.py", "smtplib.py", "poplib.py", "imaplib.py", "socketserver.py", "mimetypes.py"],
    "numbers": ["fractions.py", "statistics.py", "random.py", "calendar.py", "numbers.py", "colorsys.py"],
}


def _corpora() -> dict[str, list[Document]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for name, files in _AREAS.items():
        out[name] = [Document(id=f, text=(root / f).read_text(encoding="utf-8"), group=f)
                     for f in files if (root / f).is_file()]
        assert len(out[name]) >= 4, name
    return out


def _budget() -> CrossoverBudget:
    return CrossoverBudget(name="test", steps=(2, 4), ns=(2, 3), seeds=(0, 1), ppl_chunks=3, router_chunks=16,
                           calib_chunks=6, router_test_chunks=6)


def _run(out, tiny_llama, **kw):
    return run_crossover(out, work=out / "work", base=str(tiny_llama), budget=_budget(), corpora=_corpora(),
                         config=tiny_config(), progress=False, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def crossover_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("crossover")
    partial = _run(out, tiny_llama, max_cells=3)  # an interrupted run
    first_cells = {k: json.loads((out / "work" / "cells" / f"{k}.json").read_text()) for k in partial["cells"]}
    partial_json = json.loads((out / "crossover.json").read_text())
    report = _run(out, tiny_llama)  # resumes
    return out, report, first_cells, partial_json


def test_json_shape_and_files(crossover_run):
    out, report, _, partial_json = crossover_run
    main = json.loads((out / "crossover.json").read_text())
    assert set(main) == {"2", "4"}
    for inits in main.values():
        assert set(inits) == set(INITS)
        for by_n in inits.values():
            assert set(by_n) == {"2", "3"} and all(isinstance(v, float) and v > 0 for v in by_n.values())
    # Written after every cell: the interrupted run already had its first three cells (N=2, 2 steps).
    assert partial_json == {"2": {i: {"2": main["2"][i]["2"]} for i in INITS[:3]}}
    detail = json.loads((out / "crossover_detail.json").read_text())
    assert detail["crossover"] == main and detail["remaining_cells_in_order"] == []
    assert set(detail["seed_noise"]) == {f"s2-{i}-N2" for i in INITS}
    md = (out / "crossover.md").read_text()
    assert "| steps per domain | init | N=2 | N=3 |" in md and "## Where per-domain adapters start to win" in md
    assert (out / "crossover.png").stat().st_size > 0
    assert all(r["hardware"] for r in detail["cells"].values())  # a grid's cells may come from several machines
    assert f"Cells were measured on: {detail['hardware']}." in md


def test_equal_compute_and_same_seed(crossover_run):
    _, report, _, _ = crossover_run
    cells = report["cells"]
    assert len(cells) == len(plan(_budget(), cells)) == 4 + 1 + 4 + 4 + 8
    for r in cells.values():
        assert r["compute_steps"]["routed"] == r["n"] * r["steps"], r
        if "ratio" in r:
            assert r["compute_steps"]["multitask"] == r["n"] * r["steps"]
    shared = cells["s4-shared-N3-seed0"]
    assert shared["shared_seed_steps"] == 3  # each domain gave max(1, 4 // 8) = 1 step to the seed phase
    # The other training seed gave other adapters and another multitask (the noise is real).
    a, b = cells["s2-base-N2-seed0"], cells["s2-base-N2-seed1"]
    assert a["ppl_multitask"] != b["ppl_multitask"] and a["ppl_oracle"] != b["ppl_oracle"]


def test_warm_start_chains(crossover_run):
    out, report, _, _ = crossover_run
    cells = report["cells"]
    near = cells["s2-nearest-N3-seed0"]["adapter_inits"]
    assert near["text"] == {"init": "base"}  # the first domain has nothing to start from
    assert near["net"]["init"] == "nearest" and near["net"]["init_from"] == "text"
    assert near["numbers"]["init_from"] in ("text", "net") and set(near["numbers"]["affinity"]) == {"text", "net"}
    blend = cells["s2-blend-N3-seed0"]["adapter_inits"]
    assert blend["numbers"]["init"] == "blend" and set(blend["numbers"]["affinity"]) == {"text", "net"}
    # N=3 extends the N=2 chain: its first two adapters are the same folders (same oracle perplexity).
    for init in ("base", "nearest", "blend"):
        n2, n3 = cells[f"s2-{init}-N2-seed0"], cells[f"s2-{init}-N3-seed0"]
        assert {d: n3["ppl"]["oracle"][d] for d in ("text", "net")} == n2["ppl"]["oracle"]
    assert (out / "work" / "seed0" / "s2" / "shared-N3" / ".seed" / "training.json").is_file()


def test_soft_vs_hard_at_largest_n(crossover_run):
    _, report, _, _ = crossover_run
    modes = report["soft_vs_hard"]
    assert "modes-s2-base-N3-seed0" in modes and "s2-base-N3-seed0" in modes
    # The modes phase and the full cell of the same adapters agree (one cached evaluation).
    assert modes["modes-s2-base-N3-seed0"]["ppl_soft"] == modes["s2-base-N3-seed0"]["ppl_soft"]
    for m in modes.values():
        assert m["ppl_top2"] > 0 and m["ppl_soft"] > 0 and m["n"] == 3


def test_resume_keeps_cells_and_trains_nothing(crossover_run, tiny_llama, monkeypatch):
    out, report, first_cells, _ = crossover_run
    for k, v in first_cells.items():
        assert report["cells"][k] == v  # cells of the interrupted run were kept, not redone

    def no_training(*a, **k):
        raise AssertionError("a finished adapter was trained again")

    for where in ("temporal_lora.adapters", "benchmarks.baselines", "benchmarks.crossover"):
        monkeypatch.setattr(f"{where}.train_adapter", no_training)
    again = _run(out, tiny_llama)
    assert again["cells"] == report["cells"] and again["crossover"] == report["crossover"]


def test_report_only_rewrites_results_from_the_cells(crossover_run, tmp_path):
    out, report, _, _ = crossover_run
    again = report_crossover(tmp_path, out / "work", _budget())  # no model, no training
    assert again["crossover"] == report["crossover"]
    assert json.loads((tmp_path / "crossover.json").read_text()) == report["crossover"]
    part = report_crossover(tmp_path / "part", out / "work", replace(_budget(), ns=(2,)))
    assert set(part["crossover"]["4"]["base"]) == {"2"}


def test_committed_results_outlive_the_work_folder(crossover_run, tiny_llama, tmp_path):
    # A new machine has no work folder: the cells recorded in the results are kept, if the recipe matches.
    out, report, _, _ = crossover_run
    domains = list(_AREAS)
    recipe = crossover_recipe(tiny_config(), _budget(), domains, str(tiny_llama))
    assert recipe == json.loads((out / "work" / "recipe.json").read_text())  # what the run checked its cache with
    assert load_cells(tmp_path / "new-work", out, recipe) == report["cells"]
    other = crossover_recipe(replace(tiny_config(), lr=1e-4), _budget(), domains, str(tiny_llama))
    assert load_cells(tmp_path / "new-work", out, other) == {}
    other = crossover_recipe(tiny_config(), replace(_budget(), ppl_chunks=5), domains, str(tiny_llama))
    assert load_cells(tmp_path / "new-work", out, other) == {}
    other = crossover_recipe(tiny_config(), _budget(), domains, "another-base")  # another base model's cells
    assert load_cells(tmp_path / "new-work", out, other) == {}
    assert load_cells(tmp_path / "new-work", out, recipe | {"domains": domains[::-1]}) == {}


def test_parts_train_one_side_each_then_the_cell_trains_nothing(tiny_llama, tmp_path, monkeypatch):
    b = CrossoverBudget(name="test", steps=(2,), ns=(2,), inits=("base",), seeds=(0,), modes=False, ppl_chunks=3,
                        router_chunks=16, calib_chunks=6, router_test_chunks=6)

    def run(**kw):
        return run_crossover(tmp_path, work=tmp_path / "work", base=str(tiny_llama), budget=b, corpora=_corpora(),
                             config=tiny_config(), progress=False, log=lambda *a: None, **kw)

    root = tmp_path / "work" / "seed0" / "s2"
    got = run(part="multitask")
    assert got["cell"] == "s2-base-N2-seed0" and got["trained"] == [str(root / "multitask-N2")]
    assert not (root / "base").exists() and not (tmp_path / "crossover.json").exists()  # trained, measured nothing
    got = run(part="adapters")
    assert got["trained"] == [str(root / "base" / d) for d in list(_AREAS)[:2]]

    def no_training(*a, **k):
        raise AssertionError("a part trained by --part was trained again")

    for where in ("temporal_lora.adapters", "benchmarks.baselines", "benchmarks.crossover"):
        monkeypatch.setattr(f"{where}.train_adapter", no_training)
    report = run()
    assert report["cells"]["s2-base-N2-seed0"]["ratio"] > 0
    assert run(part="adapters") == {"cell": None, "trained": []}  # the grid is finished


def test_plan_order():
    b = CrossoverBudget()
    keys = [c.key for c in plan(b, {})]
    assert keys[:4] == [f"s8-{i}-N8-seed0" for i in INITS]
    assert keys[4] == "modes-s8-base-N16-seed0"
    assert keys[5:9] == [f"s8-{i}-N8-seed1" for i in INITS]
    assert keys[9:13] == [f"s32-{i}-N8-seed0" for i in INITS]
    assert keys[13] == "s128-base-N8-seed0" and keys[17].endswith("N16-seed0")
    assert len(keys) == 4 + 1 + 4 + 4 + 4 + 12
    # Once the 32-step cells are in, the best of them runs right after base at 128 steps.
    done = {Cell(32, i, 8, 0).key: {"ratio": r} for i, r in zip(INITS, (1.05, 1.04, 0.99, 1.01), strict=True)}
    keys = [c.key for c in plan(b, done)]
    assert keys[13:15] == ["s128-base-N8-seed0", "s128-blend-N8-seed0"]
    assert keys[17] == "s8-blend-N16-seed0"


def test_cli_refuses_other_budgets_and_bundles(capsys, tmp_path):
    from temporal_lora.cli import main

    assert main(["bench", "crossover", "--out", str(tmp_path / "b"), "--budget", "full"]) == 2
    assert "one grid" in capsys.readouterr().err
    assert main(["bench", "crossover", "--out", str(tmp_path / "b"), "--bundle", str(tmp_path)]) == 2
    assert "--bundle is not used" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cache_refuses_another_recipe_and_names_the_difference(tmp_path):
    from benchmarks.common import check_recipe
    from temporal_lora.errors import InputError

    recipe = {"train_config": {"lr": 0.002}, "domains": ["a", "b", "c"], "base": None}
    check_recipe(tmp_path, recipe)
    check_recipe(tmp_path, dict(recipe))  # the same recipe resumes
    # A smaller largest N gives a shorter domain list than the cache's: refused, and the message says so.
    with pytest.raises(InputError, match=r"differs in: domains\)"):
        check_recipe(tmp_path, recipe | {"domains": ["a", "b"]})
    assert json.loads((tmp_path / "recipe.json").read_text()) == recipe  # the stored recipe is kept

"""The measurement lab's front door (benchmarks/): every registered benchmark imports, has a settings
dataclass and a working `--help`; `tlora bench`'s flags are still accepted; and the benchmarks that
run on a tiny random model in seconds run at a tiny budget. Timings are recorded, never asserted."""

import dataclasses
import json

import pytest

import benchmarks
from benchmarks.flags import parse_settings
from benchmarks.registry import BENCHMARKS

# What `tlora bench [all|scaling|crossover|generalisation]` has always accepted (cli.py's subparser).
TLORA_BENCH_FLAGS = ["--work", "--out", "--bundle", "--budget", "--steps", "--init", "--base"]


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_imports_and_has_settings_and_help(name, capsys):
    bench = BENCHMARKS[name]
    module = bench.load()
    assert callable(module.run)
    settings_type = bench.settings_type
    assert dataclasses.is_dataclass(settings_type)
    assert benchmarks.main([name, "--help"]) == 0
    usage = capsys.readouterr().out
    assert f"python -m benchmarks {name}" in usage
    for field in dataclasses.fields(settings_type):
        assert f"--{field.name.replace('_', '-')}" in usage
        assert field.metadata.get("help"), f"{name}: --{field.name} has no help"


def test_list_names_every_benchmark_and_unknown_names_are_refused(capsys):
    assert benchmarks.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(BENCHMARKS)
    assert benchmarks.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert benchmarks.main(["dedupe", "--no-such-flag"]) == 2


@pytest.mark.parametrize("name", ["all", "scaling", "crossover", "generalisation"])
def test_tlora_bench_flags_are_still_accepted(name, tmp_path):
    argv = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--bundle", str(tmp_path / "b"),
            "--budget", "full", "--steps", "8", "--init", "blend", "--base", "some/model"]
    assert sorted(a for a in argv if a.startswith("--")) == sorted(TLORA_BENCH_FLAGS)
    s = parse_settings(BENCHMARKS[name].settings_type, argv, prog="tlora bench", description="")
    assert (s.work, s.out, s.bundle, s.budget, s.base) == (tmp_path / "w", tmp_path / "o", tmp_path / "b",
                                                           "full", "some/model")
    # crossover's --steps and --init narrow its grid (several values each); elsewhere they are one value
    assert (s.steps, s.init if name != "crossover" else s.inits) in ((8, "blend"), ((8,), ("blend",)))


def test_module_flags_live_under_the_registry_name():
    s = parse_settings(BENCHMARKS["crossover"].settings_type,
                       ["--part", "adapters", "--max-cells", "2", "--report-only", "--ns", "2", "4"], "x", "")
    assert (s.part, s.max_cells, s.report_only, s.ns, s.steps) == ("adapters", 2, True, (2, 4), None)
    s = parse_settings(BENCHMARKS["segments"].settings_type, ["--sweep-test", "--ppl-config", "16,1.0,0.0,1"], "x", "")
    assert s.sweep_test and s.ppl_config == "16,1.0,0.0,1" and s.piece == 256
    with pytest.raises(SystemExit):  # a required flag
        parse_settings(BENCHMARKS["styles"].settings_type, [], "x", "")


def test_benchmarks_that_train_their_own_adapters_refuse_a_bundle_and_crossover_one_grid(tmp_path, capsys):
    out = tmp_path / "o"
    assert benchmarks.main(["crossover", "--out", str(out), "--budget", "full"]) == 2
    assert "one grid" in capsys.readouterr().err
    for name in ("crossover", "scaling"):
        assert benchmarks.main([name, "--out", str(out), "--bundle", str(tmp_path)]) == 2
        assert "--bundle is not used" in capsys.readouterr().err
    assert not out.exists()


def test_dedupe_keeps_exactly_the_distinct_documents(tmp_path):
    out = tmp_path / "dedupe"
    assert benchmarks.main(["dedupe", "--sizes", "150", "300", "--words", "80", "--vocab", "800", "--exact", "10",
                            "--near", "20", "--repeats", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "dedupe.json").read_text())
    assert [r["documents"] for r in saved["rows"]] == [150, 300]
    for row in saved["rows"]:
        assert row["input_documents"] == row["documents"] + 30
        assert row["kept"] == row["expected_kept"] == row["documents"]  # exact and near copies dropped
        assert row["exact_only_kept"] == row["documents"] + 20  # the baseline misses the near copies
        assert row["seconds"] > 0 and row["goal_seconds"] is None and row["meets_goal"] is None
    assert saved["settings"]["sizes"] == [150, 300] and saved["hardware"]
    assert "| 300 | 330 |" in (out / "dedupe.md").read_text()


def test_segment_benchmarks_on_a_tiny_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "time"
    common = ["--bundle", str(tiny_bundle), "--out", str(out), "--piece", "32"]
    # every mixed stream is scored (3 domains: 6 A->B->A and 3 A->mix->A streams)
    assert benchmarks.main(["segments", *common, "--sizes", "16", "--ppl-streams", "9"]) == 0
    saved = json.loads((out / "segments.json").read_text())
    n = len(saved["domains"])
    assert saved["sizes"] == [16] and saved["streams"] == {"A->B->A": n * (n - 1), "A->mix->A": n,
                                                           "single": saved["streams"]["single"]}
    chosen = saved["chosen"]["16"]
    assert chosen["smoothing"] in (1.0, 0.7, 0.5) and chosen["margin"] in (0.0, 0.1, 0.2, 0.4)
    ppl = saved["perplexity"]["mixed"]
    assert ppl["streams"] == n * (n - 1) + n and all(v > 1 for v in ppl["perplexity"].values())
    assert ppl["vs_oracle"]["oracle per segment"] == 0
    assert (out / "segments.md").stat().st_size > 0 and (out / "segments_weights.png").stat().st_size > 0

    assert benchmarks.main(["segment-flaps", *common]) == 0
    flaps = json.loads((out / "segment_flaps.json").read_text())
    assert flaps["streams"] == saved["streams"]  # the same streams as the segments benchmark
    assert flaps["rows"] and sum(bool(r.get("chosen_on_val")) for r in flaps["rows"]) == len(
        flaps["flapping_docs_without_gate"])  # one gate chosen per base setting

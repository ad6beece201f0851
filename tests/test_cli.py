"""The CLI: JSON output, one clear error line and exit status 2 for bad input, nothing written."""

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from temporal_lora import cli
from temporal_lora.cli import COMMANDS, OneOf, build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code, err, text):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("tlora: error:")]
    assert len(lines) == 1 and text in lines[0], err


EXPECTED_COMMANDS = [
    "fetch", "corpus", "train", "route", "generate", "eval", "demo", "add-domain", "add-subdomain",
    "add-style", "examples", "remove-domain", "history", "rollback", "bench", "serve", "export",
]
EXPECTED_NESTED = [("examples", "add"), ("examples", "list"), ("examples", "remove"), ("export", "vllm")]


def _command_paths(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command reachable from the parser: its subparsers, recursively, and a leaf's fixed
    positional choices (`export vllm`), read from argparse, so that a new command is covered."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += [(*words, name), *_command_paths(sub, (*words, name))]
        elif not action.option_strings and action.choices and words:
            paths += [(*words, choice) for choice in action.choices]
    return paths


def test_every_command_has_help(capsys):
    paths = _command_paths(build_parser())
    assert [p[0] for p in paths if len(p) == 1] == EXPECTED_COMMANDS  # a dropped command fails here
    assert [p for p in paths if len(p) > 1] == EXPECTED_NESTED
    for words in paths:
        try:
            code = main([*words, "--help"])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        assert code == 0, (words, err)
        assert out.startswith(f"usage: tlora {words[0]}") and words[-1] in out, (words, out)
        assert not err, (words, err)


def _help_of(capsys, *words) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*words, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _squeezed(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines, also at hyphens


def _flags(command) -> list[str]:
    args = [a for item in command.args for a in (item.args if isinstance(item, OneOf) else (item,))]
    return [name for a in args for name in a.names if name.startswith("-")]


def test_every_command_and_flag_of_the_table_is_in_help(capsys):
    top = _help_of(capsys)
    for name, command in COMMANDS.items():
        assert name in top and _squeezed(command.help) in _squeezed(top)
        if not command.add_help:  # bench: its words go to the lab, whose --help lists the benchmarks
            continue
        text = _help_of(capsys, name)
        assert [f for f in _flags(command) if f not in text] == [], name
        for action, sub in command.actions.items():
            assert action in text
            sub_text = _help_of(capsys, name, action)
            assert [f for f in _flags(sub) if f not in sub_text] == [], f"{name} {action}"


def test_setting_flags_take_their_help_from_the_settings_docstrings(capsys):
    text = _squeezed(_help_of(capsys, "route"))
    docs = cli.field_docs("temporal_lora.routing.segments", "SegmentConfig")
    for field in ("smoothing", "margin", "confirm", "min_confidence"):
        assert _squeezed(f"segment routing: {docs[field]}") in text
    text = _squeezed(_help_of(capsys, "train"))
    assert _squeezed(cli.field_docs("temporal_lora.config", "RouterConfig")["features"]) in text
    assert "{quick,full}" in text


def test_bench_hands_its_words_to_the_lab(monkeypatch, capsys):
    calls = []

    def fake_main(argv, prog):
        calls.append((argv, prog))
        return 3

    monkeypatch.setitem(sys.modules, "benchmarks", types.SimpleNamespace(main=fake_main))
    assert main(["bench", "scaling", "--steps", "8"]) == 3
    assert main(["bench", "--out", "x", "--budget", "full"]) == 3  # no name: the comparison bench
    assert main(["bench"]) == 3
    assert main(["bench", "--help"]) == 3
    assert calls == [(["scaling", "--steps", "8"], "tlora bench"), (["all", "--out", "x", "--budget", "full"],
                     "tlora bench"), (["all"], "tlora bench"), (["--help"], "tlora bench")]


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(sys.modules, "benchmarks", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".").resolve() / "benchmarks").is_dir()])
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "bench", "--help")
    _assert_clean_error(code, err, "tlora bench runs from a repository checkout")
    assert "python -m benchmarks NAME" in err


def test_unknown_flags_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["history", "--bundle", "b", "--nope"])
    assert exc.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_route_prints_one_json_object_per_input(capsys, tiny_bundle, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "Enter HAMLET, reading."}) + "\n")
    code, out, _ = run(capsys, "route", "--bundle", str(tiny_bundle), "def f(x):\n    return x", "--jsonl", str(jsonl))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"domain", "probs", "confidence"}
        assert row["domain"] in ("code", "literature", "legal")
        assert abs(sum(row["probs"].values()) - 1) < 1e-4


def test_generate_prints_text_and_route(capsys, tiny_bundle):
    code, out, _ = run(capsys, "generate", "--bundle", str(tiny_bundle), "--max-new-tokens", "4", "--json",
                       "--mode", "topk", "import sys")
    assert code == 0
    row = json.loads(out)
    assert row["prompt"] == "import sys" and row["mode"] == "topk" and "route" in row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--domains", "medical,nosuch", "--out", "{tmp}/b"], "unknown domain 'nosuch'"),
        (["train", "--domains", "code", "--data", "code={tmp}/missing", "--out", "{tmp}/b"], "does not exist"),
        (["train", "--domains", "code", "--data", "code={tmp}/empty", "--out", "{tmp}/b"], "no .txt"),
        (["train", "--domains", "code,base", "--out", "{tmp}/b"], "reserved"),
        (["train", "--domains", "code", "--data", "Bad Name={tmp}", "--out", "{tmp}/b"], "domain name"),
        (["route", "--bundle", "{tmp}/nobundle", "hello"], "does not exist"),
        (["route", "--bundle", "{bundle}", ""], "input 0 is empty"),
        (["route", "--bundle", "{bundle}", "   \n"], "input 0 is empty"),
        # invalid UTF-8 on the command line arrives as a lone surrogate
        (["route", "--bundle", "{bundle}", "ok", "\udcff"], "input 1 is not valid Unicode text"),
        (["route", "--bundle", "{bundle}"], "no input"),
        (["route", "--bundle", "{bundle}", "--jsonl", "{tmp}/bad.jsonl"], "line 1: not valid JSON"),
        (["route", "--bundle", "{bundle}", "--jsonl", "{tmp}/empty.jsonl"], "input 1 is empty"),
        (["generate", "--bundle", "{bundle}", "--domain", "finance", "hello"], "unknown domain 'finance'"),
        (["generate", "--bundle", "{bundle}", "{long}"], "exceeds the context"),
        (["generate", "--bundle", "{bundle}", "--chat", "hello"], "has no chat template"),
    ],
)
def test_bad_input_gives_one_error_line_and_writes_nothing(capsys, tmp_path, tiny_bundle, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "empty.jsonl").write_text('{"text": "fine"}\n{"text": " "}\n')
    long_prompt = "word " * 400  # the tiny model's context is 256 tokens
    before = sorted(p.name for p in tmp_path.iterdir())
    bundle_files = {p: p.stat().st_mtime_ns for p in tiny_bundle.rglob("*")}
    argv = [a.format(tmp=tmp_path, bundle=tiny_bundle, long=long_prompt) for a in argv]
    code, _, err = run(capsys, *argv)
    _assert_clean_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in tiny_bundle.rglob("*")} == bundle_files


def test_train_refuses_to_overwrite_a_non_bundle_directory(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    code, _, err = run(capsys, "train", "--domains", "code", "--out", str(tmp_path / "out"))
    _assert_clean_error(code, err, "is not a bundle")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "temporal_lora.cli", "route", "--bundle", str(tmp_path), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tlora: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_serve_warns_that_quantised_llamacpp_weights_are_not_batch_invariant(tmp_path, capsys):
    """The note comes before the bundle is opened (here: a missing one, one clear error, exit 2)."""
    code = main(["serve", "--bundle", str(tmp_path / "missing"), "--engine", "llama-cpp", "--engine-weights", "q8_0"])
    err = capsys.readouterr().err
    assert code == 2 and "not batch-invariant" in err and "--max-batch 1" in err
    code = main(["serve", "--bundle", str(tmp_path / "missing"), "--engine", "llama-cpp", "--engine-weights", "q8_0",
                 "--max-batch", "1"])
    assert code == 2 and "not batch-invariant" not in capsys.readouterr().err

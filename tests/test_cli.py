"""The CLI: JSON output, one clear error line and exit status 2 for bad input, nothing written."""

import json
import subprocess
import sys

import pytest

from temporal_lora.cli import build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code, err, text):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("tlora: error:")]
    assert len(lines) == 1 and text in lines[0], err


def test_every_command_has_help():
    parser = build_parser()
    for command in ("fetch", "train", "route", "generate", "eval", "demo"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0


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

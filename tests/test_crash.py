"""Bundles survive SIGKILL: train, add-domain and save_pretrained killed in a subprocess at random
points (and at every file-system step of the atomic write) leave the old bundle or the complete
new one, never a broken one. A summary of the faults injected goes to runs/test-artifacts/crash.json."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from temporal_lora.bundle import MANIFEST, read_manifest

DRIVER = Path(__file__).parent / "support" / "crash_driver.py"
ARTIFACTS = Path(__file__).parents[1] / "runs" / "test-artifacts"
RANDOM_KILLS = 3  # per operation; each is a subprocess that imports torch


def run_driver(op: str, args: dict, kill_after: float | None = None) -> tuple[bool, float | None]:
    """Run the driver; SIGKILL it `kill_after` seconds after it is ready. Returns (killed, work seconds)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(DRIVER), op, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    ready = proc.stdout.readline().strip()
    if ready != "ready":
        proc.kill()
        raise AssertionError(f"driver did not start: {ready!r}\n{proc.communicate()[1][-3000:]}")
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, err[-3000:]
    done = [line for line in out.splitlines() if line.startswith("done ")]
    return killed, float(done[0].split()[1]) if done else None


def content(manifest: dict) -> dict:
    """What must match a reference run: every file's checksum except the version store's timestamps."""
    return {k: v for k, v in manifest["files"].items() if not k.startswith("versions/")}


def outcome(target: Path, old: dict, new_content: dict) -> str:
    manifest = read_manifest(target)  # recovers an interrupted swap, verifies every checksum
    if manifest == old:
        return "old"
    assert content(manifest) == new_content, "a bundle that is neither the old one nor the complete new one"
    return "new"


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A 2-domain bundle (code, literature) to be overwritten: tiny_bundle minus legal."""
    from temporal_lora.evolve import remove_domain

    out = tmp_path_factory.mktemp("old") / "bundle"
    shutil.copytree(tiny_bundle, out)
    remove_domain(out, "legal", log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def report():
    """What each test injected and saw; written to crash.json after this module's last test,
    whichever tests ran and in whatever order."""
    entries: dict[str, dict] = {}
    yield entries
    if entries:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "crash.json").write_text(json.dumps(dict(sorted(entries.items())), indent=2))


def kill_trials(name: str, op: str, args: dict, old_bundle: Path, tmp_path: Path) -> dict:
    """One uninterrupted reference run, then RANDOM_KILLS runs killed at random points of its work.
    Returns the report entry: the reference run's seconds, the kill delays, and the outcomes."""
    def fresh(i) -> Path:
        target = tmp_path / f"run{i}" / "bundle"
        shutil.copytree(old_bundle, target)
        return target

    old = read_manifest(old_bundle)
    reference = fresh("ref")
    _, seconds = run_driver(op, args | {"target": str(reference)})
    new_content = content(read_manifest(reference))
    assert read_manifest(reference) != old
    rng = random.Random(f"{name}-kills")
    counts = {"old": 0, "new": 0}
    delays = []
    for i in range(RANDOM_KILLS):
        target = fresh(i)
        delay = rng.uniform(0.0, seconds * 1.05)
        killed, _ = run_driver(op, args | {"target": str(target)}, kill_after=delay)
        delays.append(round(delay, 2))
        counts[outcome(target, old, new_content)] += 1
    return {"reference_work_seconds": round(seconds, 2), "kill_delays_s": delays, "outcomes": counts}


def check_entry(entry: dict) -> None:
    """Every killed run ended in one of the two allowed outcomes, at a delay within the work."""
    assert sum(entry["outcomes"].values()) == len(entry["kill_delays_s"]) == RANDOM_KILLS, entry
    assert entry["reference_work_seconds"] > 0
    assert all(0 <= d <= entry["reference_work_seconds"] * 1.05 + 0.01 for d in entry["kill_delays_s"]), entry


@pytest.mark.slow
def test_killed_train_leaves_old_or_complete_new_bundle(old_bundle, tiny_llama, tmp_path, report):
    report["train"] = kill_trials("train", "train", {"domains": ["legal", "literature"], "base": str(tiny_llama)},
                                  old_bundle, tmp_path)
    check_entry(report["train"])


@pytest.mark.slow
def test_killed_add_domain_leaves_old_or_complete_new_bundle(old_bundle, tmp_path, report):
    report["add-domain"] = kill_trials("add-domain", "add-domain", {"name": "legal"}, old_bundle, tmp_path)
    check_entry(report["add-domain"])


@pytest.mark.slow
def test_killed_save_pretrained_leaves_old_or_complete_new_bundle(old_bundle, tiny_bundle, tmp_path, report):
    report["save_pretrained"] = kill_trials("save_pretrained", "save", {"src": str(tiny_bundle), "repeat": 3},
                                            old_bundle, tmp_path)
    check_entry(report["save_pretrained"])


def test_kill_at_every_step_of_the_atomic_write(old_bundle, tiny_bundle, tmp_path, report):
    """Deterministic kills after each file-system step, including between the two renames, where
    no bundle is at the path until the next reader or writer puts the old one back."""
    old, new = read_manifest(old_bundle), read_manifest(tiny_bundle)
    seen, step = [], 0
    while True:
        step += 1
        target = tmp_path / f"step{step}" / "bundle"
        shutil.copytree(old_bundle, target)
        killed, _ = run_driver("crash-at", {"step": step, "src": str(tiny_bundle), "target": str(target)})
        if not killed:
            break
        missing = not (target / MANIFEST).exists()
        got = outcome(target, old, content(new))
        seen.append({"step": step, "bundle_missing_before_recovery": missing, "outcome": got})
        # The next write cleans what the dead writer left (temp dir, set-aside copy).
        run_driver("crash-at", {"step": 0, "src": str(tiny_bundle), "target": str(target)})
        assert read_manifest(target) == new and leftovers(target) == []
    assert len(seen) >= 4, seen  # mkdtemp, fill, set old aside, move new in, ...
    assert any(s["bundle_missing_before_recovery"] for s in seen), "never hit the window between the renames"
    assert {s["outcome"] for s in seen} == {"old", "new"}
    report["atomic write, every step"] = {"steps": seen}

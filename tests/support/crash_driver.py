"""Run one bundle-writing operation in its own process, so a test can SIGKILL it at any point.

    python tests/crash_driver.py OP JSON_ARGS

Prints "ready" once imports are done (the test starts its kill timer there) and "done SECONDS"
at the end. OP `crash-at` kills the process itself at the K-th file-system step of
`write_atomic_dir`, to hit the narrow windows (between two renames) that a timer rarely hits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/, for `support`

from temporal_lora import bundle as bundle_module  # noqa: E402


def _say(line: str) -> None:
    print(line, flush=True)


def crash_at(step: int, src: str, target: str) -> None:
    """Write a copy of bundle `src` over `target`, killing this process right after step `step`.

    The steps are every file-system mutation `write_atomic_dir` makes (temp dirs, the two
    renames, removing the set-aside old bundle); the copy itself is the `fill` every writer uses.
    """
    import shutil

    count = 0

    def counted(fn):
        def wrapped(*args, **kwargs):
            nonlocal count
            result = fn(*args, **kwargs)
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    bundle_module.os.replace = counted(os.replace)
    bundle_module.shutil.rmtree = counted(shutil.rmtree)
    bundle_module.tempfile.mkdtemp = counted(bundle_module.tempfile.mkdtemp)
    fill = counted(lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    _say("ready")
    bundle_module.write_atomic_dir(Path(target), fill)


def main() -> None:
    op, args = sys.argv[1], json.loads(sys.argv[2])
    if op == "crash-at":  # no torch needed: stays fast enough to try every step
        crash_at(args["step"], args["src"], args["target"])
        _say("done 0")
        return
    from support.tiny import tiny_config

    config = tiny_config(seed=args.get("seed", 0))
    if op == "train":
        from temporal_lora.train import train_bundle

        _say("ready")
        t0 = time.perf_counter()
        train_bundle(args["domains"], args["target"], base=args["base"], config=config,
                     progress=False, log=lambda *a: None)
    elif op == "add-domain":
        from temporal_lora.evolve import add_domain

        _say("ready")
        t0 = time.perf_counter()
        add_domain(args["target"], args["name"], corpus=args["name"], config=config, progress=False,
                   log=lambda *a: None)
    elif op == "save":
        from temporal_lora.model import TemporalLoRA

        tl = TemporalLoRA.from_pretrained(args["src"])
        _say("ready")
        t0 = time.perf_counter()
        for _ in range(args.get("repeat", 1)):  # several saves, so a random kill lands in one
            tl.save_pretrained(args["target"])
    else:
        raise SystemExit(f"unknown op {op}")
    _say(f"done {time.perf_counter() - t0:.3f}")


if __name__ == "__main__":
    main()

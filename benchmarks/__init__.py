"""The measurement lab: Temporal LoRA measured against the baselines a user would try first.

It lives beside the installed package (src/temporal_lora), imports only its public names, and
nothing in the package imports it. Run a benchmark with `python -m benchmarks NAME [flags]` (or
`tlora bench NAME [flags]` from a checkout); `python -m benchmarks --list` lists them. The table of
names is benchmarks/registry.py; each named module exposes a settings dataclass (its flags) and
`run(settings) -> results`, the dict it writes as JSON. Committed results live in
benchmarks/results/, inputs in benchmarks/data/.

Modules that measure nothing on their own:

- common: budgets, the phase cache (the resume point), the machine, timing helpers
- flags: command-line flags from a settings dataclass
- baselines: the strategies compared against (sequential, multitask, merged, Arrow, MiniLM router)
- quality, routing, speed, report: the phases and the report of the comparison bench (compare)
- scaling_train, scaling_measure, scaling_report: the phases and the report of `scaling`

Every long benchmark stores each finished phase under its work folder at once, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import os
import sys


def listing() -> str:
    """One line per registered benchmark: its name and what it measures."""
    from benchmarks.registry import BENCHMARKS

    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{b.name:<{width}}  {b.description}" for b in BENCHMARKS.values())


def main(argv: list[str], prog: str = "python -m benchmarks") -> int:
    """Run the benchmark `argv[0]` with the flags `argv[1:]`; return the exit status.

    No name runs the comparison bench ("all"), as `tlora bench` does. `prog` names the command in
    usage and error lines (`tlora bench` passes its own). 0: done (or --help / --list); 2: a bad
    name or flag (argparse's message), or an error the user can fix (one line on stderr:
    `PROG NAME: error: ...`); 130: interrupted.
    """
    from benchmarks.flags import parse_settings
    from benchmarks.registry import BENCHMARKS
    from temporal_lora.errors import TemporalLoRAError

    if argv and argv[0] in ("--list", "-l"):
        print(listing())
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {prog} NAME [flags] | --list   ({prog} NAME --help: its flags)\n\n{listing()}")
        return 0
    name, flags = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("all", list(argv))
    bench = BENCHMARKS.get(name)
    if bench is None:
        print(f"{prog}: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    # As `tlora` does: no model hub at run time, quieter library logs.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    module = bench.load()
    try:
        settings = parse_settings(bench.settings_type, flags, prog=f"{prog} {name}",
                                  description=module.__doc__ or bench.description)
    except SystemExit as stop:  # --help, or argparse's own message for a bad flag
        return stop.code if isinstance(stop.code, int) else 2
    try:
        module.run(settings)
    except TemporalLoRAError as exc:
        print(f"{prog} {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {name}: interrupted", file=sys.stderr)
        return 130
    return 0

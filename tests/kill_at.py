"""Run a command as `python -m MODULE ARGS...` (or `python -c CODE ARGS...`) would, but SIGKILL
the process at an exact moment, as `kill -9` would: just before (with --after, just after) the
Nth call of TARGET whose path-like arguments contain MATCH. The tests of interrupted commands
use it (tests/conftest.py: `killed`).

    python tests/kill_at.py TARGET N [--match TEXT] [--after] -m MODULE ARGS...
    python tests/kill_at.py os.replace 1 --match summary.json -m uncurl.train --profile smoke ...

TARGET is a dotted name: a module's function (`torch.save`, `os.replace`) or a class's method
(`uncurl.study.cache.Cache.put`), looked up where the command calls it.
"""

import argparse
import importlib
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's uncurl, as -m would


def resolve(dotted: str):
    """(object holding the attribute, attribute name) for a dotted name."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise SystemExit(f"kill_at: cannot import {dotted}")


def arm(target: str, nth: int, match: str, after: bool) -> None:
    owner, name = resolve(target)
    original = getattr(owner, name)
    calls = 0

    def killing(*args, **kwargs):
        nonlocal calls
        paths = " ".join(
            str(a) for a in (*args, *kwargs.values()) if isinstance(a, str | os.PathLike)
        )
        calls += match in paths
        if calls == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == nth and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, killing)


def main() -> None:
    argv = sys.argv[1:]
    at = next(i for i, a in enumerate(argv) if a in ("-m", "-c"))  # what follows is the command's
    p = argparse.ArgumentParser(prog="kill_at.py")
    p.add_argument("target")
    p.add_argument("nth", type=int)
    p.add_argument("--match", default="")
    p.add_argument("--after", action="store_true")
    args = p.parse_args(argv[:at])
    arm(args.target, args.nth, args.match, args.after)
    how, what, *rest = argv[at:]
    if how == "-m":
        sys.argv = [what, *rest]
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()

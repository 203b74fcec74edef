import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from uncurl import data
from uncurl.config import get_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke profile's data (a few KB of real text shipped in tests/fixtures), prepared once."""
    spec = get_profile("smoke").data
    out = tmp_path_factory.mktemp("data") / "smoke"
    return data.prepare(out, source=str(ROOT / spec["source"]), vocab_size=spec["vocab_size"])


@pytest.fixture
def one_thread():
    """One torch thread: the tests' matrices are tiny, and more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def standin_sweep() -> pd.DataFrame:
    """Made-up numbers in the premise sweep's format, for tests only."""
    rows = []
    for i, (variant, seed) in enumerate([("A: wide", 0), ("B: small", 0), ("B, seed 1", 1)]):
        for n, loss in ((1, 4.5 + 0.1 * i), (16, 4.6 + 0.12 * i)):
            rows.append(
                {
                    "variant": variant,
                    "n_expert": n,
                    "seed": seed,
                    "n_embd": 128 if variant.startswith("A") else 64,
                    "vocab_size": 2048,
                    "router_init_std": 0.02 if variant.startswith("A") else 0.3,
                    "steps": 500,
                    "tokens": 1000,
                    "val_loss": loss,
                    "wall_time_s": 100.0,
                    "total_params": 10 * n,
                    "active_params": 10,
                    "git": "x",
                    "run": f"runs/{i}/{n}",
                }
            )
    return pd.DataFrame(rows)


KILL_AT = Path(__file__).with_name("kill_at.py")


def killed(target: str, nth: int, command: list[str], match: str = "", after: bool = False):
    """Run `command` (["-m", module, *args] or ["-c", code, *args]) SIGKILLed at the `nth` call
    of `target` whose path arguments contain `match` (tests/kill_at.py)."""
    sigkilled([str(KILL_AT), target, str(nth), "--match", match, *["--after"] * after, *command])


def sigkilled(argv: list[str]) -> None:
    """Run python with `argv` from the repository root; fails unless it died of SIGKILL."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, (
        f"not killed where it should be:\n{done.stderr[-3000:]}"
    )


def one_line_error(capsys, main, argv: list[str], prog: str) -> str:
    """The error a command line (`main`) refuses `argv` with; fails unless it is one line, after
    `prog: error: `, with exit status 1 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err

"""What produced a result: code version, packages, machine. Every result file carries this."""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from uncurl.model import kernels

PACKAGES = ("torch", "transformers", "tokenizers", "deepspeed", "numpy", "pandas", "scikit-learn")


def git_revision() -> str:
    """HEAD's commit, with '+dirty' when the working tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        rev = run("rev-parse", "HEAD")
        return rev + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def environment() -> dict:
    return {
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "moe_kernels": kernels.backend(),
        "load_avg_1m": os.getloadavg()[0],
        "packages": package_versions(),
    }

from pathlib import Path

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

from pathlib import Path

import pytest

from uncurl import data
from uncurl.config import get_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke profile's data (a few KB of real text shipped in tests/fixtures), prepared once."""
    spec = get_profile("smoke").data
    out = tmp_path_factory.mktemp("data") / "smoke"
    return data.prepare(out, source=str(ROOT / spec["source"]), vocab_size=spec["vocab_size"])

import platform
import resource

import pytest
import torch

from uncurl import cpu

MiB = 1 << 20


def _page_faults_touching(n_bytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n_bytes // 4).fill_(1.0)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_faulting_it_back_in():
    assert cpu.keep_freed_memory()
    _page_faults_touching(64 * MiB)  # may grow the heap
    pages = 64 * MiB // 4096
    assert _page_faults_touching(64 * MiB) < pages // 20

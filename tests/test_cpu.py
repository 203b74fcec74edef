import platform
import resource

import pytest
import torch

from uncurl import cpu

SIZES_MIB = (4, 16, 8, 16, 4, 12)  # a step's activations, held together then freed


def _page_faults_of_a_step() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(mib << 18) for mib in SIZES_MIB]  # float32: 4 bytes each
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_steps_reuse_freed_memory_without_page_faults():
    # without the setting, a process that has loaded transformers and matplotlib (as this test
    # session has) faults about half of every step's pages back in, step after step
    assert cpu.keep_freed_memory()
    for _ in range(8):
        _page_faults_of_a_step()
    pages = sum(SIZES_MIB) * (1 << 20) // resource.getpagesize()
    assert max(_page_faults_of_a_step() for _ in range(3)) < pages // 20

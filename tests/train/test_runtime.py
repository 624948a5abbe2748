"""train/runtime.py: the CPU allocator tuning (devices, precision and RNG are tested with the trainer)."""

import platform
import subprocess
import sys

import pytest

from flowtrain.train import runtime

PROBE = """
import resource, sys, torch
from flowtrain.train import runtime
if sys.argv[1] == "tuned":
    runtime.tune_cpu_allocator()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.empty(48 << 20, dtype=torch.uint8)  # above glibc's largest own mmap threshold (32 MiB)
        x.fill_(1)  # touches every page
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(min(faults() for _ in range(4)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_tuned_allocator_reuses_freed_tensor_memory_without_page_faults():
    """Untuned, every fresh 48 MiB tensor is mapped anew (~12k page faults each); tuned, freed memory is reused."""

    def faults(kind: str) -> int:
        run = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, check=True)
        return int(run.stdout)

    faults = {kind: faults(kind) for kind in ("default", "tuned")}
    assert faults["default"] > 5 * 10_000 and faults["tuned"] < 1_000, faults
    described = runtime.tune_cpu_allocator()
    assert described.startswith("glibc malloc: mmap threshold 256 MiB") and runtime.allocator() == described

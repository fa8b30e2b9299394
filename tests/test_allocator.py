"""attnzoo.allocator.tune_malloc: afterwards, multi-MB temporaries reuse the heap instead of fresh mmaps."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.allocator import tune_malloc


def _huge_pages_always() -> bool:
    """With transparent huge pages always on, a fresh mapping faults per 2 MiB, not per 4 KiB page."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def _faults_of_reused_temporaries(numel: int, warmup: int = 10, repeats: int = 10) -> int:
    for _ in range(warmup):  # the heap settles after a few
        torch.empty(numel).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.empty(numel).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(
    "mebibytes",
    [8, 64],  # above glibc's default mmap threshold (128 KiB); 64 is above its 32 MiB cap on the threshold
)
def test_repeated_temporaries_stop_page_faulting(mebibytes: int):
    assert tune_malloc() is True
    faults = _faults_of_reused_temporaries(mebibytes * 2**18)
    pages = 10 * mebibytes * 256  # untuned, each fresh mapping is faulted in page by page (4 KiB pages)
    assert faults < pages / 20, f"{faults} page faults for ten reused {mebibytes} MiB temporaries"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(_huge_pages_always(), reason="fault counts of fresh mappings are per huge page")
def test_large_blocks_are_mapped_again_when_asked():
    # A fresh process: in this one, an earlier tune_malloc() may have left a free 64 MiB chunk in the heap, which
    # glibc reuses before it considers a fresh mapping, whatever the mmap limit says now.
    script = (
        "import sys; sys.path[:0] = [sys.argv[1]]; "
        "from attnzoo.allocator import tune_malloc; from test_allocator import _faults_of_reused_temporaries; "
        "assert tune_malloc(large_blocks_from_heap=False); "
        "print(_faults_of_reused_temporaries(64 * 2**18, warmup=2, repeats=4))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True, check=True
    )
    faults = int(out.stdout.split()[-1])
    assert faults > 4 * 64 * 256 / 2  # each 64 MiB block is a fresh mapping again, faulted in page by page

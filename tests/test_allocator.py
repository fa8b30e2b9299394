"""attnzoo.allocator.tune_malloc: afterwards, multi-MB temporaries reuse the heap instead of fresh mmaps."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from attnzoo.allocator import tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_temporaries_stop_page_faulting():
    assert tune_malloc() is True
    for _ in range(20):  # 8 MiB each, above glibc's default mmap threshold (128 KiB); the heap settles after a few
        torch.empty(2**21).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(2**21).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # untuned, each fresh 8 MiB mapping is faulted in page by page: about 10 x 2048 faults
    assert faults < 1000, f"{faults} page faults for ten reused 8 MiB temporaries"

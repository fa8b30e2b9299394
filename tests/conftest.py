"""Test-session setup shared by every test file."""

import os

import torch

# Triton kernels run on this CPU-only machine through the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# two cores: more threads than cores only adds contention in small-tensor tests
torch.set_num_threads(min(2, os.cpu_count() or 1))

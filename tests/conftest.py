"""Shared fixtures: every kernel output buffer starts as NaN, so unwritten elements fail a test.

``kvslim.kernels.launch.empty`` allocates the outputs *and* the fp32 split-KV partials of both
decode kernels; here it fills them with NaN (outputs passed in by a test are poisoned by the
test itself). The fixture is autouse: it costs one fill per launch.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def nan_poisoned_kernel_outputs(monkeypatch):
    from kvslim.kernels import launch

    def poisoned(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty", poisoned)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP oversubscription
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

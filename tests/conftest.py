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


@pytest.fixture
def convert_kwargs(monkeypatch):
    """What ``kvslim convert`` passes to ``convert_checkpoint``: a dict filled by a stand-in that then stops the
    command (``main`` returns 2), so CLI flags are checked without converting anything."""
    got = {}

    def fake(**kw):
        got.update(kw)
        raise ValueError("stop")

    monkeypatch.setattr("kvslim.convert.convert_checkpoint", fake)
    return got

"""Test-wide set-up.

* On a machine without CUDA, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be set
  before triton is first imported, so it is set here, at collection time.
* ``poison_empty``: kernel tests fill ``torch.empty*`` allocations with NaN so an output element a kernel forgot
  to write fails loudly instead of passing by luck.
"""

import os

# Must happen before triton is first imported (triton reads it at import time).
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poison_empty(monkeypatch):
    """Make every ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` float allocation NaN-filled."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _poison(t):
        if t.is_floating_point():
            with torch.no_grad():  # torch 2.11's checkpoint allocates leaves that require grad with torch.empty
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""Model tests use tiny tensors: one intra-op thread is faster than two fighting over a shared 2-core machine
(measured under load: ~0.5 ms vs ~100 ms per forward). Runs after the root conftest's `_two_threads`, which
sets the thread count again before every test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread(_two_threads):
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models

import pytest  # noqa: E402

from flowtrain import kernels  # noqa: E402


@pytest.fixture(params=["kernels", "torch"])
def reductions(request, monkeypatch):
    """Run a test on both paths of the microscope: the fused CPU kernels and torch's reductions."""
    if request.param == "torch":
        monkeypatch.setenv("FLOWTRAIN_KERNELS", "0")
    kernels.reset()
    yield request.param
    kernels.reset()

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models

import pytest  # noqa: E402

from flowtrain import kernels  # noqa: E402


@pytest.fixture(params=["kernels", "python-hooks", "torch"])
def reductions(request, monkeypatch):
    """Run a test on every path of the microscope: the fused CPU kernels with the C++ hooks (the default), the
    kernels with the Python hooks (FLOWTRAIN_NATIVE_HOOKS=0), and torch's reductions (FLOWTRAIN_KERNELS=0)."""
    if request.param == "torch":
        monkeypatch.setenv("FLOWTRAIN_KERNELS", "0")
    if request.param == "python-hooks":
        monkeypatch.setenv("FLOWTRAIN_NATIVE_HOOKS", "0")
    kernels.reset()
    yield request.param
    kernels.reset()

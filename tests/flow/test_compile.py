"""The microscope under torch.compile on the CPU: its hooks are run, not traced, so the compiled model is not
recompiled step after step, and the records equal those of the same model run eagerly.

(The backend is aot_eager: which hooks dynamo traces does not depend on the backend, and it needs no C++
build. Inductor on a GPU is covered by tests/train/test_cuda.py.)"""

import copy

import pytest
import torch
from torch.nn import functional as F

from flowtrain.flow import FlowConfig, FlowMonitor
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT

dynamo = pytest.importorskip("torch._dynamo")


def test_compiled_model_keeps_its_graphs_and_matches_eager():
    dynamo.reset()
    dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17))
    eager = copy.deepcopy(model)
    monitors = [FlowMonitor(m, None, FlowConfig(interval=1)) for m in (model, eager)]
    runs = [torch.compile(model, backend="aot_eager"), eager]
    graphs = []
    for step in range(4):
        idx = torch.randint(0, 17, (3, 8))
        records = []
        for run, monitor in zip(runs, monitors, strict=True):
            F.cross_entropy(run(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
            monitor.after_backward()
            monitor.after_step()
            records.append(monitor.collect(step))
            run.zero_grad(set_to_none=True)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
        compiled, reference = records
        for stat in ("resid_grad_norm", "act_rms", "act_max_abs", "attn_entropy"):
            assert compiled.depth(stat) == pytest.approx(reference.depth(stat), rel=1e-5, nan_ok=True), stat
        assert compiled.scalars["logits_lse_mean"] == pytest.approx(reference.scalars["logits_lse_mean"], rel=1e-6)
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs  # compiled in the first step, never again
    for monitor in monitors:
        monitor.remove()


def test_hooks_a_compiled_graph_never_calls_are_named_not_reported_as_nan():
    """Compiled first on a step between monitored ones, a graph never calls the hooks attached later (dynamo does
    not guard on them): the monitor warns once and names the statistics unavailable, with the fix, instead of
    recording NaN; once a monitored step runs the eager module again, they are measured again."""
    from flowtrain.errors import NotAvailable

    dynamo.reset()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17))
    monitor = FlowMonitor(model, None, FlowConfig(interval=2), start_step=1)  # step 1 unmonitored, 2 monitored
    compiled = torch.compile(model, backend="aot_eager")

    def step(run, number):
        idx = torch.randint(0, 17, (3, 8))
        F.cross_entropy(run(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        monitor.after_backward()
        monitor.after_step()
        model.zero_grad(set_to_none=True)
        return monitor.collect(number)

    step(compiled, 1)
    with pytest.warns(UserWarning, match="forward hooks were not called.*torch.compile"):
        record = step(compiled, 2)
    with pytest.raises(NotAvailable, match="run the uncompiled module on monitored steps"):
        record.depth("resid_grad_norm")
    assert "logits_lse_mean" in record.unavailable and "act_rms" in record.unavailable
    step(compiled, 3)
    record = step(model, 4)  # the eager module on a monitored step: the hooks are called
    assert all(v > 0 for v in record.depth("resid_grad_norm")) and record.scalars["logits_lse_mean"] > 0
    assert "resid_grad_norm" not in monitor.unavailable
    monitor.remove()

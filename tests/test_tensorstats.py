"""tensorstats vs plain per-tensor torch reductions (float64 references)."""

import math

import torch

from flowtrain import tensorstats as ts


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=g), torch.randn(3, generator=g) * 100, torch.randn(2, 3, 4, generator=g)]


def _close(a, b, rel=1e-6):
    assert torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=rel, atol=0)


def test_norms_maxima_sums_match_reference():
    xs = _tensors()
    ref_sq = [float((x.double() ** 2).sum()) for x in xs]
    _close(ts.sums_of_squares(xs), ref_sq)
    _close(ts.l2_norms(xs), [math.sqrt(v) for v in ref_sq])
    _close(ts.global_l2_norm(xs), math.sqrt(sum(ref_sq)))
    _close(ts.max_abs(xs), [float(x.abs().max()) for x in xs])
    _close(ts.rms(xs), [math.sqrt(s / x.numel()) for s, x in zip(ref_sq, xs, strict=True)])
    _close(ts.sums(xs), [float(x.double().sum()) for x in xs])
    _close(ts.sum_of_squares(xs[2]), ref_sq[2])
    _close(ts.max_abs_one(xs[2]), float(xs[2].abs().max()))


def test_nonfinite_counts_and_propagation():
    xs = _tensors()
    xs[0][1, 2] = float("nan")
    xs[2][0, 0, 0] = float("inf")
    xs[2][1, 1, 1] = float("-inf")
    assert ts.nonfinite_counts(xs).tolist() == [1.0, 0.0, 2.0]
    assert not torch.isfinite(ts.global_l2_norm(xs))


def test_batched_nonfinite_counts_of_the_accelerator_path(monkeypatch):
    """The accelerators' batched count (one concatenation for small tensors, one by one above BATCH_NUMEL),
    run here on CPU tensors: every size class, an empty tensor, bfloat16, NaN and both infinities."""
    monkeypatch.setattr(ts, "BATCH_NUMEL", 50)
    g = torch.Generator().manual_seed(1)
    xs = [
        torch.randn(7, 5, generator=g),
        torch.zeros(0),
        torch.randn(30, generator=g).bfloat16(),
        torch.randn(20, 20, generator=g),  # above the (patched) batch size: counted on its own
        torch.randn(3, generator=g),
    ]
    xs[0][1, 2] = float("nan")
    xs[2][4] = float("inf")
    xs[3][5, 5] = float("-inf")
    xs[3][6, 6] = float("nan")
    expected = [float((~torch.isfinite(x)).sum()) for x in xs]
    assert expected == [1.0, 0.0, 1.0, 2.0, 0.0]
    assert ts._nonfinite_batched(xs).tolist() == expected


def test_empty_lists_give_empty_vectors():
    assert ts.sums_of_squares([]).shape == (0,)
    assert ts.max_abs([]).shape == (0,)
    assert ts.sums([]).shape == (0,)
    assert ts.nonfinite_counts([]).shape == (0,)
    assert float(ts.global_l2_norm([])) == 0.0


def test_single_tensor_helpers_and_nan_in_max():
    x = torch.tensor([[1.0, -5.0], [2.0, 3.0]])
    assert float(ts.sum_of_squares(x)) == 39.0
    assert ts.max_abs([x, torch.zeros(0)]).tolist() == [5.0, 0.0]
    x[0, 0] = float("nan")
    assert torch.isnan(ts.max_abs([x]))[0]

"""flowtrain.kernels (the fused CPU reductions) vs float64 torch references, and its torch fallback."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtrain import kernels, tensorstats
from flowtrain.flow.hooks import kernel_attention_stats

REL = 1e-6
CHUNK = 1 << 14  # flowstats.cpp's unit of work: sizes around it cross the chunk boundaries
SIZES = [0, 1, 15, 16, 255, 256, 257, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 77]


@pytest.fixture(autouse=True, scope="module", params=["extension", "ctypes"])
def built(request):
    """Every test runs on both bindings: the CPython extension, and ctypes (what a Python without headers gets)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "ctypes":
            mp.setattr(kernels, "_python_include", lambda: None)
        elif kernels._python_include() is None:
            pytest.skip("this Python has no C headers: the extension binding cannot be built")
        kernels.reset()
        assert kernels.library() is not None, f"the kernels did not build here: {kernels.build_error}"
        assert kernels.binding == request.param
        yield request.param
    kernels.reset()


def tensors_of(sizes, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * scale for n in sizes]


def close(actual, expected, rel=REL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=rel)


def test_sums_of_squares_maxima_sums_match_float64_across_chunk_boundaries():
    xs = tensors_of(SIZES)
    sq, mx = kernels.sumsq_maxabs(xs)
    close(sq, [float((x.double() ** 2).sum()) for x in xs])
    close(mx, [float(x.abs().max()) if x.numel() else 0.0 for x in xs], rel=0)
    close(kernels.sums(xs), [float(x.double().sum()) for x in xs], rel=1e-5)  # signed sums cancel
    assert kernels.nonfinite(xs).tolist() == [0] * len(xs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_sums_of_squares_and_maxima_property(sizes, seed):
    xs = tensors_of(sizes, seed)
    sq, mx = kernels.sumsq_maxabs(xs)
    close(sq, [float((x.double() ** 2).sum()) for x in xs])
    close(mx, [float(x.abs().max()) if x.numel() else 0.0 for x in xs], rel=0)


def test_nan_and_inf_are_seen():
    xs = tensors_of([300, 300, 300, CHUNK + 5])
    xs[0][7] = float("nan")
    xs[1][299] = float("inf")
    xs[2][0] = -float("inf")
    xs[3][CHUNK + 2] = float("nan")
    xs[3][3] = float("inf")
    sq, mx = kernels.sumsq_maxabs(xs)
    assert math.isnan(sq[0]) and math.isnan(mx[0])  # NaN propagates to the max, as torch's max does
    assert sq[1] == math.inf and mx[1] == math.inf and sq[2] == math.inf and mx[2] == math.inf
    assert math.isnan(sq[3]) and math.isnan(mx[3])
    assert kernels.nonfinite(xs).tolist() == [1, 1, 1, 2]
    assert tensorstats.nonfinite_counts(xs).tolist() == [1, 1, 1, 2]


def test_results_do_not_depend_on_the_thread_count():
    xs = tensors_of([3 * CHUNK + 11, 5000, 2 * CHUNK])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.sumsq_maxabs(xs)
        torch.set_num_threads(2)
        two = kernels.sumsq_maxabs(xs)
    finally:
        torch.set_num_threads(before)
    assert one[0].tobytes() == two[0].tobytes() and one[1].tobytes() == two[1].tobytes()


def test_weights_pass_copies_and_update_pass_measures_the_difference():
    w = tensors_of([257, CHUNK + 3, 10])
    numels = np.array([t.numel() for t in w], dtype=np.int64)
    snap = [torch.empty_like(t) for t in w]
    close(kernels.weights(w, snap, numels), [float((t.double() ** 2).sum()) for t in w])
    assert all(torch.equal(a, b) for a, b in zip(w, snap, strict=True))
    close(kernels.weights(w, None, numels), [float((t.double() ** 2).sum()) for t in w])

    before = [t.clone() for t in w]
    for t in w:
        t.add_(torch.randn_like(t) * 1e-3)  # a small step, as an optimizer takes
    v = [torch.rand_like(w[0]), None, torch.rand_like(w[2])]
    out = kernels.update(w, snap, v, numels, copy=False)
    close(out[:, 0], [float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(w, before, strict=True)])
    close(out[:, 1], [float((t.double() ** 2).sum()) for t in w])
    close(out[:, 2], [float(v[0].double().sum()), 0.0, float(v[2].double().sum())])
    assert all(torch.equal(a, b) for a, b in zip(before, snap, strict=True))  # copy=False: snapshot kept
    out = kernels.update(w, snap, None, numels, copy=True)
    assert all(torch.equal(a, b) for a, b in zip(w, snap, strict=True))
    assert out[:, 2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("reader", ["extension", "c++ hooks"])
def test_gradients_found_checked_and_reduced_in_one_call(reader, monkeypatch):
    """Both readers of the gradients (flowbind.cpp through Python attributes, flowhooks.cpp through at::Tensor)
    give the kernel's numbers and refuse the same tensors."""
    if reader == "c++ hooks" and kernels.hooks() is None:
        pytest.skip(f"no C++ hooks here: {kernels.hooks_error}")
    if reader == "extension":
        monkeypatch.setattr(kernels, "_hooks", None)
    params = [torch.nn.Parameter(t) for t in tensors_of([5, CHUNK + 3, 64])]
    assert kernels.grad_sumsq_maxabs(params) is None  # no gradients yet
    for p in params:
        p.grad = torch.randn_like(p) * 2
    params[1].grad[7] = float("nan")
    sq, mx, sq32, finite = kernels.grad_sumsq_maxabs(params)
    assert sq32.dtype == torch.float32
    expect_sq, expect_mx = kernels.sumsq_maxabs([p.grad for p in params])
    assert not finite and math.isnan(sq[1]) and math.isnan(expect_sq[1]) and math.isnan(mx[1])
    assert sq.tolist()[::2] == expect_sq.tolist()[::2] and mx.tolist()[::2] == expect_mx.tolist()[::2]
    assert sq32.tolist()[::2] == torch.from_numpy(expect_sq).float().tolist()[::2]
    params[1].grad[7] = 1.0
    assert kernels.grad_sumsq_maxabs(params)[3]  # all finite
    double = torch.nn.Parameter(torch.randn(64, dtype=torch.float64))
    double.grad = torch.randn_like(double)
    assert kernels.grad_sumsq_maxabs([*params[:2], double]) is None  # not float32
    for odd in (torch.randn(128)[::2], None):  # not contiguous, missing
        kept, params[2].grad = params[2].grad, odd
        assert kernels.grad_sumsq_maxabs(params) is None
        params[2].grad = kept


def test_single_tensor_and_logits_calls():
    x = torch.randn(12, 64, 128)
    sq, mx = kernels.one(x)
    close(sq, float((x.double() ** 2).sum()))
    assert mx == float(x.abs().max())
    y = torch.randn(3, 1000)
    y[1, 7] = float("nan")
    both = kernels.two(x, y)  # one call, the same numbers as one() of each (NaN where the tensor has one)
    assert both[:2] == (sq, mx) and all(math.isnan(v) for v in both[2:])
    assert kernels.two(y[0], x) == (*kernels.one(y[0]), sq, mx)
    z = torch.randn(5, 7, 65) * 4
    z[0, 0, 3] = 30.0  # a dominant logit
    mx, lse, rows = kernels.logits(z)
    assert rows == 35 and mx == float(z.abs().max())
    close(lse, float(torch.logsumexp(z.double(), -1).sum()))
    z[1, 1, 1] = float("nan")
    mx, lse, _ = kernels.logits(z)
    assert math.isnan(lse) and math.isnan(mx)


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 64, 65, 1000])
def test_logits_of_every_row_length_match_float64(vocab):
    """Rows of whole vectors, a ragged end read from the next row, and the last row's padded end."""
    z = torch.randn(3, 5, vocab, generator=torch.Generator().manual_seed(vocab)) * 6
    mx, lse, rows = kernels.logits(z)
    assert rows == 15 and mx == float(z.abs().max())
    close(lse, float(torch.logsumexp(z.double(), -1).sum()))
    mx, lse, _ = kernels.logits(z[-1:, -1:])  # one row: the end of the tensor
    close(lse, float(torch.logsumexp(z[-1, -1].double(), -1)))
    many = torch.randn(4, 500, vocab, generator=torch.Generator().manual_seed(1))  # logs of products of many rows
    close(kernels.logits(many)[1], float(torch.logsumexp(many.double(), -1).sum()))


@pytest.mark.parametrize(
    ("t", "s", "d", "causal"), [(64, 64, 32, True), (9, 9, 12, True), (8, 20, 16, True), (7, 7, 8, False)]
)
def test_attention_sample_matches_the_torch_recomputation(t, s, d, causal):
    g = torch.Generator().manual_seed(t + d)
    qkv = torch.randn(3, t, 4, 3 * d, generator=g)  # a strided view, as a model's split of qkv gives
    q = qkv[..., :d].transpose(1, 2)
    k = torch.randn(3, 4, s, d, generator=g) * 2
    rows = torch.linspace(0, t - 1, min(16, t)).round().long()
    keys = torch.arange(s)
    allowed = (keys[None, :] <= rows[:, None] + (s - t)) if causal else torch.ones(len(rows), s, dtype=torch.bool)
    for nb, nh in ((1, 4), (2, 3)):
        ref = kernel_attention_stats([(q[:nb, :nh].double().index_select(-2, rows), k[:nb, :nh].double(), allowed)])
        got = kernels.attention([q, q], [k, k], nb, nh, rows.numpy(), causal)
        close(got[0], ref[0].tolist(), rel=1e-5)
        close(got[1], ref[0].tolist(), rel=1e-5)
    assert kernels.attention_takes(q, k) and not kernels.attention_takes(q.double(), k.double())


def test_attention_of_kernel_calls_checks_and_reads_them_in_one_call():
    """attention_of: the argument tuples an attention kernel got (one per block), the same numbers as
    attention(); anything it cannot take whole (a mask, mixed shapes or causality, a double) gives None."""
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(2, 4, 10, 3 * 8, generator=g) for _ in range(3)]
    calls = [(x[..., :8], x[..., 8:16], x[..., 16:], None, 0.0, True) for x in qkv]  # strided views
    rows = torch.linspace(0, 9, 5).round().long().numpy()
    got = kernels.attention_of(calls, 1, 3, rows)
    expect = kernels.attention([c[0] for c in calls], [c[1] for c in calls], 1, 3, rows, True)
    assert type(got) is list and all(type(v) is float for pair in got for v in pair)
    assert got == expect.tolist()
    assert (
        kernels.attention_of(calls[:2], 5, 9, rows)
        == kernels.attention([c[0] for c in calls[:2]], [c[1] for c in calls[:2]], 5, 9, rows, True).tolist()
    )  # more sequences and heads asked than there are: all of them
    q, k, v = calls[0][:3]
    refused = [
        [*calls[:2], (q, k, v, torch.ones(10, 10, dtype=torch.bool), 0.0, False)],  # a mask
        [*calls[:2], (q, k, v, None, 0.0, False)],  # causal and not
        [*calls[:2], (q[:, :, :5], k[:, :, :5], v, None, 0.0, True)],  # another shape
        [(q.double(), k.double(), v, None, 0.0, True)],
        [(q[..., 0], k[..., 0], v, None, 0.0, True)],  # 3 dimensions
        [(q.transpose(-1, -2), k.transpose(-1, -2), v, None, 0.0, True)],  # strided last dimension
    ]
    for calls_ in refused:
        assert kernels.attention_of(calls_, 1, 3, rows) is None


def test_only_plain_cpu_float32_contiguous_tensors_take_the_kernels():
    x = torch.randn(4, 6)
    assert kernels.takes([x, torch.nn.Parameter(x.clone())])
    assert not kernels.takes([x.t()])  # strided: torch's path
    assert not kernels.takes([x.double()])
    assert not kernels.takes([x.to(torch.bfloat16)])
    assert tensorstats.sums_of_squares([x.t()]).tolist() == pytest.approx([float((x.double() ** 2).sum())], rel=REL)


def test_switched_off_everything_falls_back_to_torch_with_the_same_numbers(monkeypatch):
    xs = tensors_of([300, CHUNK + 1, 1])
    fast = (tensorstats.sums_of_squares(xs), tensorstats.max_abs(xs), tensorstats.sums(xs))
    monkeypatch.setenv("FLOWTRAIN_KERNELS", "0")
    kernels.reset()
    try:
        assert kernels.library() is None and "FLOWTRAIN_KERNELS=0" in kernels.build_error
        slow = (tensorstats.sums_of_squares(xs), tensorstats.max_abs(xs), tensorstats.sums(xs))
    finally:
        monkeypatch.delenv("FLOWTRAIN_KERNELS")
        kernels.reset()
    for a, b in zip(fast, slow, strict=True):
        close(a, b, rel=1e-5)


def test_concurrent_first_builds_into_one_cache_both_load(tmp_path):
    """Two processes (two ranks) building at once: each writes its own temporary file and renames it."""
    code = "from flowtrain import kernels; assert kernels.library() is not None, kernels.build_error; print('ok')"
    env = {**os.environ, "FLOWTRAIN_KERNEL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == b"ok" for o in outs)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith("flowstats-"), left  # no half-written temporaries left


def test_a_compiler_that_refuses_everything_leaves_the_torch_path_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # exits 1 for any flags
    monkeypatch.setenv("FLOWTRAIN_KERNEL_CACHE", str(tmp_path))
    kernels.reset()
    try:
        assert kernels.library() is None and kernels.binding is None
        assert "ctypes -O3" in kernels.build_error  # every binding and flag set was tried
        assert tensorstats.sums_of_squares([torch.ones(3)]).tolist() == [3.0]  # torch's path
    finally:
        monkeypatch.delenv("CXX")
        kernels.reset()


def test_flow_tables_totals():
    """The totals the records take from the tables kernel: ||W||, ||dW|| (NaN with updates off) and the
    non-finite gradient values, where a tensor without a gradient (NaN count) counts nothing."""
    grads = {
        "grad_sumsq": np.array([4.0, np.nan, 9.0]),
        "grad_max_abs": np.array([2.0, np.nan, 3.0]),
        "grad_nonfinite": np.array([2.0, np.nan, 1.0]),
    }
    wsq, usq, v_rms = np.array([1.0, 4.0, 20.0]), np.array([0.25, 0.0, 0.0]), np.full(3, np.nan)
    numels, order, starts = np.array([4, 2, 9], np.int64), np.arange(3, dtype=np.int64), np.zeros(1, np.int64)
    tensors, layers, totals = kernels.flow_tables(grads, wsq, usq, v_rms, numels, order, starts)
    assert totals == [5.0, 0.5, 3.0] and layers[0, 4] == 5.0 and tensors[0, 6] == 0.5
    _, _, totals = kernels.flow_tables(grads, wsq, None, v_rms, numels, order, starts)
    assert totals[0] == 5.0 and math.isnan(totals[1]) and totals[2] == 3.0

"""Each study's `--quick` run on real text: the measured direction of its key effect, and its report.

The numbers come from real tiny runs (the trainer, the microscope, the run directory); the assertions are the
textbook directions the issue names, with margins well inside what the quick settings produce.
"""

from __future__ import annotations

import json
import math

import numpy as np

from flowtrain.lab import run_study
from tests.lab.conftest import check_report

EVIL = "<b>x</b>&amp"


def test_norm_placement_post_norm_gradient_grows_toward_output(lab_data, tmp_path):
    out = tmp_path / f"np {EVIL}"  # a user's odd directory name appears on the page: escaped
    result = run_study("norm-placement", quick=True, data=lab_data, out=out)
    ratios = result.measurements["init_block_ratio"]
    assert ratios["post"] > ratios["pre"]
    assert len(result.run_dirs) == 6 and all((d / "summary.json").is_file() for d in result.run_dirs)
    check_report(result, evil_fragment=EVIL)
    saved = json.loads((result.out_dir / "verdicts.json").read_text())
    assert saved["findings"][0]["status"] == "held"


def test_residuals_vanish_without_skips(lab_data, tmp_path):
    result = run_study("residuals", quick=True, data=lab_data, out=tmp_path / "res")
    ratio = result.measurements["init_depth_ratio"]
    assert ratio["plain-no-residual"] < 1e-3  # orders of magnitude below the last block's
    assert ratio["plain-residual"] > 1e3 * ratio["plain-no-residual"]
    loss = result.measurements["final_val_loss"]
    assert loss["plain-residual"] < loss["plain-no-residual"]
    check_report(result)


def test_activations_relu_has_dead_units(lab_data, tmp_path):
    result = run_study("activations", quick=True, data=lab_data, out=tmp_path / "act")
    dead = {k: np.mean(v) for k, v in result.measurements["dead_end"].items()}
    assert dead["relu"] > 0.05
    assert dead["relu"] > dead["gelu"] and dead["relu"] > dead["swiglu"]
    assert all(v == 0 for v in result.measurements["dead_init"]["relu"])
    check_report(result)


def test_clipping_keeps_a_too_high_lr_from_diverging(lab_data, tmp_path):
    result = run_study("clipping", quick=True, data=lab_data, out=tmp_path / "clip")
    m = result.measurements
    assert m["diverged"]["no-clip"] or m["spikes"]["no-clip"] > 0
    assert not m["diverged"]["global-norm"] and math.isfinite(m["final_val_loss"]["global-norm"])
    assert m["clip_rate"]["global-norm"] > 0 and m["clip_rate"]["no-clip"] == 0
    check_report(result)


def test_warmup_shrinks_the_first_updates(lab_data, tmp_path):
    result = run_study("warmup", quick=True, data=lab_data, out=tmp_path / "warm")
    first = result.measurements["first_update_ratio"]
    assert first["no-warmup"] > 2 * first["linear"] and first["no-warmup"] > 2 * first["noam"]
    upd = result.measurements["early_update_ratio"]
    assert upd["no-warmup"] > upd["linear"] and upd["no-warmup"] > upd["noam"]
    check_report(result)


def test_init_scaled_keeps_activations_flattest(lab_data, tmp_path):
    result = run_study("init", quick=True, data=lab_data, out=tmp_path / "init")
    growth = result.measurements["act_growth"]
    assert all(growth["scaled"] < growth[k] for k in ("normal", "xavier", "he"))
    assert growth["he"] > growth["normal"]
    check_report(result)

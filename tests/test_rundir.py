"""summary.json is strict JSON: what a diverged run cannot express as a number is null, and listed."""

from __future__ import annotations

import json
import math

from flowtrain.config import load_config
from flowtrain.rundir import summary_json
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def _strict(text: str) -> dict:
    def refuse(word):
        raise AssertionError(f"non-standard JSON constant {word}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_and_are_listed():
    text = summary_json({"steps": 3, "best_val_loss": math.nan, "final_full_eval": {"val_ppl": math.inf}, "x": [1.0]})
    assert _strict(text) == {
        "steps": 3,
        "best_val_loss": None,
        "final_full_eval": {"val_ppl": None},
        "x": [1.0],
        "nonfinite": ["best_val_loss", "final_full_eval.val_ppl"],
    }
    assert "nonfinite" not in _strict(summary_json({"steps": 3, "best_val_loss": 1.5}))


def test_a_diverged_run_writes_a_summary_every_json_parser_reads(small_text, tmp_path):
    """A finite but absurd learning rate (inf is refused by the config) and no guard: the weights turn to NaN."""
    extra = {"optim.lr": 1e30, "guard.enabled": False, "train.max_steps": 6, "train.eval_interval": 3}
    summary = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **extra))).run_loop()
    saved = _strict((summary.run_dir / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["best_val_loss"] is None and "best_val_loss" in saved["nonfinite"]

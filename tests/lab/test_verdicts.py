"""The verdict rule on synthetic numbers (effect vs spread, thresholds, yes/no, divergence, missing values,
warm-up cuts, quick and few-seed studies), its error rate under no effect, and the "ended before its warm-up"
check on a real run that stops inside its LR warm-up."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowtrain.errors import ConfigError
from flowtrain.lab.common import LabContext, read_run, tiny_overrides, train_variant
from flowtrain.lab.run import _plain, study_seeds
from flowtrain.lab.study import GUARD_WARN_ONLY, ended_before_warmup
from flowtrain.lab.verdicts import (
    MIN_SEEDS,
    Finding,
    above,
    below,
    diverged_high,
    every_seed,
    fmt_seeds,
    less,
    more,
    summary,
    table,
)


def verdict(*tests, **kw) -> Finding:
    return Finding("claim", "numbers", "rule", list(tests), **kw)


def test_effect_is_the_difference_of_seed_means_and_spread_the_larger_range():
    c = more("a", [3.0, 4.0, 5.0], "b", [1.0, 1.5, 2.0])
    assert c.effect == pytest.approx(4.0 - 1.5) and c.spread == pytest.approx(2.0)  # ranges 2 and 1
    assert verdict(c).status == "holds" and verdict(c).lean == "as claimed"
    within = more("a", [3.0, 4.0, 5.0], "b", [2.0, 2.5, 3.0])  # effect 1.5 < spread 2
    assert verdict(within).status == "inconclusive" and verdict(within).lean == "within the spread"
    against = more("a", [1.0, 1.5, 2.0], "b", [3.0, 4.0, 5.0])
    assert verdict(against).status == "CONTRADICTED"
    assert less("b", [1.0, 1.5, 2.0], "a", [3.0, 4.0, 5.0]).effect == pytest.approx(2.5)  # same claim, other words
    tie = more("a", [3.0, 4.0, 5.0], "b", [1.5, 2.0, 2.5])  # effect exactly 2 = spread: not beyond it
    assert tie.effect == pytest.approx(tie.spread) and verdict(tie).status == "inconclusive"


def test_ratios_compare_in_decades_and_thresholds_have_no_range():
    ratio = [1e-7, 1e-6, 1e-5]  # two decades of spread, mean log -6
    c = below("ratio", ratio, 1e-2, log=True)
    assert c.effect == pytest.approx(4.0) and c.spread == pytest.approx(2.0)
    assert verdict(c).status == "holds"
    assert verdict(below("ratio", [1e-3, 1e-1, 10.0], 1e-2, log=True)).status == "inconclusive"
    assert verdict(above("ratio", [0.3, 0.35, 0.4], 0.5, log=True)).status == "CONTRADICTED"
    # a band: every comparison must go the claimed way, and one going the other way contradicts the claim
    band = verdict(above("r", [0.9, 1.0, 1.1], 0.5, log=True), below("r", [0.9, 1.0, 1.1], 2, log=True))
    assert band.status == "holds"
    outside = verdict(above("r", [2.5, 3.0, 3.2], 0.5, log=True), below("r", [2.5, 3.0, 3.2], 2, log=True))
    assert outside.status == "CONTRADICTED"


def test_yes_no_outcomes_need_every_seed_to_agree():
    assert verdict(every_seed("spiked", [True, True, True])).status == "holds"
    assert verdict(every_seed("spiked", [False, False, False])).status == "CONTRADICTED"
    mixed = verdict(every_seed("spiked", [True, False, True]))
    assert mixed.status == "inconclusive" and "yes in 2 of 3 seeds" in mixed.evidence


def test_diverged_and_missing_values():
    finite = [2.5, 2.6, 2.7]
    assert verdict(more("no clip", diverged_high([math.nan] * 3), "clip", finite)).status == "holds"
    assert verdict(less("clip", finite, "no clip", diverged_high([math.nan, math.inf, math.nan]))).status == "holds"
    some = more("no clip", diverged_high([math.nan, 2.4, 2.5]), "clip", finite)  # one seed diverged
    assert math.isinf(some.spread) and verdict(some).status == "inconclusive"
    both = more("a", diverged_high([math.nan] * 3), "b", diverged_high([math.nan] * 3))
    assert math.isnan(both.effect) and verdict(both).status == "inconclusive" and "not measurable" in both.text()
    missing = more("a", [1.0, math.nan, 3.0], "b", [0.0, 0.0, 0.0])
    assert verdict(missing).status == "inconclusive"


def test_claims_in_several_parts():
    good = more("a", [5.0, 5.1, 5.2], "b", [1.0, 1.1, 1.2])
    unclear = more("a", [5.0, 5.1, 5.2], "c", [4.0, 5.0, 6.0])
    bad = more("a", [5.0, 5.1, 5.2], "d", [9.0, 9.1, 9.2])
    assert verdict(good, unclear).status == "inconclusive"
    assert verdict(good, unclear, bad).status == "CONTRADICTED"


def test_quick_or_few_seeds_is_indicative_and_keeps_its_lean():
    two = verdict(more("a", [5.0, 5.1], "b", [1.0, 1.1]))
    assert two.seeds == 2 < MIN_SEEDS and two.status == "indicative" and two.label() == "indicative: as claimed"
    quick = verdict(more("a", [5.0, 5.1, 5.2, 5.3], "b", [1.0, 1.1, 1.2, 1.3]), indicative=True)
    assert quick.status == "indicative" and quick.lean == "as claimed"
    one = verdict(more("a", [1.0], "b", [2.0]))
    assert one.label() == "indicative: against the claim"
    text = table([two, quick, one], quick=True, seeds=[1337])
    assert "[indicative: as claimed]" in text and "never holds or" in text and "holds" not in text.split("[")[1]
    assert "[holds]" not in text and "[CONTRADICTED]" not in text
    data = quick.to_json()
    assert data["status"] == "indicative" and data["indicative"] is True and data["lean"] == "as claimed"


def test_not_judged_and_measured():
    cut = verdict(more("a", [5.0, 5.1, 5.2], "b", [1.0, 1.1, 1.2]), not_judged="zclip ended before its warm-up")
    assert cut.status == "not judged" and cut.lean is None and cut.evidence == "zclip ended before its warm-up"
    assert "[not judged]" in cut.line()
    reported = Finding("x", "y", "reported only")
    assert reported.status == "measured" and reported.lean is None
    line = summary([cut, reported, verdict(every_seed("s", [1, 1, 1]))], quick=False, seeds=[1, 2, 3])
    assert line == "Verdicts over 3 seeds (1, 2, 3): 1 not judged, 1 holds."
    assert "indicative only" in summary([cut], quick=False, seeds=[1, 2])


def test_the_rule_rarely_calls_an_effect_that_is_not_there():
    """Two arms from one distribution, 3 seeds each: a verdict either way in ~5% of studies (2.5% per side,
    docs/lab.md); a real 4-sigma difference is found in most."""
    rng = np.random.default_rng(0)
    n = 4000
    draws = rng.standard_normal((n, 2, 3))
    calls = [more("a", a, "b", b).sign for a, b in draws]
    false_rate = np.mean(np.abs(calls))
    assert 0.035 < false_rate < 0.065, false_rate
    found = np.mean([more("a", a + 4.0, "b", b).sign == 1 for a, b in draws])
    assert found > 0.9, found


def test_seed_formatting_and_strict_json():
    assert fmt_seeds([2.0]) == "2"
    assert fmt_seeds([1.0, 2.0, 3.0]) == "2 [1..3]"
    assert fmt_seeds([1e-6, 1e-4, 1e-2], log=True) == "1.00e-04 [1.00e-06..0.01]"
    assert fmt_seeds([0.0, 0.0, 0.0], percent=True) == "0% in every seed"
    assert fmt_seeds([math.inf, 2.0, 2.5]) == "seeds inf, 2, 2.5"
    data = _plain({"loss": np.array([math.inf, math.nan, 1.5]), "n": 3})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"loss": ["inf", "nan", 1.5], "n": 3}


def test_study_seeds():
    assert study_seeds(None, quick=False) == [1337, 1338, 1339]
    assert study_seeds(None, quick=True) == [1337]
    assert study_seeds(5, quick=True) == [1337 + i for i in range(5)]
    assert study_seeds([7, 3], quick=False) == [7, 3]
    for bad in (0, [], [1, 1], ["x"], True):
        with pytest.raises(ConfigError):
            study_seeds(bad, quick=False)


def test_a_run_that_ends_inside_its_warmup_is_not_judged(lab_data, tmp_path):
    """A real run that diverges inside its 10-step LR warm-up (SGD at a peak LR of 1e4, no clipping, the guard
    only warning): a claim about its schedule is not judged."""
    ctx = LabContext(out_dir=tmp_path, data=lab_data)
    settings = {
        **GUARD_WARN_ONLY,
        "model__n_layer": 1,
        "model__n_embd": 16,
        "model__block_size": 16,
        "train__batch_size": 2,
        "train__max_steps": 12,
        "train__eval_interval": 12,
        "optim__name": "sgd",
        "optim__lr": 1e4,
        "clip__kind": "off",
        "schedule__warmup_steps": 10,
    }
    record = read_run(train_variant(ctx, "diverges", tiny_overrides(ctx, **settings)))
    trained = record.steps_trained()
    assert trained < 10 and not np.isfinite(record.series("loss")[trained])  # the next step's loss is non-finite
    why = ended_before_warmup("linear", [1337], [record], 10)
    assert why is not None and "warm-up of 10 steps" in why and f"seed 1337 after {trained}" in why
    assert ended_before_warmup("linear", [1337], [record], trained) is None
    assert verdict(every_seed("x", [1, 1, 1]), not_judged=why).status == "not judged"


def test_divergence_ends_the_steps_trained(tmp_path):
    """steps_trained stops at the first non-finite loss; ZClip's count is of finite gradient norms."""
    from flowtrain.sinks.jsonl import JsonlSink

    sink = JsonlSink(tmp_path / "metrics.jsonl")
    for step in range(1, 11):
        bad = step >= 7
        sink.write(step, {"loss": math.nan if bad else 3.0, "grad_norm_preclip": math.inf if bad else 1.0})
    sink.close()
    record = read_run(tmp_path)
    assert record.steps_trained() == 6 and record.finite_grad_norms() == 6
    why = ended_before_warmup("ZClip", [1], [record], 25, finite_norms=True)
    assert why is not None and "25 finite gradient norms" in why and "seed 1 after 6" in why

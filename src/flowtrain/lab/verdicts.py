"""Findings: a textbook claim, the numbers measured over several seeds, and a verdict that carries its uncertainty.

Nothing here is pre-written about the outcome: a study builds each Finding from its measurements as a list of
comparisons, and the rule below turns them into a verdict (docs/lab.md, "How a verdict is decided"):

* A comparison claims `a > b`. Each arm has one number per seed (a threshold is one number, range 0).
  effect = mean(a) - mean(b) over the seeds; spread = the larger of the two arms' seed ranges (max - min).
  It goes the claimed way when effect > spread, the other way when effect < -spread, else it is within the
  spread. Ratios that span orders of magnitude are compared as log10 values (effect and spread in decades).
  A per-seed yes/no outcome is the number 1/0 against the threshold 0.5: decisive only when every seed agrees.
* holds: every comparison of the claim goes the claimed way, measured on >= MIN_SEEDS seeds at full scale.
  CONTRADICTED: at least one goes the other way (same conditions). inconclusive: anything else.
* indicative: a --quick run or fewer than MIN_SEEDS seeds; the same computation, reported only as a lean.
* not judged: a run the claim is about ended before the method's own warm-up, so it never acted.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import numpy as np

MIN_SEEDS = 3  # at 3 seeds the rule calls a verdict on no true effect ~5% of the time (docs/lab.md)

RULE = (
    "Each claim is a set of comparisons 'a > b' measured once per seed. effect = mean(a) - mean(b) over the "
    "seeds; spread = the larger of the two arms' seed ranges (max - min); ratios are compared as log10 values. "
    "holds: every comparison has effect > spread; CONTRADICTED: one has effect < -spread; otherwise inconclusive "
    f"at this scale. Only a full study with at least {MIN_SEEDS} seeds can hold or contradict: a --quick study or "
    "fewer seeds is indicative (the same computation, reported as a lean). A claim about a method whose run ended "
    "before the method's own warm-up is not judged."
)


def _as_array(values) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def seed_range(x: np.ndarray) -> float:
    """max - min over seeds; 0 for one seed or identical values (also all +inf: every seed diverged alike)."""
    if len(x) <= 1 or bool(np.all(x == x[0])):
        return 0.0
    return float(np.max(x) - np.min(x))  # inf when finite and infinite outcomes mix


@dataclass
class Arm:
    label: str
    values: np.ndarray  # one number per seed

    def __post_init__(self) -> None:
        self.values = _as_array(self.values)


@dataclass
class Comparison:
    """The claim `a > b`, judged by the effect (difference of seed means) against the spread (seed ranges)."""

    a: Arm
    b: Arm
    log: bool = False  # compare log10 values: effect and spread in decades
    yes_no: bool = False  # a is a per-seed 1/0 outcome, b the threshold 0.5

    def _x(self, arm: Arm) -> np.ndarray:
        if not self.log:
            return arm.values
        v = arm.values
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.where(v == 0, -np.inf, np.nan))

    @property
    def seeds(self) -> int:
        return max(len(self.a.values), len(self.b.values))

    @property
    def effect(self) -> float:
        xa, xb = self._x(self.a), self._x(self.b)
        if np.isnan(xa).any() or np.isnan(xb).any():
            return math.nan
        with np.errstate(invalid="ignore"):
            return float(np.mean(xa) - np.mean(xb))  # inf - inf is NaN: both arms diverged, no effect to judge

    @property
    def spread(self) -> float:
        return max(seed_range(self._x(self.a)), seed_range(self._x(self.b)))

    @property
    def sign(self) -> int:
        """+1 the claimed way, -1 the other way, 0 within the spread (or not measurable)."""
        effect, spread = self.effect, self.spread
        if math.isnan(effect) or math.isnan(spread):
            return 0
        return 1 if effect > spread else -1 if effect < -spread else 0

    def text(self) -> str:
        if self.yes_no:
            yes = int(np.sum(self.a.values > 0.5))
            return f"{self.a.label}: yes in {yes} of {len(self.a.values)} seeds"
        if math.isnan(self.effect):
            return f"{self.a.label} > {self.b.label}: not measurable (a value is missing or undefined)"
        unit = " decades" if self.log else ""
        return f"{self.a.label} - {self.b.label} = {fmt(self.effect, signed=True)}{unit} vs spread {fmt(self.spread)}"

    def to_json(self) -> dict:
        return {
            "claimed": f"{self.a.label} > {self.b.label}",
            "a": self.a.values.tolist(),
            "b": self.b.values.tolist(),
            "log10": self.log,
            "effect": self.effect,
            "spread": self.spread,
            "direction": {1: "as claimed", -1: "against the claim", 0: "within the spread"}[self.sign],
        }


def more(a_label: str, a, b_label: str, b, *, log: bool = False) -> Comparison:
    """Claim: a is larger than b."""
    return Comparison(Arm(a_label, a), Arm(b_label, b), log=log)


def less(a_label: str, a, b_label: str, b, *, log: bool = False) -> Comparison:
    """Claim: a is smaller than b."""
    return Comparison(Arm(b_label, b), Arm(a_label, a), log=log)


def above(label: str, values, threshold: float, *, log: bool = False) -> Comparison:
    return Comparison(Arm(label, values), Arm(fmt(threshold), [threshold]), log=log)


def below(label: str, values, threshold: float, *, log: bool = False) -> Comparison:
    return Comparison(Arm(fmt(threshold), [threshold]), Arm(label, values), log=log)


def every_seed(label: str, outcomes) -> Comparison:
    """Claim: a per-seed yes/no outcome is yes; decisive only when all seeds agree."""
    return Comparison(Arm(label, np.asarray(outcomes, dtype=np.float64)), Arm("half", [0.5]), yes_no=True)


def diverged_high(values) -> np.ndarray:
    """Losses with a diverged (non-finite) run as +inf: it ranks above every finite loss."""
    v = _as_array(values)
    return np.where(np.isfinite(v), v, np.inf)


@dataclass
class Finding:
    claim: str  # the textbook expectation, in plain words
    measured: str  # the numbers the runs produced
    rule: str  # which comparisons decide it, in words
    tests: list[Comparison] = field(default_factory=list)  # all must go the claimed way; [] = reported only
    not_judged: str | None = None  # why the runs cannot judge the claim (e.g. one ended before a warm-up)
    indicative: bool = False  # a --quick study: never holds or contradicted

    @property
    def seeds(self) -> int:
        return min((t.seeds for t in self.tests), default=0)

    @property
    def lean(self) -> str | None:
        """Where the comparisons point: 'as claimed', 'against the claim', 'within the spread' (None: not judged)."""
        if not self.tests or self.not_judged:
            return None
        signs = [t.sign for t in self.tests]
        if any(s < 0 for s in signs):
            return "against the claim"
        return "as claimed" if all(s > 0 for s in signs) else "within the spread"

    @property
    def status(self) -> str:
        if self.not_judged:
            return "not judged"
        if not self.tests:
            return "measured"
        if self.indicative or self.seeds < MIN_SEEDS:
            return "indicative"
        return {"as claimed": "holds", "against the claim": "CONTRADICTED"}.get(self.lean, "inconclusive")

    @property
    def evidence(self) -> str:
        """Each comparison's effect against its spread (or why it was not judged)."""
        if self.not_judged:
            return self.not_judged
        return "; ".join(t.text() for t in self.tests)

    def label(self) -> str:
        return f"indicative: {self.lean}" if self.status == "indicative" else self.status

    def line(self) -> str:
        return f"[{self.label()}] {self.claim} — measured: {self.measured} ({self.rule}; {self.evidence})"

    def to_json(self) -> dict:
        return {
            "claim": self.claim,
            "measured": self.measured,
            "rule": self.rule,
            "status": self.status,
            "lean": self.lean,
            "indicative": self.status == "indicative",
            "seeds": self.seeds,
            "not_judged": self.not_judged,
            "evidence": self.evidence,
            "comparisons": [t.to_json() for t in self.tests],
        }


def fmt(value: float, digits: int = 3, *, signed: bool = False) -> str:
    """A measured number for prose: 3 significant digits, scientific for very small or large values."""
    if value is None or not math.isfinite(value):
        return str(value)
    sign = "+" if signed and value > 0 else ""
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{sign}{value:.{digits - 1}e}"
    return f"{sign}{value:.{digits}g}"


def fmt_seeds(values, *, log: bool = False, percent: bool = False) -> str:
    """Seed values for prose: one value as is; several as mean [min..max] (geometric mean with log=True), or
    once when every seed gave it; with a non-finite value, every seed's value."""
    v = _as_array(values) * (100.0 if percent else 1.0)
    unit = "%" if percent else ""
    if len(v) == 1:
        return fmt(v[0]) + unit
    if bool(np.all(v == v[0])):
        return f"{fmt(v[0])}{unit} in every seed"
    if not np.isfinite(v).all() or (log and (v <= 0).any()):
        return "seeds " + ", ".join(fmt(x) + unit for x in v)
    centre = float(10 ** np.mean(np.log10(v))) if log else float(np.mean(v))
    return f"{fmt(centre)}{unit} [{fmt(float(v.min()))}..{fmt(float(v.max()))}]"


def summary(findings: list[Finding], quick: bool, seeds: list[int]) -> str:
    """One sentence: how many claims held, were contradicted, inconclusive, indicative or not judged."""
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.status] = counts.get(f.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "measured")
    seeds_text = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"
    text = f"Verdicts over {seeds_text}: {parts or 'nothing judged'}."
    if quick or len(seeds) < MIN_SEEDS:
        why = "a --quick run" if quick else f"fewer than {MIN_SEEDS} seeds"
        text += (
            f" Every verdict is indicative only ({why}): it shows which way the numbers lean, never holds or "
            f"contradicted. Run the full study (at least {MIN_SEEDS} seeds) for verdicts."
        )
    return text


def table(findings: list[Finding], quick: bool = False, seeds: list[int] | None = None) -> str:
    """The console verdict table: one numbered block per finding, wrapped for a terminal."""
    lines = []
    for i, f in enumerate(findings, 1):
        head = f"{i}. [{f.label()}] "
        body = textwrap.wrap(f.claim, 110 - len(head))
        lines.append(head + body[0])
        lines.extend(" " * len(head) + b for b in body[1:])
        for name, text in (("measured", f.measured), ("test", f.rule), ("evidence", f.evidence)):
            for j, part in enumerate(textwrap.wrap(text, 100 - len(head))):
                lines.append(" " * len(head) + (f"{name}: " if j == 0 else " " * (len(name) + 2)) + part)
    lines.extend(textwrap.wrap(summary(findings, quick, seeds or []), 110))
    return "\n".join(lines)

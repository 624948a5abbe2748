"""The shape of a study: its variants, what it explains, and what it hands back (findings, figures, runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowtrain.lab.common import LabContext, RunRecord, read_run, seeded_name, tiny_overrides, train_variant
from flowtrain.lab.verdicts import Finding
from flowtrain.report.plotting import ReportFigure

# The stability guard would skip or roll back the very steps a study wants to show (spikes, divergence), so
# every lab run lets each detector only warn; its alerts still land in alerts.jsonl and on the study page.
GUARD_WARN_ONLY = {
    "guard__nonfinite": "warn",
    "guard__loss_spike": "warn",
    "guard__grad_spike": "warn",
    "guard__divergence": "warn",
}


@dataclass
class Variant:
    name: str  # run directory name
    settings: dict[str, object]  # config overrides (model__n_layer=... style keys)
    label: str = ""  # plain words for the settings table


@dataclass
class StudyOutcome:
    findings: list[Finding]
    figures: list[ReportFigure]
    runs: dict[str, list[Path]]  # variant -> its run directory per seed (LabContext.seeds order)
    settings: list[tuple[str, str]]  # (variant, what it sets) rows for the page
    measurements: dict = field(default_factory=dict)  # the raw numbers behind the findings (verdicts.json)

    @property
    def run_dirs(self) -> list[Path]:
        """Every run, seed by seed."""
        n = max((len(v) for v in self.runs.values()), default=0)
        return [dirs[i] for i in range(n) for dirs in self.runs.values() if i < len(dirs)]

    @property
    def first_seed_runs(self) -> list[Path]:
        """One run per variant (the first seed): what the page's standard report overlays."""
        return [dirs[0] for dirs in self.runs.values() if dirs]


@dataclass
class StudyInfo:
    name: str
    title: str
    reference: str
    paragraphs: list[str]
    run: Callable[[LabContext], StudyOutcome]


def scale(ctx: LabContext, quick: object, full: object) -> object:
    return quick if ctx.quick else full


def seeded_overrides(ctx: LabContext, common: dict[str, object], variant: Variant, seed: int) -> list[str]:
    """One variant's overrides under one seed (the seed sets the initial weights and the batch order)."""
    return tiny_overrides(ctx, **{**GUARD_WARN_ONLY, **common, **variant.settings, "train__seed": seed})


def train_all(ctx: LabContext, common: dict[str, object], variants: list[Variant]) -> dict[str, list[Path]]:
    """Train every variant once per seed (seed by seed, variants in order); name -> run directory per seed."""
    out: dict[str, list[Path]] = {v.name: [] for v in variants}
    for seed in ctx.seeds:
        for v in variants:
            ctx.log.append(f"training {v.name} (seed {seed})")
            name = seeded_name(v.name, seed)
            out[v.name].append(train_variant(ctx, name, seeded_overrides(ctx, common, v, seed)))
    return out


def read_all(runs: dict[str, list[Path]]) -> dict[str, list[RunRecord]]:
    return {k: [read_run(d) for d in dirs] for k, dirs in runs.items()}


def per_seed(runs: dict[str, list], measure) -> dict[str, np.ndarray]:
    """measure(run) for every seed's run of every variant: name -> one number per seed."""
    return {k: np.array([float(measure(r)) for r in items]) for k, items in runs.items()}


def ended_before_warmup(
    method: str, seeds: list[int], records: list[RunRecord], warmup: int, *, finite_norms: bool = False
) -> str | None:
    """Why a claim about `method` cannot be judged: some seed's run ended (diverged or ran out of steps) before
    the method's own warm-up of `warmup` steps was over, so the method never acted. None when all got past it.

    finite_norms: count the finite gradient norms (ZClip's warm-up) instead of the steps trained.
    """
    done = [(s, r.finite_grad_norms() if finite_norms else r.steps_trained()) for s, r in zip(seeds, records)]
    cut = [(s, n) for s, n in done if n < warmup]
    if not cut:
        return None
    unit = "finite gradient norms" if finite_norms else "steps"
    where = ", ".join(f"seed {s} after {n}" for s, n in cut)
    return (
        f"{method}'s run ended before its own warm-up of {warmup} {unit} was over ({where}), "
        "so the method never acted in it"
    )


def settings_rows(common: dict[str, object], variants: list[Variant]) -> list[tuple[str, str]]:
    def show(d: dict[str, object]) -> str:
        return ", ".join(f"{k.replace('__', '.')}={v}" for k, v in d.items())

    rows = [("all variants", show({**GUARD_WARN_ONLY, **common}))]
    rows += [(v.name, (v.label + ": " if v.label else "") + show(v.settings)) for v in variants]
    return rows


__all__ = [
    "LabContext",
    "StudyInfo",
    "StudyOutcome",
    "Variant",
    "ended_before_warmup",
    "per_seed",
    "read_all",
    "read_run",
    "scale",
    "seeded_overrides",
    "settings_rows",
    "train_all",
]

"""The shape of a study: its variants, what it explains, and what it hands back (findings, figures, runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowtrain.lab.common import LabContext, read_run, tiny_overrides, train_variant
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
    run_dirs: list[Path]
    settings: list[tuple[str, str]]  # (variant, what it sets) rows for the page
    measurements: dict = field(default_factory=dict)  # the raw numbers behind the findings (verdicts.json)


@dataclass
class StudyInfo:
    name: str
    title: str
    reference: str
    paragraphs: list[str]
    run: Callable[[LabContext], StudyOutcome]


def scale(ctx: LabContext, quick: object, full: object) -> object:
    return quick if ctx.quick else full


def train_all(ctx: LabContext, common: dict[str, object], variants: list[Variant]) -> dict[str, Path]:
    """Train every variant (common settings, then the variant's own), in order; name -> run directory."""
    out = {}
    for v in variants:
        settings = {**GUARD_WARN_ONLY, **common, **v.settings}
        ctx.log.append(f"training {v.name}")
        out[v.name] = train_variant(ctx, v.name, tiny_overrides(ctx, **settings))
    return out


def settings_rows(common: dict[str, object], variants: list[Variant]) -> list[tuple[str, str]]:
    def show(d: dict[str, object]) -> str:
        return ", ".join(f"{k.replace('__', '.')}={v}" for k, v in d.items())

    rows = [("all variants", show({**GUARD_WARN_ONLY, **common}))]
    rows += [(v.name, (v.label + ": " if v.label else "") + show(v.settings)) for v in variants]
    return rows


__all__ = ["LabContext", "StudyInfo", "StudyOutcome", "Variant", "read_run", "scale", "settings_rows", "train_all"]

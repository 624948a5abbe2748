"""`run_study`: train a study's variants, compute its verdicts, write its page and verdicts.json, print the table.

Tiny models are latency-bound: on a small CPU one thread is faster than several (and immune to
oversubscription when the cores are shared), so a study runs with torch on one thread and restores the
setting afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowtrain.errors import ConfigError, DataError
from flowtrain.fsutil import atomic_write_text
from flowtrain.lab import studies_arch, studies_train
from flowtrain.lab.common import BASE_SEED, LabContext
from flowtrain.lab.page import write_study_page
from flowtrain.lab.study import StudyInfo, StudyOutcome
from flowtrain.lab.verdicts import MIN_SEEDS, RULE, Finding, summary, table

STUDIES: dict[str, StudyInfo] = {
    s.name: s
    for s in (
        StudyInfo(
            "norm-placement",
            "Where the LayerNorm goes: pre-norm, post-norm, none — with and without warmup",
            "Xiong et al. 2020, “On Layer Normalization in the Transformer Architecture” (ICML).",
            [
                "The original Transformer normalizes after each residual addition (post-norm); GPT-2 and most "
                "LLMs since normalize the input of each sublayer (pre-norm). Xiong et al. showed that at "
                "initialization post-norm's gradients are larger for the layers near the output, which is why "
                "post-norm needs a learning-rate warmup, while pre-norm's gradients are evenly spread over depth "
                "and it can train without one.",
                "First you see the per-layer gradient norms of each placement at initialization (the model each "
                "run starts from, measured on real batches). Then six runs: each placement with and without "
                "warmup, the same learning rate for all. The verdict compares the measured gradient profile and "
                "final losses with the paper's claims.",
            ],
            studies_arch.norm_placement,
        ),
        StudyInfo(
            "residuals",
            "Residual connections: a deep stack with and without skips",
            "He et al. 2016, “Deep Residual Learning for Image Recognition”; the vanishing-gradient problem "
            "(Hochreiter 1991, Bengio et al. 1994).",
            [
                "Backpropagation multiplies one Jacobian per layer. Without a skip path the product of many of "
                "them tends to shrink exponentially, so the first layers of a deep stack get almost no gradient. "
                "A residual connection x + f(x) adds an identity path, so the gradient reaches every layer.",
                "The figures show the residual-stream gradient ||dL/dh_l|| at every block boundary of a 12-block "
                "model at initialization: in the classic setting (no normalization, Glorot/Xavier init) and in a "
                "pre-norm GPT, each with and without skips. Then all four train with the same settings.",
            ],
            studies_arch.residuals,
        ),
        StudyInfo(
            "activations",
            "Activation functions: ReLU vs GELU vs SwiGLU — gradient magnitude and dead units",
            "Hendrycks & Gimpel 2016, “Gaussian Error Linear Units (GELUs)”; Shazeer 2020, “GLU Variants "
            "Improve Transformer”; dying ReLU (Lu et al. 2019).",
            [
                "ReLU passes no gradient for negative inputs. A unit whose input is negative for every token is "
                "dead: it never learns again. GELU and SwiGLU are smooth, so some gradient flows for (almost) "
                "every input.",
                "Three runs differ only in the MLP's activation. A unit counts as dead when its local gradient "
                "|d activation / d input| stays below 1e-3 on every token of a fixed set of validation batches, "
                "measured with hooks on every block's MLP at initialization and after training.",
            ],
            studies_train.activations,
        ),
        StudyInfo(
            "clipping",
            "Gradient clipping with a too-high learning rate: none, global norm, AGC, ZClip",
            "Pascanu et al. 2013, “On the difficulty of training recurrent neural networks”; Brock et al. "
            "2021 (AGC, NFNets); Kumar et al. 2025 (ZClip).",
            [
                "A learning rate that is too high makes occasional huge gradients, loss spikes and sometimes "
                "divergence. Clipping caps the gradient before the update: by its global norm, per unit relative "
                "to the weights (AGC), or relative to the recent statistics of the norm itself (ZClip).",
                "Four runs use SGD with momentum at a learning rate far too high for it (1.0) and differ only in "
                "clipping. The stability guard is set to warn only (its default would skip or roll back the very "
                "spikes this study wants to show); its alerts are listed below.",
            ],
            studies_train.clipping,
        ),
        StudyInfo(
            "warmup",
            "Learning-rate warmup: none vs linear vs inverse square root (Noam)",
            "Vaswani et al. 2017 (the Noam schedule); Goyal et al. 2017; Liu et al. 2020, “On the Variance of "
            "the Adaptive Learning Rate and Beyond”.",
            [
                "Adam's first steps use second-moment estimates from very few gradients, so full-size steps at "
                "the start move the weights a lot relative to their size. Warmup ramps the learning rate up over "
                "the first steps.",
                "Three runs with the same peak learning rate: no warmup, a linear warmup into cosine decay, and "
                "the Transformer paper's linear warmup then 1/sqrt(step) decay. Look at the update/weight ratio "
                "and the gradient norm in the first steps.",
            ],
            studies_train.warmup,
        ),
        StudyInfo(
            "init",
            "Initialization: N(0, 0.02) vs Xavier vs He vs scaled residual",
            "Glorot & Bengio 2010 (Xavier); He et al. 2015 (He/Kaiming); Radford et al. 2019 (GPT-2's "
            "1/sqrt(2L) residual scaling).",
            [
                "Each block adds its output to the residual stream, so the stream's variance grows with depth by "
                "as much as the blocks' outputs carry. Xavier and He scale weights to keep a plain layer's "
                "variance constant; in a residual transformer that makes each block's contribution large. GPT-2 "
                "scales the output projections by 1/sqrt(2L) so the sum stays bounded.",
                "The figures show, for an 8-block pre-norm model at initialization, the activation RMS and the "
                "residual gradient at every block boundary; then all four schemes train with the same settings.",
            ],
            studies_arch.init_schemes,
        ),
    )
}


@dataclass
class StudyResult:
    name: str
    out_dir: Path
    report: Path
    findings: list[Finding]
    run_dirs: list[Path]
    measurements: dict
    seconds: float
    seeds: list[int] = field(default_factory=list)
    quick: bool = False


def default_out_dir(study: str) -> Path:
    return Path("runs") / "lab" / f"{study}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a directory for the study's runs and report")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; pass a new directory (or delete this one) so runs do not mix")


def study_seeds(seeds: int | list[int] | None, quick: bool) -> list[int]:
    """The seeds a study trains under: a count (BASE_SEED, BASE_SEED + 1, ...) or an explicit list. Default:
    MIN_SEEDS for a full study, one for --quick (whose verdicts are indicative whatever the count)."""
    if seeds is None:
        seeds = 1 if quick else MIN_SEEDS
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds {seeds!r}: pass a count (e.g. 3) or a list of integer seeds")
    if not isinstance(seeds, int):
        chosen = list(seeds)
        if not chosen or not all(isinstance(s, int) and not isinstance(s, bool) for s in chosen):
            raise ConfigError(f"seeds {seeds!r}: pass a count (e.g. 3) or a list of integer seeds")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"seeds {chosen}: each seed once (a repeated seed repeats a run, not a sample)")
        return chosen
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: a study needs at least 1 seed ({MIN_SEEDS} for verdicts)")
    return [BASE_SEED + i for i in range(seeds)]


def _plain(value):
    """verdicts.json is strict JSON: non-finite numbers are written as the run directory's "nan" / "inf"."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_study(
    name: str,
    *,
    quick: bool = False,
    seeds: int | list[int] | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    echo=None,
) -> StudyResult:
    """Run one study end to end; `echo(line)` (e.g. print) receives progress lines and the verdict table.

    seeds: how many seeds (or which) every variant trains under; default MIN_SEEDS, one with `quick`. Verdicts
    other than "indicative" need a full study and at least MIN_SEEDS seeds (lab/verdicts.py).
    """
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    if data is not None and not Path(data).exists():
        raise DataError(f"--data {data} does not exist; pass a text file or a directory of text files")
    chosen = study_seeds(seeds, quick)
    info = STUDIES[name]
    out_dir = Path(out) if out is not None else default_out_dir(name)
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda line: None)
    ctx = LabContext(out_dir=out_dir, quick=quick, data=Path(data) if data is not None else None, seeds=chosen)
    indicative = quick or len(chosen) < MIN_SEEDS
    mode = " (quick: indicative only)" if quick else " (indicative only: fewer than 3 seeds)" if indicative else ""
    say(f"flowtrain lab {name}{mode}: {info.title}")
    say(f"seeds {', '.join(map(str, chosen))}; runs and report in {out_dir}")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    console = io.StringIO()  # whatever the runs print (data preparation) goes to lab.log, not the terminal
    try:
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            outcome: StudyOutcome = info.run(ctx)
    finally:
        torch.set_num_threads(threads)
        atomic_write_text(out_dir / "lab.log", console.getvalue())
    for finding in outcome.findings:
        finding.indicative = quick  # fewer than MIN_SEEDS seeds makes a finding indicative by itself
    report = write_study_page(
        out_dir / "report.html",
        title=f"flowtrain lab: {name}" + (" (quick, indicative)" if quick else ""),
        paragraphs=[info.title + ".", *info.paragraphs],
        reference=info.reference,
        settings=[*outcome.settings, ("seeds", ", ".join(map(str, chosen)))],
        findings=outcome.findings,
        figures=outcome.figures,
        run_dirs=outcome.first_seed_runs,
        quick=quick,
        seeds=chosen,
    )
    seconds = time.perf_counter() - started
    verdicts = {
        "study": name,
        "quick": quick,
        "indicative": indicative,
        "seeds": chosen,
        "rule": RULE,
        "seconds": round(seconds, 1),
        "summary": summary(outcome.findings, quick, chosen),
        "findings": [f.to_json() for f in outcome.findings],
        "measurements": outcome.measurements,
        "runs": {k: [str(d) for d in dirs] for k, dirs in outcome.runs.items()},
    }
    atomic_write_text(out_dir / "verdicts.json", json.dumps(_plain(verdicts), indent=1, allow_nan=False))
    say(table(outcome.findings, quick, chosen))
    say(f"report: {report}  ({seconds:.0f} s)")
    return StudyResult(
        name, out_dir, report, outcome.findings, outcome.run_dirs, outcome.measurements, seconds, chosen, quick
    )

"""Studies of training dynamics: activation functions (dead units), gradient clipping, learning-rate warmup.

Everything here is read back from the run directories (metrics.jsonl, eval.jsonl, flow.parquet), except dead
units, which lab/probes.py measures with its own MLP hooks on the initial and the final weights. Every number is
measured once per seed; lab/verdicts.py turns the comparisons into verdicts.
"""

from __future__ import annotations

import math

import numpy as np

from flowtrain.lab.common import LabContext, read_flow_kind, variant_config
from flowtrain.lab.figures import bars_figure, curves_figure
from flowtrain.lab.probes import dead_units, fresh_model, open_dataset, trained_model
from flowtrain.lab.studies_arch import final_losses, seeds_of
from flowtrain.lab.study import (
    StudyOutcome,
    Variant,
    ended_before_warmup,
    per_seed,
    read_all,
    scale,
    seeded_overrides,
    settings_rows,
    train_all,
)
from flowtrain.lab.verdicts import Finding, below, every_seed, fmt_seeds, less, more

# ---- activations --------------------------------------------------------------------------------------------


def activations(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 40, 400)
    common = {
        "model__n_layer": 4,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 4,
        "optim__lr": 1e-2,  # high enough that ReLU units get pushed into the dead zone, as in practice
        "schedule__warmup_steps": steps // 10,
    }
    variants = [
        Variant("relu", {"model__activation": "relu"}, "ReLU"),
        Variant("gelu", {"model__activation": "gelu"}, "GELU (exact)"),
        Variant("swiglu", {"model__activation": "swiglu"}, "SwiGLU (2/3 width, same parameter count)"),
    ]
    runs = train_all(ctx, common, variants)
    probe_batches = scale(ctx, 2, 8)
    dead_init: dict[str, list[np.ndarray]] = {v.name: [] for v in variants}
    dead_end: dict[str, list[np.ndarray]] = {v.name: [] for v in variants}
    for v in variants:
        for seed, run_dir in zip(ctx.seeds, runs[v.name]):
            cfg = variant_config(ctx, v.name, seeded_overrides(ctx, common, v, seed))
            dataset = open_dataset(cfg)
            dead_init[v.name].append(dead_units(fresh_model(cfg), dataset, cfg.train.batch_size, probe_batches))
            dead_end[v.name].append(dead_units(trained_model(run_dir), dataset, cfg.train.batch_size, probe_batches))
    fc_grad = per_seed(runs, _fc_grad_median)
    mean_end = {k: np.array([float(np.mean(x)) for x in v]) for k, v in dead_end.items()}
    mean_init = {k: np.array([float(np.mean(x)) for x in v]) for k, v in dead_init.items()}
    loss = final_losses(read_all(runs))
    findings = [
        Finding(
            "ReLU units die: after training a share of ReLU's hidden units passes no gradient on any probe token, "
            "more than with GELU or SwiGLU",
            "dead MLP units after training (mean over blocks): "
            + ", ".join(f"{k} {fmt_seeds(v, percent=True)}" for k, v in mean_end.items()),
            "ReLU's share above GELU's and above SwiGLU's",
            [more("relu", mean_end["relu"], k, mean_end[k]) for k in ("gelu", "swiglu")],
        ),
        Finding(
            "Dead ReLU units appear during training, not at initialization",
            f"ReLU dead share at init {fmt_seeds(mean_init['relu'], percent=True)}, after training "
            f"{fmt_seeds(mean_end['relu'], percent=True)}",
            "the share after training above the share at init",
            [more("after training", mean_end["relu"], "at init", mean_init["relu"])],
        ),
        Finding(
            "Smooth activations (GELU, SwiGLU) keep (almost) every unit alive",
            f"dead after training: GELU {fmt_seeds(mean_end['gelu'], percent=True)}, SwiGLU "
            f"{fmt_seeds(mean_end['swiglu'], percent=True)}",
            "both shares below 1%",
            [below(k, mean_end[k], 0.01) for k in ("gelu", "swiglu")],
        ),
        Finding(
            "Gradient magnitude reaching the MLP input weights",
            "median over steps and blocks of the RMS gradient of mlp.fc.weight: "
            + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in fc_grad.items()),
            "reported only (ReLU zeroes the gradient of every inactive unit; the smooth ones do not)",
        ),
        Finding(
            "GLU variants train better than ReLU/GELU at equal parameters (Shazeer 2020)",
            "final val loss: " + ", ".join(f"{k} {fmt_seeds(v)}" for k, v in loss.items()),
            "SwiGLU's loss below ReLU's and below GELU's",
            [less("swiglu", loss["swiglu"], k, loss[k]) for k in ("relu", "gelu")],
        ),
    ]
    blocks = [f"block.{i}" for i in range(len(dead_end["relu"][0]))]
    figures = [
        bars_figure(
            "lab_dead_units",
            "Dead MLP units per block, after training",
            "Share of hidden units whose local gradient |d act / d pre-activation| stays below 1e-3 on every "
            "token of the fixed validation probe batches (for ReLU: never positive); bars are the mean over "
            "seeds, whiskers the seeds' range.",
            blocks,
            {k: [100 * x for x in v] for k, v in dead_end.items()},
            "dead units (%)",
        ),
        curves_figure(
            "lab_mlp_grad_rms",
            "MLP input-weight gradient RMS during training",
            "RMS of the gradient of mlp.fc.weight, median over blocks, at every monitored step (from flow.parquet), "
            "one line per seed.",
            {v.name: [_fc_grad_curve(d) for d in runs[v.name]] for v in variants},
            "gradient RMS",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "dead_init": {k: [x.tolist() for x in v] for k, v in dead_init.items()},
            "dead_end": {k: [x.tolist() for x in v] for k, v in dead_end.items()},
            "fc_grad_rms": seeds_of(fc_grad),
            "final_val_loss": seeds_of(loss),
        },
    )


def _fc_grad_median(run_dir) -> float:
    """Median over every step and block of the RMS gradient of mlp.fc.weight."""
    tensors = read_flow_kind(run_dir, "tensor")
    rows = [i for i, n in enumerate(tensors.names) if n.endswith("mlp.fc.weight")]
    return float(np.nanmedian(tensors.stats["grad_rms"][rows]))


def _fc_grad_curve(run_dir) -> tuple[np.ndarray, np.ndarray]:
    tensors = read_flow_kind(run_dir, "tensor")
    rows = [i for i, n in enumerate(tensors.names) if n.endswith("mlp.fc.weight")]
    return tensors.steps, np.nanmedian(tensors.stats["grad_rms"][rows], axis=0)


# ---- clipping -----------------------------------------------------------------------------------------------


def spikes(loss: np.ndarray, window: int = 10, factor: float = 1.3) -> int:
    """Finite steps whose loss exceeds `factor` x the median of the finite losses of the previous `window` steps.

    Non-finite losses are divergence, counted apart (see `diverged`), not spikes.
    """
    count = 0
    for i in range(window, len(loss)):
        before = loss[i - window : i]
        before = before[np.isfinite(before)]
        if math.isfinite(loss[i]) and len(before) and loss[i] > factor * float(np.median(before)):
            count += 1
    return count


def _finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if len(finite) else math.nan


def clipping(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 40, 300)
    common = {
        "model__n_layer": 4,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 4,
        # SGD with momentum, where clipping comes from (Pascanu et al. 2013), at a learning rate far too high for
        # it. (AdamW at 10x its good LR did not spike at all at this size: its update is normalised per weight.)
        "optim__name": "sgd",
        "optim__lr": 1.0,
        "schedule__warmup_steps": 0,
    }
    variants = [
        Variant("no-clip", {"clip__kind": "off"}, "no clipping"),
        Variant("global-norm", {"clip__kind": "norm", "clip__max_norm": 1.0}, "global L2 norm <= 1"),
        Variant("agc", {"clip__kind": "agc"}, "adaptive gradient clipping (Brock et al. 2021)"),
        Variant("zclip", {"clip__kind": "zclip"}, "z-score adaptive clipping (ZClip)"),
    ]
    runs = train_all(ctx, common, variants)
    rec = read_all(runs)
    n_spikes = per_seed(rec, lambda r: spikes(r.series("loss")))
    rate = per_seed(rec, lambda r: np.nanmean(r.series("clipped")))
    peak = per_seed(rec, lambda r: _finite_max(r.series("loss")[5:]))
    diverged = {k: np.array([bool((~np.isfinite(r.series("loss"))).any()) for r in rs]) for k, rs in rec.items()}
    loss = per_seed(rec, lambda r: r.final_val_loss())
    zclip_warmup = int(rec["zclip"][0].setting("clip.zclip_warmup", 25))

    def summary(k: str) -> str:
        n, bad = len(diverged[k]), int(diverged[k].sum())
        if bad == 0:
            state = f"val {fmt_seeds(loss[k])}"
        elif bad == n:
            state = "diverged (non-finite loss)" + (f" in all {n} seeds" if n > 1 else "")
        else:
            state = f"diverged in {bad} of {n} seeds, val {fmt_seeds(loss[k][~diverged[k]])} in the others"
        return f"{k}: spikes {fmt_seeds(n_spikes[k])}, peak loss {fmt_seeds(peak[k])}, {state}"

    def calmer(k: str) -> np.ndarray:
        """Per seed: fewer spikes than no clipping, or as few and a lower final loss; a run that diverged where
        no clipping did not is never calmer, one that did not where no clipping did always is."""
        out = []
        for i in range(len(diverged[k])):
            mine, base = diverged[k][i], diverged["no-clip"][i]
            if mine != base:
                out.append(bool(base))
            elif n_spikes[k][i] != n_spikes["no-clip"][i]:
                out.append(bool(n_spikes[k][i] < n_spikes["no-clip"][i]))
            else:
                out.append(bool(math.isfinite(loss[k][i]) and loss[k][i] < loss["no-clip"][i]))
        return np.array(out)

    findings = [
        Finding(
            "With a too-high learning rate and no clipping, training spikes or diverges",
            summary("no-clip"),
            "per seed: diverged or at least one loss spike (> 1.3x the median of the previous 10 steps)",
            [every_seed("no-clip spiked or diverged", diverged["no-clip"] | (n_spikes["no-clip"] > 0))],
        ),
        *(
            Finding(
                f"{label} tames the spikes (fewer spikes, or a lower final loss than no clipping)",
                f"{summary(k)}; share of steps clipped {fmt_seeds(rate[k], percent=True)}",
                "per seed: finite where no-clip diverged; else fewer spikes, or as many and a lower final loss",
                [every_seed(f"{k} calmer than no-clip", calmer(k))],
                not_judged=ended_before_warmup("ZClip", ctx.seeds, rec[k], zclip_warmup, finite_norms=True)
                if k == "zclip"
                else None,
            )
            for k, label in (("global-norm", "Global-norm clipping"), ("agc", "AGC"), ("zclip", "ZClip"))
        ),
    ]
    figures = [
        curves_figure(
            "lab_clip_loss",
            "Training loss with a too-high learning rate",
            "Training loss per step for each clipping variant and seed (log scale). Gaps are non-finite losses.",
            {k: [(r.steps, r.series("loss")) for r in rs] for k, rs in rec.items()},
            "training loss",
        ),
        curves_figure(
            "lab_clip_grad_norm",
            "Gradient norm before clipping",
            "grad_norm_preclip per step and seed: what each clipper saw before it acted.",
            {k: [(r.steps, r.series("grad_norm_preclip")) for r in rs] for k, rs in rec.items()},
            "pre-clip gradient norm",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "spikes": seeds_of(n_spikes),
            "clip_rate": seeds_of(rate),
            "peak_loss": seeds_of(peak),
            "diverged": {k: v.tolist() for k, v in diverged.items()},
            "final_val_loss": seeds_of(loss),
            "zclip_warmup": zclip_warmup,
            "zclip_finite_grad_norms": [r.finite_grad_norms() for r in rec["zclip"]],
        },
    )


# ---- warmup -------------------------------------------------------------------------------------------------


def warmup(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 40, 400)
    warm = steps // 8
    common = {
        "model__n_layer": 4,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 4,
        "optim__lr": 1e-2,
        "clip__kind": "off",  # clipping would hide part of the early-gradient effect
    }
    variants = [
        Variant("no-warmup", {"schedule__kind": "cosine", "schedule__warmup_steps": 0}, "cosine, no warmup"),
        Variant("linear", {"schedule__kind": "cosine", "schedule__warmup_steps": warm}, "linear warmup, cosine"),
        Variant(
            "noam",
            {"schedule__kind": "inverse_sqrt", "schedule__warmup_steps": warm},
            "linear warmup, then 1/sqrt(step) (Vaswani et al. 2017)",
        ),
    ]
    runs = train_all(ctx, common, variants)
    rec = read_all(runs)

    def ratio(r) -> np.ndarray:
        return r.series("update_norm") / r.series("param_norm")

    upd = per_seed(rec, lambda r: np.nanmedian(ratio(r)[r.steps <= warm]))
    first = per_seed(rec, lambda r: ratio(r)[0])
    gmax = per_seed(rec, lambda r: np.nanmax(r.series("grad_norm_preclip")[r.steps <= warm]))
    early_loss = per_seed(rec, lambda r: np.nanmax(r.series("loss")[r.steps <= warm][1:]))
    loss = final_losses(rec)
    # a warmup schedule whose run ended inside its warm-up never reached its peak LR: nothing to compare
    cut = " ".join(filter(None, (ended_before_warmup(k, ctx.seeds, rec[k], warm) for k in ("linear", "noam"))))
    findings = [
        Finding(
            "Without warmup the first updates are large relative to the weights",
            "||dW||/||W|| of the first step: "
            + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in first.items())
            + f"; median over the first {warm} steps: "
            + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in upd.items()),
            "no-warmup's median above both warmup schedules' (log10)",
            [more("no-warmup", upd["no-warmup"], k, upd[k], log=True) for k in ("linear", "noam")],
            not_judged=cut or None,
        ),
        Finding(
            "Without warmup early gradient norms spike higher",
            f"largest pre-clip gradient norm in the first {warm} steps: "
            + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in gmax.items()),
            "no-warmup's above both warmup schedules' (log10)",
            [more("no-warmup", gmax["no-warmup"], k, gmax[k], log=True) for k in ("linear", "noam")],
            not_judged=cut or None,
        ),
        Finding(
            "Without warmup the early loss is less stable",
            f"highest training loss in steps 2..{warm}: "
            + ", ".join(f"{k} {fmt_seeds(v)}" for k, v in early_loss.items()),
            "no-warmup's above both warmup schedules'",
            [more("no-warmup", early_loss["no-warmup"], k, early_loss[k]) for k in ("linear", "noam")],
            not_judged=cut or None,
        ),
        Finding(
            "Warmup gives a better final loss",
            "final val loss: " + ", ".join(f"{k} {fmt_seeds(v)}" for k, v in loss.items()),
            "linear warmup's loss below no warmup's",
            [less("linear", loss["linear"], "no-warmup", loss["no-warmup"])],
            not_judged=ended_before_warmup("linear", ctx.seeds, rec["linear"], warm),
        ),
    ]
    figures = [
        curves_figure(
            "lab_warmup_update_ratio",
            "Update size relative to the weights",
            "Global ||W_after - W_before|| / ||W_before|| per step and seed (metrics.jsonl: update_norm / param_norm).",
            {k: [(r.steps, ratio(r)) for r in rs] for k, rs in rec.items()},
            "||dW|| / ||W||",
        ),
        curves_figure(
            "lab_warmup_grad_norm",
            "Gradient norm in early training",
            "grad_norm_preclip per step and seed (no clipping in this study).",
            {k: [(r.steps, r.series("grad_norm_preclip")) for r in rs] for k, rs in rec.items()},
            "gradient norm",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "early_update_ratio": seeds_of(upd),
            "first_update_ratio": seeds_of(first),
            "early_grad_max": seeds_of(gmax),
            "early_loss_max": seeds_of(early_loss),
            "final_val_loss": seeds_of(loss),
        },
    )

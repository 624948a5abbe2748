"""Studies of training dynamics: activation functions (dead units), gradient clipping, learning-rate warmup.

Everything here is read back from the run directories (metrics.jsonl, eval.jsonl, flow.parquet), except dead
units, which lab/probes.py measures with its own MLP hooks on the initial and the final weights.
"""

from __future__ import annotations

import math

import numpy as np

from flowtrain.lab.common import LabContext, read_flow_kind, read_run, tiny_overrides, variant_config
from flowtrain.lab.figures import bars_figure, curves_figure
from flowtrain.lab.probes import dead_units, fresh_model, open_dataset, trained_model
from flowtrain.lab.studies_arch import LOSS_TOLERANCE, final_loss, worse
from flowtrain.lab.study import GUARD_WARN_ONLY, StudyOutcome, Variant, scale, settings_rows, train_all
from flowtrain.lab.verdicts import Finding, fmt

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
    dead_init, dead_end, fc_grad = {}, {}, {}
    for v in variants:
        cfg = variant_config(ctx, v.name, tiny_overrides(ctx, **{**GUARD_WARN_ONLY, **common, **v.settings}))
        dataset = open_dataset(cfg)
        dead_init[v.name] = dead_units(fresh_model(cfg), dataset, cfg.train.batch_size, probe_batches)
        dead_end[v.name] = dead_units(trained_model(runs[v.name]), dataset, cfg.train.batch_size, probe_batches)
        tensors = read_flow_kind(runs[v.name], "tensor")
        rows = [i for i, n in enumerate(tensors.names) if n.endswith("mlp.fc.weight")]
        fc_grad[v.name] = float(np.nanmedian(tensors.stats["grad_rms"][rows]))
    mean_end = {k: float(np.mean(v)) for k, v in dead_end.items()}
    mean_init = {k: float(np.mean(v)) for k, v in dead_init.items()}
    loss = {k: final_loss(d) for k, d in runs.items()}
    findings = [
        Finding(
            "ReLU units die: after training a share of ReLU's hidden units passes no gradient on any probe token, "
            "more than with GELU or SwiGLU",
            "dead MLP units after training (mean over blocks): "
            + ", ".join(f"{k} {fmt(100 * v)}%" for k, v in mean_end.items()),
            "held if ReLU's share is larger than both others'",
            mean_end["relu"] > mean_end["gelu"] and mean_end["relu"] > mean_end["swiglu"],
        ),
        Finding(
            "Dead ReLU units appear during training, not at initialization",
            f"ReLU dead share at init {fmt(100 * mean_init['relu'])}%, after training {fmt(100 * mean_end['relu'])}%",
            "held if it grew",
            mean_end["relu"] > mean_init["relu"],
        ),
        Finding(
            "Smooth activations (GELU, SwiGLU) keep (almost) every unit alive",
            f"dead after training: GELU {fmt(100 * mean_end['gelu'])}%, SwiGLU {fmt(100 * mean_end['swiglu'])}%",
            "held if both are at most 1%",
            mean_end["gelu"] <= 0.01 and mean_end["swiglu"] <= 0.01,
        ),
        Finding(
            "Gradient magnitude reaching the MLP input weights",
            "median over steps and blocks of the RMS gradient of mlp.fc.weight: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in fc_grad.items()),
            "reported only (ReLU zeroes the gradient of every inactive unit; the smooth ones do not)",
            None,
        ),
        Finding(
            "GLU variants train better than ReLU/GELU at equal parameters (Shazeer 2020)",
            "final val loss: " + ", ".join(f"{k} {fmt(v)}" for k, v in loss.items()),
            f"held if SwiGLU is lower than both others by more than {LOSS_TOLERANCE} nats",
            worse(loss["relu"], loss["swiglu"]) and worse(loss["gelu"], loss["swiglu"]),
        ),
    ]
    blocks = [f"block.{i}" for i in range(len(next(iter(dead_end.values()))))]
    figures = [
        bars_figure(
            "lab_dead_units",
            "Dead MLP units per block, after training",
            "Share of hidden units whose local gradient |d act / d pre-activation| stays below 1e-3 on every "
            "token of the fixed validation probe batches (for ReLU: never positive).",
            blocks,
            {k: list(100 * v) for k, v in dead_end.items()},
            "dead units (%)",
        ),
        curves_figure(
            "lab_mlp_grad_rms",
            "MLP input-weight gradient RMS during training",
            "RMS of the gradient of mlp.fc.weight, median over blocks, at every monitored step (from flow.parquet).",
            {v.name: _fc_grad_curve(runs[v.name]) for v in variants},
            "gradient RMS",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={
            "dead_init": {k: v.tolist() for k, v in dead_init.items()},
            "dead_end": {k: v.tolist() for k, v in dead_end.items()},
            "fc_grad_rms": fc_grad,
            "final_val_loss": loss,
        },
    )


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
    rec = {k: read_run(d) for k, d in runs.items()}
    n_spikes = {k: spikes(r.series("loss")) for k, r in rec.items()}
    rate = {k: float(np.nanmean(r.series("clipped"))) for k, r in rec.items()}
    peak = {k: _finite_max(r.series("loss")[5:]) for k, r in rec.items()}
    diverged = {k: bool((~np.isfinite(r.series("loss"))).any()) for k, r in rec.items()}
    loss = {k: r.final_val_loss() for k, r in rec.items()}

    def summary(k: str) -> str:
        state = "diverged (non-finite loss)" if diverged[k] else f"val {fmt(loss[k])}"
        return f"{k}: {n_spikes[k]} spikes, peak loss {fmt(peak[k])}, {state}"

    def calmer(k: str) -> bool:
        """Fewer spikes than no clipping, or as few and a lower final loss; never diverged when no-clip did not."""
        if diverged[k] and not diverged["no-clip"]:
            return False
        if diverged["no-clip"] and not diverged[k]:
            return True
        return n_spikes[k] < n_spikes["no-clip"] or (
            n_spikes[k] == n_spikes["no-clip"] and worse(loss["no-clip"], loss[k])
        )

    findings = [
        Finding(
            "With a too-high learning rate and no clipping, training spikes or diverges",
            summary("no-clip"),
            "held if it diverged or had at least one loss spike (> 1.3x the median of the previous 10 steps)",
            diverged["no-clip"] or n_spikes["no-clip"] > 0,
        ),
        *(
            Finding(
                f"{label} tames the spikes (fewer spikes, or a lower final loss than no clipping)",
                f"{summary(k)}; clip rate {fmt(100 * rate[k])}% of steps",
                "held if fewer spikes than no-clip, or as many and a lower final loss",
                calmer(k),
            )
            for k, label in (("global-norm", "Global-norm clipping"), ("agc", "AGC"), ("zclip", "ZClip"))
        ),
    ]
    figures = [
        curves_figure(
            "lab_clip_loss",
            "Training loss with a too-high learning rate",
            "Training loss per step for each clipping variant (log scale). Gaps are non-finite losses.",
            {k: (r.steps, r.series("loss")) for k, r in rec.items()},
            "training loss",
        ),
        curves_figure(
            "lab_clip_grad_norm",
            "Gradient norm before clipping",
            "grad_norm_preclip per step: what each clipper saw before it acted.",
            {k: (r.steps, r.series("grad_norm_preclip")) for k, r in rec.items()},
            "pre-clip gradient norm",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={
            "spikes": n_spikes,
            "clip_rate": rate,
            "peak_loss": peak,
            "diverged": diverged,
            "final_val_loss": loss,
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
    rec = {k: read_run(d) for k, d in runs.items()}
    early = {k: r.steps <= warm for k, r in rec.items()}
    ratio = {k: r.series("update_norm") / r.series("param_norm") for k, r in rec.items()}
    upd = {k: float(np.nanmedian(ratio[k][early[k]])) for k in rec}
    first = {k: float(ratio[k][0]) for k in rec}
    gmax = {k: float(np.nanmax(r.series("grad_norm_preclip")[early[k]])) for k, r in rec.items()}
    early_loss = {k: float(np.nanmax(r.series("loss")[early[k]][1:])) for k, r in rec.items()}
    loss = {k: r.final_val_loss() for k, r in rec.items()}
    findings = [
        Finding(
            "Without warmup the first updates are large relative to the weights",
            "||dW||/||W|| of the first step: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in first.items())
            + f"; median over the first {warm} steps: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in upd.items()),
            "held if no-warmup's median is larger than both warmup schedules'",
            upd["no-warmup"] > upd["linear"] and upd["no-warmup"] > upd["noam"],
        ),
        Finding(
            "Without warmup early gradient norms spike higher",
            f"largest pre-clip gradient norm in the first {warm} steps: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in gmax.items()),
            "held if no-warmup's is the largest",
            gmax["no-warmup"] > gmax["linear"] and gmax["no-warmup"] > gmax["noam"],
        ),
        Finding(
            "Without warmup the early loss is less stable",
            f"highest training loss in steps 2..{warm}: " + ", ".join(f"{k} {fmt(v)}" for k, v in early_loss.items()),
            "held if no-warmup's is the highest",
            early_loss["no-warmup"] > early_loss["linear"] and early_loss["no-warmup"] > early_loss["noam"],
        ),
        Finding(
            "Warmup gives an equal or better final loss",
            "final val loss: " + ", ".join(f"{k} {fmt(v)}" for k, v in loss.items()),
            f"held if linear warmup is not worse than no warmup by more than {LOSS_TOLERANCE} nats",
            not worse(loss["linear"], loss["no-warmup"]),
        ),
    ]
    figures = [
        curves_figure(
            "lab_warmup_update_ratio",
            "Update size relative to the weights",
            "Global ||W_after - W_before|| / ||W_before|| per step (metrics.jsonl: update_norm / param_norm).",
            {k: (r.steps, ratio[k]) for k, r in rec.items()},
            "||dW|| / ||W||",
        ),
        curves_figure(
            "lab_warmup_grad_norm",
            "Gradient norm in early training",
            "grad_norm_preclip per step (no clipping in this study).",
            {k: (r.steps, r.series("grad_norm_preclip")) for k, r in rec.items()},
            "gradient norm",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=figures,
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={
            "early_update_ratio": upd,
            "first_update_ratio": first,
            "early_grad_max": gmax,
            "early_loss_max": early_loss,
            "final_val_loss": loss,
        },
    )

"""Studies of the architecture at initialization and in training: norm placement, residuals, init schemes.

Fresh-init profiles come from lab/probes.py (the run's own initial weights, median over a few real batches);
training outcomes come from each run's directory. Every Finding states the numbers and the test applied.
"""

from __future__ import annotations

import math

import numpy as np

from flowtrain.lab.common import LabContext, read_flow_kind, read_run, tiny_overrides, variant_config
from flowtrain.lab.figures import profile_figure
from flowtrain.lab.probes import InitProfile, init_profile
from flowtrain.lab.study import GUARD_WARN_ONLY, StudyOutcome, Variant, scale, settings_rows, train_all
from flowtrain.lab.verdicts import Finding, fmt

# A training loss difference below this many nats is within run-to-run noise at this size: "no difference".
LOSS_TOLERANCE = 0.02


def probe(ctx: LabContext, common: dict, variant: Variant, n_batches: int) -> InitProfile:
    settings = {**GUARD_WARN_ONLY, **common, **variant.settings}
    return init_profile(variant_config(ctx, variant.name, tiny_overrides(ctx, **settings)), n_batches)


def block_ratio(p: InitProfile) -> float:
    """Gradient norm of the last block over that of the first block."""
    blocks = [i for i, name in enumerate(p.layers) if name.startswith("block.")]
    return float(p.grad_norm[blocks[-1]] / p.grad_norm[blocks[0]])


def depth_ratio(resid: np.ndarray) -> float:
    """||dL/dh_0|| / ||dL/dh_L||: below 1 the gradient shrinks on its way to the input."""
    return float(resid[0] / resid[-1]) if resid[-1] > 0 else math.nan


def final_loss(run_dir) -> float:
    return read_run(run_dir).final_val_loss()


def worse(a: float, b: float) -> bool:
    """a is a worse (higher) loss than b by more than the noise tolerance; NaN (diverged) counts as worse."""
    if not math.isfinite(a):
        return math.isfinite(b)
    return math.isfinite(b) and a > b + LOSS_TOLERANCE


def _init_figures(profiles: dict[str, InitProfile], what: str) -> list:
    return [
        profile_figure(
            "lab_init_layer_grad_norm",
            "Per-layer gradient norm at initialization",
            f"L2 norm of each layer's gradient with the initial weights ({what}), median over the probe batches. "
            "Parameters are grouped into embedding, block.i and head.",
            {k: p.layers for k, p in profiles.items()},
            {k: p.grad_norm for k, p in profiles.items()},
            "gradient L2 norm",
        ),
        profile_figure(
            "lab_init_residual_gradient",
            "Residual-stream gradient along depth at initialization",
            "||dL/dh_l|| at each block boundary (h_0 enters the first block, h_L leaves the last), median over the "
            "probe batches. A line falling toward h_0 is a vanishing gradient; rising toward h_0, an exploding one.",
            {k: p.depth for k, p in profiles.items()},
            {k: p.resid_grad_norm for k, p in profiles.items()},
            "||dL/dh_l||",
        ),
        profile_figure(
            "lab_init_activation_rms",
            "Activation RMS along depth at initialization",
            "RMS of the residual stream h_l at each block boundary with the initial weights.",
            {k: p.depth for k, p in profiles.items()},
            {k: p.act_rms for k, p in profiles.items()},
            "RMS(h_l)",
        ),
    ]


# ---- norm placement -----------------------------------------------------------------------------------------


def norm_placement(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 40, 300)
    warmup = steps // 5
    common = {
        "model__n_layer": 6,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 4,
        "optim__lr": 3e-3,
    }
    variants = [
        Variant(f"{p}-{'warmup' if w else 'no-warmup'}", {"model__norm_placement": p, "schedule__warmup_steps": w}, lab)
        for p, lab in (("pre", "pre-norm"), ("post", "post-norm"), ("none", "no norm"))
        for w in (0, warmup)
    ]
    profiles = {p: probe(ctx, common, variants[2 * i], scale(ctx, 2, 8)) for i, p in enumerate(("pre", "post", "none"))}
    runs = train_all(ctx, common, variants)
    ratios = {p: block_ratio(prof) for p, prof in profiles.items()}
    loss = {v.name: final_loss(runs[v.name]) for v in variants}
    gap = {p: loss[f"{p}-no-warmup"] - loss[f"{p}-warmup"] for p in ("pre", "post", "none")}
    findings = [
        Finding(
            "At initialization post-norm's gradient grows toward the output more than pre-norm's "
            "(Xiong et al. 2020, Fig. 3)",
            f"last/first block gradient norm: post-norm {fmt(ratios['post'])}, pre-norm {fmt(ratios['pre'])}",
            "held if post-norm's ratio > pre-norm's",
            ratios["post"] > ratios["pre"],
        ),
        Finding(
            "Pre-norm's per-block gradient norms are roughly uniform in depth at initialization",
            f"last/first block ratio {fmt(ratios['pre'])}; per block "
            + ", ".join(fmt(v) for v, n in zip(profiles["pre"].grad_norm, profiles["pre"].layers) if "block" in n),
            "held if 0.5 <= ratio <= 2",
            0.5 <= ratios["pre"] <= 2,
        ),
        Finding(
            "Post-norm needs learning-rate warmup: without it the final loss is worse",
            f"final val loss post-norm: no warmup {fmt(loss['post-no-warmup'])}, warmup {fmt(loss['post-warmup'])}",
            f"held if no-warmup is higher by more than {LOSS_TOLERANCE} nats",
            worse(loss["post-no-warmup"], loss["post-warmup"]),
        ),
        Finding(
            "Pre-norm depends less on warmup than post-norm (smaller no-warmup minus warmup loss gap)",
            f"gap (no warmup - warmup): pre-norm {fmt(gap['pre'])}, post-norm {fmt(gap['post'])} nats",
            "held if pre-norm's gap < post-norm's gap",
            bool(gap["pre"] < gap["post"]) if all(math.isfinite(g) for g in gap.values()) else False,
        ),
        Finding(
            "Without any normalization (same init), training reaches this loss",
            f"final val loss no norm: no warmup {fmt(loss['none-no-warmup'])}, warmup {fmt(loss['none-warmup'])}; "
            f"init last/first block ratio {fmt(ratios['none'])}",
            "reported only",
            None,
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(
            {f"{p}-norm" if p != "none" else "no norm": prof for p, prof in profiles.items()},
            "one per placement; warmup does not change the initial weights",
        ),
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={"init_block_ratio": ratios, "final_val_loss": loss, "warmup_gap": gap},
    )


# ---- residual connections -----------------------------------------------------------------------------------


def residuals(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 30, 300)
    common = {
        "model__n_layer": 12,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 3,
        "optim__lr": 1e-3,
    }
    classic = {"model__norm_placement": "none", "model__init": "xavier"}
    gpt = {"model__norm_placement": "pre"}
    variants = [
        Variant("plain-residual", {**classic, "model__residual": True}, "no norm, Xavier init, with skips"),
        Variant("plain-no-residual", {**classic, "model__residual": False}, "no norm, Xavier init, no skips"),
        Variant("prenorm-residual", {**gpt, "model__residual": True}, "pre-norm GPT, with skips"),
        Variant("prenorm-no-residual", {**gpt, "model__residual": False}, "pre-norm GPT, no skips"),
    ]
    profiles = {v.name: probe(ctx, common, v, scale(ctx, 2, 8)) for v in variants}
    runs = train_all(ctx, common, variants)
    ratio = {k: depth_ratio(p.resid_grad_norm) for k, p in profiles.items()}
    loss = {k: final_loss(d) for k, d in runs.items()}
    trained = {}
    for k, d in runs.items():
        depth = read_flow_kind(d, "depth")
        tail = depth.stats["resid_grad_norm"][:, -max(1, len(depth.steps) // 10) :]
        trained[k] = depth_ratio(np.nanmedian(tail, axis=1))
    findings = [
        Finding(
            "Without residual connections the gradient vanishes with depth: at the first block it is orders of "
            "magnitude below the last (He et al. 2016)",
            f"||dL/dh_0|| / ||dL/dh_L|| at init, no norm, 12 blocks: without skips {fmt(ratio['plain-no-residual'])}",
            "held if below 1e-2",
            ratio["plain-no-residual"] < 1e-2,
        ),
        Finding(
            "With residual connections the gradient reaches the first block undiminished",
            f"same ratio with skips: {fmt(ratio['plain-residual'])}",
            "held if at least 0.1",
            ratio["plain-residual"] >= 0.1,
        ),
        Finding(
            "Removing the skips from a pre-norm GPT also makes its gradient vanish",
            f"ratio at init, pre-norm: without skips {fmt(ratio['prenorm-no-residual'])}, with skips "
            f"{fmt(ratio['prenorm-residual'])}; after training (median of the last tenth of steps): without "
            f"{fmt(trained['prenorm-no-residual'])}, with {fmt(trained['prenorm-residual'])}",
            "held if the no-skip ratio at init is below 1e-2 (each block's LayerNorm divides the backward signal "
            "by its input's RMS, which can keep it from vanishing)",
            ratio["prenorm-no-residual"] < 1e-2,
        ),
        Finding(
            "Residual connections train deep stacks better (lower final loss)",
            f"final val loss: no norm {fmt(loss['plain-residual'])} with vs {fmt(loss['plain-no-residual'])} "
            f"without skips; pre-norm {fmt(loss['prenorm-residual'])} with vs {fmt(loss['prenorm-no-residual'])} "
            "without",
            f"held if both with-skip runs are lower by more than {LOSS_TOLERANCE} nats",
            worse(loss["plain-no-residual"], loss["plain-residual"])
            and worse(loss["prenorm-no-residual"], loss["prenorm-residual"]),
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(profiles, "one per variant"),
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={"init_depth_ratio": ratio, "trained_depth_ratio": trained, "final_val_loss": loss},
    )


# ---- initialization schemes ---------------------------------------------------------------------------------


def growth(values: np.ndarray) -> float:
    """Value at the last block boundary over the first block's output (h_L / h_1)."""
    return float(values[-1] / values[1]) if values[1] > 0 else math.nan


def init_schemes(ctx: LabContext) -> StudyOutcome:
    steps = scale(ctx, 30, 300)
    common = {
        "model__n_layer": 8,
        "model__n_embd": scale(ctx, 32, 64),
        "model__block_size": scale(ctx, 32, 64),
        "train__batch_size": scale(ctx, 8, 16),
        "train__max_steps": steps,
        "train__eval_interval": steps // 3,
        "schedule__warmup_steps": steps // 10,
    }
    variants = [
        Variant("normal", {"model__init": "normal"}, "N(0, 0.02) everywhere"),
        Variant("xavier", {"model__init": "xavier"}, "Xavier/Glorot uniform on Linear weights"),
        Variant("he", {"model__init": "kaiming"}, "He/Kaiming normal (fan-in, ReLU gain)"),
        Variant("scaled", {"model__init": "scaled"}, "N(0, 0.02), residual projections / sqrt(2L)"),
    ]
    profiles = {v.name: probe(ctx, common, v, scale(ctx, 2, 8)) for v in variants}
    runs = train_all(ctx, common, variants)
    act = {k: growth(p.act_rms) for k, p in profiles.items()}
    grad = {k: float(p.resid_grad_norm[1] / p.resid_grad_norm[-1]) for k, p in profiles.items()}
    top = {k: float(p.act_rms[-1]) for k, p in profiles.items()}
    loss = {k: final_loss(d) for k, d in runs.items()}
    others = [k for k in act if k != "scaled"]
    findings = [
        Finding(
            "Scaled residual init (GPT-2: output projections / sqrt(2L)) keeps the residual stream's RMS nearly "
            "flat with depth, flatter than the other schemes",
            "RMS growth h_L/h_1 at init: " + ", ".join(f"{k} {fmt(v)}" for k, v in act.items()),
            "held if scaled has the smallest growth",
            all(act["scaled"] < act[k] for k in others),
        ),
        Finding(
            "Larger-variance inits (Xavier, He) make activations grow faster with depth than N(0, 0.02)",
            "RMS at the top h_L: " + ", ".join(f"{k} {fmt(v)}" for k, v in top.items()),
            "held if both Xavier's and He's RMS growth h_L/h_1 exceed normal's",
            act["xavier"] > act["normal"] and act["he"] > act["normal"],
        ),
        Finding(
            "The gradient grows toward the input as activations grow; scaled init keeps it flattest",
            "residual gradient ratio ||dL/dh_1|| / ||dL/dh_L|| at init: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in grad.items()),
            "held if scaled's ratio is the closest to 1 (in log terms)",
            all(abs(math.log(grad["scaled"])) < abs(math.log(grad[k])) for k in others),
        ),
        Finding(
            "Final loss after training with each init",
            ", ".join(f"{k} {fmt(v)}" for k, v in loss.items()),
            "reported only",
            None,
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(profiles, "one per scheme"),
        run_dirs=[runs[v.name] for v in variants],
        settings=settings_rows(common, variants),
        measurements={"act_growth": act, "grad_ratio": grad, "top_act_rms": top, "final_val_loss": loss},
    )

"""Studies of the architecture at initialization and in training: norm placement, residuals, init schemes.

Fresh-init profiles come from lab/probes.py (each seed's own initial weights, median over a few real batches);
training outcomes come from each run's directory. Every number is measured once per seed, and every Finding
states the numbers and the comparisons its verdict rests on (lab/verdicts.py).
"""

from __future__ import annotations

import math

import numpy as np

from flowtrain.lab.common import LabContext, read_flow_kind, variant_config
from flowtrain.lab.figures import profile_figure
from flowtrain.lab.probes import InitProfile, init_profile
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
from flowtrain.lab.verdicts import Finding, above, below, diverged_high, fmt_seeds, less, more
from flowtrain.report.load import layer_labels


def probe(ctx: LabContext, common: dict, variant: Variant, n_batches: int) -> list[InitProfile]:
    """The variant's initial gradient flow under every seed of the study."""
    out = []
    for seed in ctx.seeds:
        cfg = variant_config(ctx, variant.name, seeded_overrides(ctx, common, variant, seed))
        out.append(init_profile(cfg, n_batches))
    return out


def block_ratio(p: InitProfile) -> float:
    """Gradient norm of the last block over that of the first block."""
    blocks = [i for i, name in enumerate(p.layers) if name.startswith("block.")]
    return float(p.grad_norm[blocks[-1]] / p.grad_norm[blocks[0]])


def depth_ratio(resid: np.ndarray) -> float:
    """||dL/dh_0|| / ||dL/dh_L||: below 1 the gradient shrinks on its way to the input."""
    return float(resid[0] / resid[-1]) if resid[-1] > 0 else math.nan


def final_losses(records: dict[str, list]) -> dict[str, np.ndarray]:
    """Final val loss per variant and seed; a diverged run (no finite loss) counts as +inf, worse than any."""
    return {k: diverged_high([r.final_val_loss() for r in recs]) for k, recs in records.items()}


def seeds_of(values: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """name -> per-seed numbers as plain lists (verdicts.json)."""
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in values.items()}


def _init_figures(profiles: dict[str, list[InitProfile]], what: str) -> list:
    first = {k: ps[0] for k, ps in profiles.items()}
    return [
        profile_figure(
            "lab_init_layer_grad_norm",
            "Per-layer gradient norm at initialization",
            f"L2 norm of each layer's gradient with the initial weights ({what}), median over the probe batches, "
            "one line per seed. Parameters are grouped into embedding, block.i and head; with tied weights the "
            "embedding layer holds the matrix shared with the output head and the head only the final norm.",
            {k: layer_labels(p.layers, p.tied) for k, p in first.items()},
            {k: [p.grad_norm for p in ps] for k, ps in profiles.items()},
            "gradient L2 norm",
        ),
        profile_figure(
            "lab_init_residual_gradient",
            "Residual-stream gradient along depth at initialization",
            "||dL/dh_l|| at each block boundary (h_0 enters the first block, h_L leaves the last), median over the "
            "probe batches, one line per seed. A line falling toward h_0 is a vanishing gradient.",
            {k: p.depth for k, p in first.items()},
            {k: [p.resid_grad_norm for p in ps] for k, ps in profiles.items()},
            "||dL/dh_l||",
        ),
        profile_figure(
            "lab_init_activation_rms",
            "Activation RMS along depth at initialization",
            "RMS of the residual stream h_l at each block boundary with the initial weights, one line per seed.",
            {k: p.depth for k, p in first.items()},
            {k: [p.act_rms for p in ps] for k, ps in profiles.items()},
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
    records = read_all(runs)
    ratios = per_seed(profiles, block_ratio)
    loss = final_losses(records)
    with np.errstate(invalid="ignore"):  # inf - inf: both runs diverged, the gap is undefined
        gap = {p: loss[f"{p}-no-warmup"] - loss[f"{p}-warmup"] for p in ("pre", "post", "none")}
    cut = {p: ended_before_warmup(f"{p}-warmup", ctx.seeds, records[f"{p}-warmup"], warmup) for p in ("pre", "post")}
    pre_blocks = [
        fmt_seeds([p.grad_norm[i] for p in profiles["pre"]], log=True)
        for i, n in enumerate(profiles["pre"][0].layers)
        if n.startswith("block.")
    ]
    findings = [
        Finding(
            "At initialization post-norm's gradient grows toward the output more than pre-norm's "
            "(Xiong et al. 2020, Fig. 3)",
            f"last/first block gradient norm: post-norm {fmt_seeds(ratios['post'], log=True)}, pre-norm "
            f"{fmt_seeds(ratios['pre'], log=True)}",
            "post-norm's ratio above pre-norm's (log10)",
            [more("post-norm", ratios["post"], "pre-norm", ratios["pre"], log=True)],
        ),
        Finding(
            "Pre-norm's per-block gradient norms are roughly uniform in depth at initialization",
            f"last/first block ratio {fmt_seeds(ratios['pre'], log=True)}; per block " + ", ".join(pre_blocks),
            "ratio above 0.5 and below 2 (log10)",
            [above("pre-norm", ratios["pre"], 0.5, log=True), below("pre-norm", ratios["pre"], 2, log=True)],
        ),
        Finding(
            "Post-norm needs learning-rate warmup: without it the final loss is worse",
            f"final val loss post-norm: no warmup {fmt_seeds(loss['post-no-warmup'])}, warmup "
            f"{fmt_seeds(loss['post-warmup'])}",
            "no-warmup's loss above warmup's",
            [more("no warmup", loss["post-no-warmup"], "warmup", loss["post-warmup"])],
            not_judged=cut["post"],
        ),
        Finding(
            "Pre-norm depends less on warmup than post-norm (smaller no-warmup minus warmup loss gap)",
            f"gap (no warmup - warmup): pre-norm {fmt_seeds(gap['pre'])}, post-norm {fmt_seeds(gap['post'])} nats",
            "pre-norm's gap below post-norm's",
            [less("pre-norm gap", gap["pre"], "post-norm gap", gap["post"])],
            not_judged=cut["pre"] or cut["post"],
        ),
        Finding(
            "Without any normalization (same init), training reaches this loss",
            f"final val loss no norm: no warmup {fmt_seeds(loss['none-no-warmup'])}, warmup "
            f"{fmt_seeds(loss['none-warmup'])}; init last/first block ratio {fmt_seeds(ratios['none'], log=True)}",
            "reported only",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(
            {f"{p}-norm" if p != "none" else "no norm": prof for p, prof in profiles.items()},
            "one per placement; warmup does not change the initial weights",
        ),
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "init_block_ratio": seeds_of(ratios),
            "final_val_loss": seeds_of(loss),
            "warmup_gap": seeds_of(gap),
        },
    )


# ---- residual connections -----------------------------------------------------------------------------------


def _trained_depth_ratio(run_dir) -> float:
    """||dL/dh_0|| / ||dL/dh_L|| after training: median over the last tenth of the monitored steps."""
    depth = read_flow_kind(run_dir, "depth")
    tail = depth.stats["resid_grad_norm"][:, -max(1, len(depth.steps) // 10) :]
    return depth_ratio(np.nanmedian(tail, axis=1))


TWINS = {"plain-residual": "plain-no-residual", "prenorm-residual": "prenorm-no-residual"}  # with -> without


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
    ratio = per_seed(profiles, lambda p: depth_ratio(p.resid_grad_norm))
    loss = final_losses(read_all(runs))
    trained = per_seed(runs, _trained_depth_ratio)
    findings = [
        Finding(
            "Without residual connections the gradient vanishes with depth: at the first block it is orders of "
            "magnitude below the last (He et al. 2016)",
            "||dL/dh_0|| / ||dL/dh_L|| at init, no norm, 12 blocks: without skips "
            + fmt_seeds(ratio["plain-no-residual"], log=True),
            "ratio below 1e-2 (log10)",
            [below("no-skip ratio", ratio["plain-no-residual"], 1e-2, log=True)],
        ),
        Finding(
            "With residual connections the gradient reaches the first block undiminished",
            f"same ratio with skips: {fmt_seeds(ratio['plain-residual'], log=True)}",
            "ratio above 0.1 (log10)",
            [above("with-skip ratio", ratio["plain-residual"], 0.1, log=True)],
        ),
        Finding(
            "Removing the skips from a pre-norm GPT also makes its gradient vanish",
            f"ratio at init, pre-norm: without skips {fmt_seeds(ratio['prenorm-no-residual'], log=True)}, with "
            f"skips {fmt_seeds(ratio['prenorm-residual'], log=True)}; after training (median of the last tenth of "
            f"steps): without {fmt_seeds(trained['prenorm-no-residual'], log=True)}, with "
            f"{fmt_seeds(trained['prenorm-residual'], log=True)}",
            "the no-skip ratio at init below 1e-2 (log10; each block's LayerNorm divides the backward signal by "
            "its input's RMS, which can keep it from vanishing)",
            [below("no-skip ratio", ratio["prenorm-no-residual"], 1e-2, log=True)],
        ),
        Finding(
            "Residual connections train deep stacks better (lower final loss)",
            f"final val loss: no norm {fmt_seeds(loss['plain-residual'])} with vs "
            f"{fmt_seeds(loss['plain-no-residual'])} without skips; pre-norm {fmt_seeds(loss['prenorm-residual'])} "
            f"with vs {fmt_seeds(loss['prenorm-no-residual'])} without",
            "both with-skip losses below their no-skip twins'",
            [less(k, loss[k], twin, loss[twin]) for k, twin in TWINS.items()],
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(profiles, "one per variant"),
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "init_depth_ratio": seeds_of(ratio),
            "trained_depth_ratio": seeds_of(trained),
            "final_val_loss": seeds_of(loss),
        },
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
    act = per_seed(profiles, lambda p: growth(p.act_rms))
    grad = per_seed(profiles, lambda p: p.resid_grad_norm[1] / p.resid_grad_norm[-1])
    flatness = {k: np.abs(np.log10(v)) for k, v in grad.items()}  # decades away from a flat profile
    top = per_seed(profiles, lambda p: p.act_rms[-1])
    loss = final_losses(read_all(runs))
    others = [k for k in act if k != "scaled"]
    findings = [
        Finding(
            "Scaled residual init (GPT-2: output projections / sqrt(2L)) keeps the residual stream's RMS nearly "
            "flat with depth, flatter than the other schemes",
            "RMS growth h_L/h_1 at init: " + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in act.items()),
            "scaled's growth below each other scheme's (log10)",
            [less("scaled", act["scaled"], k, act[k], log=True) for k in others],
        ),
        Finding(
            "Larger-variance inits (Xavier, He) make activations grow faster with depth than N(0, 0.02)",
            "RMS at the top h_L: " + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in top.items()),
            "Xavier's and He's RMS growth h_L/h_1 above normal's (log10)",
            [more(k, act[k], "normal", act["normal"], log=True) for k in ("xavier", "he")],
        ),
        Finding(
            "The gradient grows toward the input as activations grow; scaled init keeps it flattest",
            "residual gradient ratio ||dL/dh_1|| / ||dL/dh_L|| at init: "
            + ", ".join(f"{k} {fmt_seeds(v, log=True)}" for k, v in grad.items()),
            "scaled's |log10 ratio| (decades from flat) below each other scheme's",
            [less("scaled", flatness["scaled"], k, flatness[k]) for k in others],
        ),
        Finding(
            "Final loss after training with each init",
            ", ".join(f"{k} {fmt_seeds(v)}" for k, v in loss.items()),
            "reported only",
        ),
    ]
    return StudyOutcome(
        findings=findings,
        figures=_init_figures(profiles, "one per scheme"),
        runs=runs,
        settings=settings_rows(common, variants),
        measurements={
            "act_growth": seeds_of(act),
            "grad_ratio": seeds_of(grad),
            "top_act_rms": seeds_of(top),
            "final_val_loss": seeds_of(loss),
        },
    )

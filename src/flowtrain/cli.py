"""The `flowtrain` command. The only place that turns a FlowtrainError into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
from pathlib import Path

from flowtrain import __version__
from flowtrain.errors import FlowtrainError

EPILOG_OVERRIDES = (
    "Config overrides are dotted key=value pairs, e.g. model.n_layer=6 optim.lr=3e-4 train.max_steps=500."
)


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate key=value overrides from positional arguments."""
    overrides = [x for x in items if "=" in x and not Path(x).exists()]
    rest = [x for x in items if x not in overrides]
    return rest, overrides


def cmd_prepare(args: argparse.Namespace) -> int:
    from flowtrain.config import load_config
    from flowtrain.data.prepare import prepare_dataset

    sources, overrides = _split_overrides(args.items)
    if sources:
        overrides.append("data.sources=[" + ",".join(repr(s) for s in sources) + "]")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    cfg = load_config(args.config, overrides)
    out = prepare_dataset(cfg.data, Path(args.out))
    print(f"prepared dataset: {out}")
    return 0


def _tune_process(cfg) -> None:
    """Process-wide tuning is the command's business, never a library constructor's: on the CPU, keep freed
    tensor memory in the process (train.tune_allocator; train/runtime.py: tune_cpu_allocator)."""
    from flowtrain.train.runtime import select_device, tune_cpu_allocator

    if cfg.train.tune_allocator and select_device(cfg.train.device).type == "cpu":
        tune_cpu_allocator()


def _owns_process() -> bool:
    """Whether this CLI is the program (`flowtrain`, `python -m flowtrain`, `torchrun -m flowtrain`), not a
    function some other code called: then process-wide settings may last until the process ends."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name == "flowtrain.__main__") or Path(sys.argv[0]).name == "flowtrain"


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume); SIGTERM / SIGINT stop it after the step it is in, with a checkpoint (interrupts.py)."""
    from flowtrain.config import load_config
    from flowtrain.interrupts import Interrupted, StopOnSignals, exit_code, where_it_stands
    from flowtrain.train.load import config_for_resume
    from flowtrain.train.run_files import run_of
    from flowtrain.train.trainer import Trainer

    rest, overrides = _split_overrides(args.items)
    if rest:
        raise FlowtrainError(f"unexpected argument {rest[0]!r}; overrides look like key.sub=value, configs go after -c")
    if args.resume:
        cfg = config_for_resume(Path(args.resume), overrides)
    else:
        cfg = load_config(args.config, overrides)
    _tune_process(cfg)
    resume = Path(args.resume) if args.resume else None
    stops = StopOnSignals(to_the_end=_owns_process())
    try:
        with stops:
            stops.run_root = run_of(resume) if resume is not None else None
            trainer = Trainer(cfg, resume_dir=resume, stop_after=args.stop_after)
            stops.trainer, stops.run_root = trainer, trainer.run.root
            summary = trainer.run_loop()
    except Interrupted as exc:
        print(f"flowtrain: stopped by {exc.name}; {where_it_stands(stops.run_root)}", file=sys.stderr)
        return exit_code(exc.signum)
    print(f"run directory: {summary.run_dir}")
    if summary.stopped is not None:
        signum = int(getattr(signal.Signals, summary.stopped, signal.SIGTERM))
        if summary.checkpoint is None:
            what = f"before its first step, nothing to save: flowtrain train --resume {summary.run_dir} starts it over"
        else:
            what = (
                f"after step {summary.steps}, checkpoint {summary.checkpoint} holds it: "
                f"flowtrain train --resume {summary.run_dir} continues from it"
            )
        print(f"flowtrain: stopped by {summary.stopped} {what}", file=sys.stderr)
        return exit_code(signum)
    if summary.best_val_loss is not None:
        print(f"best val loss: {summary.best_val_loss:.4f}")
    if summary.sample:
        print("sample:")
        print(summary.sample)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from flowtrain.sample import generate
    from flowtrain.train.load import load_trained

    loaded = load_trained(Path(args.run), args.checkpoint)
    tok = loaded.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    new = generate(
        loaded.model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=None if args.no_stop else tok.eot_id,
    )
    sys.stdout.write(args.prompt + tok.decode(new) + "\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flowtrain.report import build_report

    runs = [Path(r) for r in args.runs]
    if args.out:
        out = Path(args.out)
    elif len(runs) == 1:
        out = runs[0] / "report.html"
    else:
        raise FlowtrainError("several run directories need -o REPORT.html (one report for all of them)")
    figures = Path(args.figures) if args.figures else None
    written = build_report(runs, out, figures_dir=figures, notice=lambda m: print(f"flowtrain: {m}", file=sys.stderr))
    print(f"report: {written}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from flowtrain.config import load_config
    from flowtrain.lab import STUDIES, run_study

    if args.study not in STUDIES:
        raise FlowtrainError(f"unknown study {args.study!r}; choose one of: {', '.join(STUDIES)}")
    _tune_process(load_config(None, ["train.device=cpu"]))  # the studies train on the CPU (lab/common.py)
    run_study(args.study, quick=args.quick, seeds=args.seeds, data=args.data, out=args.out, echo=print)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """A few real training steps under the microscope (every statistic, every step), then the verdict.

    The steps are the trainer's own loop, writing into a scratch directory (a run directory given is only
    read); the records come from the loop's `on_record`."""
    import tempfile

    from flowtrain.config import load_config
    from flowtrain.flow.diagnose import diagnose
    from flowtrain.train.load import config_for_resume
    from flowtrain.train.trainer import Trainer

    rest, overrides = _split_overrides(args.items)
    if len(rest) > 1:
        raise FlowtrainError(f"diagnose takes one run directory (got {len(rest)}); overrides look like key=value")
    if args.steps < 1:
        raise FlowtrainError("--steps must be >= 1")
    if rest and Path(rest[0]).is_dir():
        from flowtrain.integrations.recorded import diagnose_recorded, observed_config

        observed = observed_config(Path(rest[0]))
        if observed is not None:  # a run flowtrain observed in another loop: judged as recorded, never re-run
            if overrides or args.config:
                raise FlowtrainError(
                    f"{rest[0]} was recorded in another training loop (no flowtrain config to re-run): its steps are "
                    "judged as recorded; drop the overrides and -c"
                )
            result, source = diagnose_recorded(Path(rest[0]), args.steps, observed)
            print(result.to_json() if args.json else f"flowtrain diagnose: {source}\n{result.render()}")
            return 0
    # watch everything, act on nothing: no guard actions, no evaluations, no console or TensorBoard
    never = 2**31 - 1
    overrides += ["flow.enabled=true", "flow.interval=1", "guard.enabled=false", "log.console=false",
                  "log.tensorboard=false", "log.wandb=false", f"train.eval_interval={never}",
                  f"train.checkpoint_interval={never}", "train.eval_full_at_end=false"]  # fmt: skip
    records: list = []
    with tempfile.TemporaryDirectory(prefix="flowtrain-diagnose-") as scratch:
        if rest:
            run_dir = Path(rest[0])
            cfg = config_for_resume(run_dir, overrides)
            _tune_process(cfg)
            trainer = Trainer(cfg, resume_dir=run_dir, run_dir=Path(scratch) / "run", on_record=records.append)
            source = f"run {run_dir} at step {trainer.step}"
        else:
            cfg = load_config(args.config, [*overrides, f"train.out_dir={scratch}"])
            _tune_process(cfg)
            trainer = Trainer(cfg, on_record=records.append)
            start = f"from model.init_from={cfg.model.init_from}" if cfg.model.init_from else "at initialization"
            source = f"config {args.config or 'default'} {start}"
        for _ in trainer.steps(until=trainer.step + args.steps):
            pass
    from flowtrain.flow.health import Context

    result = diagnose(records, cfg.guard, Context.of(cfg))
    if args.json:
        print(result.to_json())
    else:
        print(f"flowtrain diagnose: {source}, {args.steps} step(s) on real batches")
        print(result.render())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flowtrain.interop import export_run

    done = export_run(Path(args.run), Path(args.out), args.checkpoint, verify=args.verify,
                      notice=lambda m: print(f"flowtrain: note: {m}", file=sys.stderr))  # fmt: skip
    print(f"exported {done.checkpoint} as {done.architecture}: {done.out}")
    if done.max_logit_diff is not None:
        print(f"verified: transformers' logits equal flowtrain's (max difference {done.max_logit_diff:.2g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowtrain",
        description="Train GPT-style language models and see how their gradients flow.",
    )
    parser.add_argument("--version", action="version", version=f"flowtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into a dataset directory",
        description="Tokenize text (files, directories, or the built-in python-stdlib / python-docs corpora) into "
        "memory-mapped token files with a train/val split.",
        epilog=EPILOG_OVERRIDES,
    )
    p.add_argument("items", nargs="*", metavar="SOURCE|KEY=VALUE", help="paths or built-in corpus names; overrides")
    p.add_argument("-c", "--config", help="a shipped config name or YAML path (its data: section is used)")
    p.add_argument("-o", "--out", required=True, help="the dataset directory to write")
    p.add_argument("--tokenizer", choices=["char", "byte", "bpe"], help="shortcut for data.tokenizer=...")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser(
        "train",
        help="train a model (default: a small GPT on the built-in corpus)",
        description="Train a GPT. With no arguments: the default config on the built-in Python corpus, offline.",
        epilog=EPILOG_OVERRIDES,
    )
    t.add_argument("items", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument(
        "-c",
        "--config",
        help="a shipped config name (default, shakespeare-char, shakespeare-fast, gpt2-124m) or a YAML path",
    )
    t.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (or a checkpoint dir)"
    )
    t.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after step N; resume later")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "diagnose",
        help="run a few steps under the microscope and say how the gradients flow",
        description="From a config (fresh initialization) or a run directory (its latest checkpoint), run a few "
        "real training steps in memory (nothing is written) and print a per-layer table (gradient norm, residual "
        "gradient, update ratio, activation RMS) with a plain-language verdict: healthy, vanishing, exploding, "
        "stalled or non-finite, its likely cause and what to try.",
        epilog=EPILOG_OVERRIDES,
    )
    d.add_argument("items", nargs="*", metavar="RUN_DIR|KEY=VALUE", help="a run directory and/or config overrides")
    d.add_argument("-c", "--config", help="a shipped config name or YAML path (when no RUN_DIR is given)")
    d.add_argument("--steps", type=int, default=5, help="training steps to observe (default 5)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("sample", help="generate text from a trained run", description="Generate text with a KV cache.")
    s.add_argument("run", metavar="RUN_DIR", help="a run directory or a checkpoints/step_N directory")
    s.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint", default="latest", help="latest, best, or a step number")
    s.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    s.set_defaults(func=cmd_sample)

    x = sub.add_parser(
        "export",
        help="write a run as a Hugging Face transformers model directory (GPT-2 or Llama layout)",
        description="Write a run's checkpoint as a transformers model directory: model.safetensors, config.json "
        "(GPT2LMHeadModel for learned positions + LayerNorm + GELU/ReLU, LlamaForCausalLM for RoPE + RMSNorm + "
        "SwiGLU), generation_config.json and the tokenizer, for AutoModelForCausalLM / AutoTokenizer. A model "
        "that fits neither is refused, naming the option (docs/interop.md).",
    )
    x.add_argument("run", metavar="RUN_DIR", help="a run directory or a checkpoints/step_N directory")
    x.add_argument("-o", "--out", required=True, metavar="DIR", help="the directory to write (new, or an export)")
    x.add_argument("--checkpoint", default="latest", help="latest (the newest usable), best, or a step number")
    x.add_argument(
        "--verify", action="store_true", help="load DIR with transformers and compare logits (needs transformers)"
    )
    x.set_defaults(func=cmd_export)

    r = sub.add_parser(
        "report",
        help="write a self-contained HTML report of one or more runs",
        description="Read run directories (metrics, eval, flow statistics, alerts, config) and write one HTML file "
        "with inline figures that opens anywhere without network. Several runs are overlaid and their config "
        "differences tabled.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/NAME)")
    r.add_argument("-o", "--out", help="the HTML file to write (default: RUN_DIR/report.html for a single run)")
    r.add_argument("--figures", metavar="DIR", help="also write every figure as PNG and SVG into DIR")
    r.set_defaults(func=cmd_report)

    lab = sub.add_parser(
        "lab",
        help="run a gradient-flow study (norm-placement, residuals, activations, clipping, warmup, init)",
        description="Reproduce a textbook gradient-flow result on real data: trains the study's variants, writes "
        "their runs and one HTML report, and prints a verdict table computed from the measurements (docs/lab.md).",
    )
    lab.add_argument("study", metavar="STUDY", help="norm-placement, residuals, activations, clipping, warmup or init")
    lab.add_argument(
        "--quick", action="store_true", help="tiny settings, about a minute; its verdicts are indicative only"
    )
    lab.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="train every variant under N seeds (default 3; 1 with --quick); holds / contradicted needs >= 3",
    )
    lab.add_argument("--data", metavar="PATH", help="a text file or directory (default: the built-in Python corpus)")
    lab.add_argument("--out", metavar="DIR", help="where runs and report.html go (default: runs/lab/STUDY-TIME)")
    lab.set_defaults(func=cmd_lab)
    return parser


def _check_sample_args(args: argparse.Namespace) -> None:
    if args.command != "sample":
        return
    if args.max_new_tokens < 0:
        raise FlowtrainError("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        raise FlowtrainError("--temperature must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise FlowtrainError("--top-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise FlowtrainError("--top-p must be in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # positionals (sources, key=value overrides) may come after options; anything else is a real error
    unknown = [x for x in extra if x.startswith("-")]
    if unknown or (extra and not hasattr(args, "items")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.items = [*args.items, *extra]
    try:
        _check_sample_args(args)
        return args.func(args)
    except FlowtrainError as exc:
        print(f"flowtrain: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2: bad input; 3: the guard stopped training
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"flowtrain: error: no space left on the device{where}; free some space, then run the command again "
            "(a training run continues with flowtrain train --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # `train` handles its signals itself (interrupts.py)
        print("flowtrain: interrupted", file=sys.stderr)
        return 130

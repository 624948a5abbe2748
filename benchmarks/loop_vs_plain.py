"""The training loop's own throughput: flowtrain's shakespeare-char step against a plain PyTorch loop.

    python benchmarks/loop_vs_plain.py [--blocks 30] [--block 10] [--warmup 220]

In one process (so both see the same allocator setting, which `flowtrain train` makes process-wide): the
shakespeare-char Trainer with everything a run does (microscope at `auto`, guard, metrics.jsonl, no
TensorBoard) against the same model shape written with torch alone (benchmarks/_foreign.py: nanoGPT's block,
scaled_dot_product_attention, clip_grad_norm_) under torch.optim.AdamW as constructed by default (foreach) and
with fused=True. Alternating blocks of steps after a warm-up past `auto`'s every-step phase; printed: each
side's step time and the plain / flowtrain step-time ratio (above 1: flowtrain faster), median over block
pairs with quartiles. Issue 23 asks >= 1.3 against the default AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _foreign  # noqa: E402
from _common import corpus_path, shakespeare_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=220, help="untimed steps first (auto's every-step phase)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = args.warmup + args.blocks * args.block + 1
    quiet = [f"train.max_steps={total}", f"train.eval_interval={total}", f"train.checkpoint_interval={total}",
             "train.sample_tokens=0"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loop-") as tmp:
        trainer = shakespeare_trainer(Path(tmp), "flowtrain", quiet)
        loop = trainer.steps()
        data, vocab = _foreign.encoded(corpus_path())
        plain = {f"plain AdamW {kind}": _foreign.Run(data, vocab, torch.device("cpu"), None, fused=kind == "fused")
                 for kind in ("foreach", "fused")}  # fmt: skip
        sides = {"flowtrain": lambda: next(loop), **{k: run.train_step for k, run in plain.items()}}
        for step in sides.values():
            for _ in range(args.warmup):
                step()
        ms: dict[str, list[float]] = {name: [] for name in sides}
        for b in range(args.blocks):
            names = list(sides) if b % 2 == 0 else list(reversed(sides))
            for name in names:
                started = time.perf_counter()
                for _ in range(args.block):
                    sides[name]()
                ms[name].append((time.perf_counter() - started) * 1e3 / args.block)
        loop.close()
    print(f"step ms, median [min, max] over {args.blocks} blocks of {args.block} steps:")
    for name, values in ms.items():
        print(f"  {name:<20} {statistics.median(values):6.2f} [{min(values):.2f}, {max(values):.2f}]")
    for name in plain:
        ratios = [p / f for p, f in zip(ms[name], ms["flowtrain"], strict=True)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name} / flowtrain: {q2:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()

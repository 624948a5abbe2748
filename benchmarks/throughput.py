"""Training throughput of `shakespeare-char` (nanoGPT's CPU recipe) at fp32 and bf16 autocast.

Prints tokens/s, step time and MFU against the fp32 and bf16 matmul peaks measured in the same run.
Variants are interleaved in rounds so machine noise hits both alike; we report median [min, max].

    python benchmarks/throughput.py [--steps 60] [--rounds 3] [--threads 2]
    python benchmarks/throughput.py --device cuda --config gpt2-124m --variants bfloat16 bfloat16+compile

A variant is a train.dtype, optionally `+compile` (torch.compile). A step is one optimizer step (all of its
micro-batches) and ends when its loss is on the host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import matmul_peak, shakespeare_trainer, summarize, time_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="train.device (cpu, cuda, auto)")
    parser.add_argument("--config", default="shakespeare-char", help="the recipe (another one keeps its own data)")
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16"], help="DTYPE or DTYPE+compile")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cuda = args.device == "cuda"
    n = 8192 if cuda else 1024
    peaks = {d: matmul_peak(getattr(torch, d), n=n, device=args.device) for d in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for variant in args.variants:
            dtype, _, extra = variant.partition("+")
            overrides = [f"train.device={args.device}", f"train.dtype={dtype}", f"train.compile={extra == 'compile'}"]
            name = variant.replace("+", "-")
            trainers[variant] = shakespeare_trainer(Path(tmp), name, [*overrides, *args.overrides], args.config)
        first = next(iter(trainers.values()))
        flops_per_token = first.raw_model.flops_per_token()
        tokens_per_step = first.cfg.train.batch_size * first.cfg.model.block_size * first.cfg.train.grad_accum
        for t in trainers.values():
            time_steps(t, args.warmup)
        samples: dict[str, list[float]] = {d: [] for d in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                samples[name].append(statistics.median(time_steps(trainer, args.steps)))

    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(
        f"torch {torch.__version__}, {where}; model: {args.config} "
        f"({first.raw_model.num_parameters() / 1e6:.2f}M params, {tokens_per_step} tokens/step, "
        f"{flops_per_token / 1e6:.2f} MFLOP/token)"
    )
    fp32, bf16 = peaks["float32"] / 1e9, peaks["bfloat16"] / 1e9
    print(f"matmul peaks measured now ({n}x{n}): fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    header = f"{'variant':<18}{'step ms (median [min,max] of rounds)':<40}{'tokens/s':>12}"
    print(f"{header}{'MFU vs fp32':>13}{'MFU vs bf16':>13}")
    for name, per_round in samples.items():
        step = statistics.median(per_round)
        tps = tokens_per_step / step
        mfu32 = flops_per_token * tps / peaks["float32"]
        mfu16 = flops_per_token * tps / peaks["bfloat16"]
        print(f"{name:<18}{summarize([s * 1e3 for s in per_round]):<40}{tps:>12,.0f}{mfu32:>13.1%}{mfu16:>13.1%}")


if __name__ == "__main__":
    main()

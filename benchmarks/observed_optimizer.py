"""The observing AdamW step against torch's fused CPU AdamW step: time and bits.

    python benchmarks/observed_optimizer.py [--rounds 40] [--big]

Two copies of flowtrain's GPT (shakespeare-char: 4 layers, 128 wide; --big: 12 layers, 768 wide) with the same
weights and gradients, one stepped by torch.optim.AdamW(fused=True), one by flowtrain's ObservedAdamW (which
also measures ||W||, ||ΔW|| and sum(v) in its pass). Steps alternate between the two, the order flipping every
round; prints the median step time of each with its range, the ratio, and whether the weights are still
bit-identical after all the steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import corpus_path, summarize  # noqa: E402

from flowtrain.config import load_config  # noqa: E402
from flowtrain.model.gpt import GPT  # noqa: E402
from flowtrain.optim.observed import ObservedAdamW  # noqa: E402
from flowtrain.optim.optimizers import param_groups  # noqa: E402

BIG = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]


def compare(label: str, overrides: list[str], rounds: int) -> None:
    cfg = load_config("shakespeare-char", [f"data.sources=[{corpus_path()}]", *overrides])
    cfg.model.vocab_size = 65
    runs = {}
    for name in ("torch", "observing"):
        torch.manual_seed(0)
        model = GPT(cfg.model)
        hyper = {"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps}
        groups = param_groups(model, cfg.optim)
        opt = torch.optim.AdamW(groups, fused=True, **hyper) if name == "torch" else ObservedAdamW(groups, **hyper)
        runs[name] = (model, opt, [])
    assert runs["observing"][1].observing, runs["observing"][1].observing_note
    generator = torch.Generator().manual_seed(1)
    for r in range(rounds):
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in runs["torch"][0].parameters()]
        for model, _, _ in runs.values():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
        for name in ("torch", "observing") if r % 2 else ("observing", "torch"):
            _, opt, times = runs[name]
            started = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - started)
    same = all(torch.equal(a, b) for a, b in zip(runs["torch"][0].parameters(), runs["observing"][0].parameters()))
    medians = {name: statistics.median(times) * 1e3 for name, (_, _, times) in runs.items()}
    print(label)
    for name, (_, _, times) in runs.items():
        print(f"  {name:<9}: step ms median [min, max] {summarize([t * 1e3 for t in times])}")
    print(f"  observing / torch: {medians['observing'] / medians['torch']:.3f}; weights bit-identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    compare("shakespeare-char (4 layers, 128 wide; 0.8M parameters)", [], args.rounds)
    if args.big:
        compare("12 layers, 768 wide (85M parameters)", BIG, max(4, args.rounds // 4))


if __name__ == "__main__":
    main()

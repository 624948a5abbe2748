"""Step-time cost of the stability guard on CPU: shakespeare-char with the guard on vs off.

Both variants run in the same process, interleaved in rounds, with the microscope off in both so the
ratio isolates the guard. Prints the median step-time ratio and its spread over rounds.

    python benchmarks/guard_overhead.py [--steps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer, summarize, time_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "guard off": shakespeare_trainer(Path(tmp), "off", ["guard.enabled=false", "flow.enabled=false"]),
            "guard on": shakespeare_trainer(Path(tmp), "on", ["guard.enabled=true", "flow.enabled=false"]),
        }
        for trainer in variants.values():
            time_steps(trainer, 10)
        medians: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, trainer in variants.items():
                medians[name].append(statistics.median(time_steps(trainer, args.steps)))
    ratios = [on / off for on, off in zip(medians["guard on"], medians["guard off"])]
    for name, values in medians.items():
        print(f"{name:<10} step ms median [min, max] over rounds: {summarize([v * 1e3 for v in values])}")
    print(f"guard on / off step-time ratio: {summarize(ratios)}  (per-round medians, {args.rounds} rounds)")


if __name__ == "__main__":
    main()

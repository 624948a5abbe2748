"""False-alarm check: healthy shakespeare-char runs (the full 2000-step recipe) on several seeds.

A healthy run should see no guard action beyond `warn`. Prints, per seed, the final val loss and the
alerts by detector and action. Takes about 2 minutes per seed on 2 cores.

    python benchmarks/guard_false_alarms.py [--seeds 1 2 3 4 5] [--steps 2000]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            trainer = shakespeare_trainer(
                Path(tmp), f"seed{seed}", [f"train.seed={seed}", f"train.max_steps={args.steps}"]
            )
            summary = trainer.run_loop()
            alerts_path = summary.run_dir / "alerts.jsonl"
            alerts = [json.loads(x) for x in alerts_path.read_text().splitlines()] if alerts_path.exists() else []
            counts = collections.Counter((a["detector"], a["action"]) for a in alerts)
            actions = {a["action"] for a in alerts} - {"warn"}
            failures += bool(actions)
            print(
                f"seed {seed}: best val loss {summary.best_val_loss:.4f}; "
                f"alerts {dict(counts) or 'none'}; {'FALSE ALARM: ' + str(actions) if actions else 'no action'}"
            )
    print(f"{len(args.seeds) - failures} of {len(args.seeds)} healthy runs without any action beyond warn")


if __name__ == "__main__":
    main()

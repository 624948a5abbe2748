"""Precision of the health model: the shipped CPU configs at full length over several seeds must give no warning.

    python benchmarks/healthy_runs.py [--seeds 1 2 3 4 5] [--configs default shakespeare-char shakespeare-fast]

Each run is the config exactly as shipped (the main job `default` on the built-in corpus, `shakespeare-char`
and `shakespeare-fast` on Tiny Shakespeare), only the seed changed, with the guard and the microscope at their
defaults. It prints, per run, the warnings and critical findings (must be none), the guard's actions, the
information notes and the final val loss. gpt2-124m is a GPU config and is not run here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer  # noqa: E402

from flowtrain.flow import health  # noqa: E402
from flowtrain.sinks.jsonl import read_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--configs", nargs="+", default=["default", "shakespeare-char", "shakespeare-fast"])
    args = ap.parse_args()
    total = 0
    with tempfile.TemporaryDirectory(prefix="flowtrain-healthy-") as tmp:
        print(f"{'config':18s} {'seed':>4s} {'warnings':>8s} {'actions':10s} {'val loss':>8s} {'s':>5s}  notes")
        for config in args.configs:
            for seed in args.seeds:
                t0 = time.perf_counter()
                over = [f"train.seed={seed}", "train.sample_tokens=0", "log.tensorboard=false"]
                tr = shakespeare_trainer(Path(tmp), f"{config}-{seed}", over, config=config)
                tr.run_loop()
                alerts = read_jsonl(tr.run.root / "alerts.jsonl")
                bad = [a for a in alerts if a.get("severity") != "info" and a["detector"] != "guard"]
                verdict = health.run_verdict(alerts)
                evals = read_jsonl(tr.run.root / "eval.jsonl")
                val = next(e["val_loss"] for e in reversed(evals) if "val_loss" in e)
                total += len(bad)
                acted = ",".join(f"{k}x{v}" for k, v in verdict["actions"].items()) or "-"
                warned = "; ".join(f"{a['step']}:{a['detector']}" for a in bad)
                print(f"{config:18s} {seed:4d} {len(bad):8d} {acted:10s} {val:8.4f} {time.perf_counter() - t0:5.0f}  "
                      f"info: {','.join(verdict['info']) or '-'} {warned}", flush=True)  # fmt: skip
    print(f"warnings over all runs: {total}")


if __name__ == "__main__":
    main()

"""Quality per wall-clock second: recipes trained side by side on tinyshakespeare characters, one process.

    python benchmarks/race.py [--slice 25] [--eval-every 5] [--ablations] [--threads 2]

Every entrant is a real Trainer (guard, microscope at `auto`, metrics.jsonl: everything a run does, minus
TensorBoard, the console, checkpoints and the trainer's own evaluations). The entrants take turns of
`--slice` steps, the order rotating each round, so a slow minute of this shared machine hits all of them
alike. Only the time inside the training loop is counted: model building, data preparation and the
benchmark's own measurements are not. Every `--eval-every` seconds of an entrant's own training time, and at
its end, the whole validation split is evaluated (untimed). Printed: each entrant's val loss curve against its
training seconds, and the figures issue 23 asks of the fast recipe against `shakespeare-char` (nanoGPT's CPU
recipe): its val loss within shakespeare-char's time, and the time it takes to reach shakespeare-char's final
val loss. `--ablations` adds the recipe minus one lever each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer  # noqa: E402

QUIET = ["train.eval_interval=1000000", "train.checkpoint_interval=1000000", "train.eval_full_at_end=false",
         "train.sample_tokens=0", "train.keep_last=1"]  # fmt: skip
# the recipe minus one lever: what shakespeare-fast sets, put back to shakespeare-char's (or torch's) choice
ABLATIONS = {
    "fast - muon": ["optim.name=adamw", "optim.lr=3e-3", "optim.adamw_lr_scale=1"],  # AdamW's best peak in our trials
    "fast - adamw_lr_scale": ["optim.adamw_lr_scale=1"],  # the embedding and the norm gains at Muon's optim.lr
    "fast - batch 48": ["train.batch_size=12", "train.max_steps=2132"],  # the same tokens in nanoGPT's batches
    "fast - wsd": ["schedule.kind=cosine", "schedule.min_lr=1e-4"],
    "fast - warmup 25": ["schedule.warmup_steps=100"],  # shakespeare-char's warmup
}


@dataclass
class Entrant:
    name: str
    trainer: object
    steps: object = None  # the trainer's loop generator
    seconds: float = 0.0  # training time so far
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, step, whole-split val loss)
    done: bool = False
    next_eval: float = 0.0

    def evaluate(self) -> None:
        loss = self.trainer.evaluate(full=True)["val_loss"]
        self.curve.append((self.seconds, self.trainer.step, loss))

    def run(self, n: int, eval_every: float) -> None:
        """Up to n steps (fewer at an evaluation mark or the end), timed."""
        for _ in range(n):
            started = time.perf_counter()
            try:
                next(self.steps)
            except StopIteration:
                self.done = True
            self.seconds += time.perf_counter() - started
            if self.done or self.seconds >= self.next_eval:
                self.evaluate()
                self.next_eval = self.seconds + eval_every
            if self.done:
                return


def reached(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """The training seconds at the first evaluation at or below `target` (None if never)."""
    return next((t for t, _, loss in curve if loss <= target), None)


def loss_at(curve: list[tuple[float, int, float]], seconds: float) -> float:
    """The best val loss evaluated at or before `seconds` of training."""
    return min((loss for t, _, loss in curve if t <= seconds), default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=int, default=25, help="steps per turn")
    parser.add_argument("--eval-every", type=float, default=5.0, help="training seconds between evaluations")
    parser.add_argument("--ablations", action="store_true", help="also the recipe minus one lever each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", default="shakespeare-fast", help="the recipe raced against shakespeare-char")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the fast recipe (and its ablations)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plans = {"shakespeare-char": ("shakespeare-char", []), args.fast: (args.fast, args.overrides)}
    if args.ablations:
        plans.update({name: (args.fast, [*args.overrides, *extra]) for name, extra in ABLATIONS.items()})
    with tempfile.TemporaryDirectory(prefix="race-") as tmp:
        entrants = []
        for i, (name, (config, extra)) in enumerate(plans.items()):
            trainer = shakespeare_trainer(Path(tmp), f"run{i}", [*QUIET, *extra], config=config)
            entrants.append(Entrant(name, trainer, trainer.steps()))
        for e in entrants:
            e.evaluate()  # at step 0, untimed
            e.next_eval = args.eval_every
        turn = 0
        while not all(e.done for e in entrants):
            order = entrants[turn % len(entrants) :] + entrants[: turn % len(entrants)]
            for e in order:
                if not e.done:
                    e.run(args.slice, args.eval_every)
            turn += 1
    base, fast = entrants[0], entrants[1]
    print(f"{'entrant':<18} {'steps':>6} {'train s':>8} {'final val':>9}  val loss by training seconds")
    for e in entrants:
        points = "  ".join(f"{t:.0f}s:{loss:.3f}" for t, _, loss in e.curve)
        print(f"{e.name:<18} {e.trainer.step:>6} {e.seconds:>8.1f} {e.curve[-1][2]:>9.4f}  {points}")
    final, budget = base.curve[-1][2], base.seconds
    hit = reached(fast.curve, final)
    print(f"\n{fast.name} within shakespeare-char's {budget:.1f} s: val {loss_at(fast.curve, budget):.4f} "
          f"(target <= 1.65); finished in {fast.seconds:.1f} s at {fast.curve[-1][2]:.4f}")  # fmt: skip
    print(
        f"time to shakespeare-char's final val {final:.4f}: "
        + (f"{hit:.1f} s = {hit / budget:.2f} of its time (target <= 0.50)" if hit is not None else "never")
    )
    for e in entrants[2:]:
        hit = reached(e.curve, final)
        print(
            f"  {e.name:<16} final {e.curve[-1][2]:.4f} in {e.seconds:.1f} s; reaches {final:.4f} at "
            + (f"{hit:.1f} s" if hit is not None else "never")
        )


if __name__ == "__main__":
    main()

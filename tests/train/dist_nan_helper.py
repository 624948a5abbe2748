"""torchrun helper for test_distributed: a DDP run in which rank 1 alone sees a NaN gradient at one step.

The NaN is written after DDP's all-reduce (when the gradients are already identical on every rank), so only
rank 1's guard can see it: the test checks that every rank skips that step anyway and no rank diverges.
Usage: torchrun ... dist_nan_helper.py OUT_DIR NAN_STEP OVERRIDE...
"""

import json
import sys
from pathlib import Path

import torch

from flowtrain.config import load_config
from flowtrain.train.trainer import Trainer


def main() -> None:
    out_dir, nan_step, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    trainer = Trainer(load_config("default", overrides))
    rank = trainer.parallel.rank
    after_backward, agree = trainer.flow.after_backward, trainer.parallel.agree
    decisions = []
    poisoned = []

    def poison_then_observe() -> None:  # called right after the step's gradients are complete
        if rank == 1 and trainer.step + 1 == nan_step and not poisoned:  # once (a rollback replays the step)
            grad = trainer.state.named_params[3][1].grad
            grad = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP2: this rank's shard
            grad.view(-1)[0] = float("nan")
            poisoned.append(True)
        after_backward()

    def agree_and_record(verdict, guard, host_now):
        verdict = agree(verdict, guard, host_now)
        skip = verdict.skip is not None and bool(verdict.skip)
        decisions.append({"step": trainer.step + 1, "action": verdict.action, "skip": skip})
        return verdict

    trainer.flow.after_backward, trainer.parallel.agree = poison_then_observe, agree_and_record
    summary = trainer.run_loop()
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in trainer.state.named_params]
    weights = [p.detach().double().sum().item() for p in local]  # FSDP2: this rank's shards
    result = {"rank": rank, "steps": summary.steps, "decisions": decisions, "weights": weights}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

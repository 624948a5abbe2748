"""Step-time overhead of the gradient-flow microscope: monitoring off vs everything on, every step.

    python benchmarks/flow_overhead.py [--steps 40] [--rounds 7] [--big]

The nanoGPT CPU recipe (4 layers, 4 heads, 128 wide, context 64, batch 12, AdamW, clip 1.0) on Tiny
Shakespeare characters (random tokens if the file is missing). Two identical models train side by side, one
with a FlowMonitor (residual, activations, attention sample, logits, per-tensor stats and ΔW every step, a
collect() host transfer every step), the other without; rounds alternate which goes first, so drifts of a
shared machine hit both. Prints median step times, the ratio of medians and the spread of per-round ratios.
--big adds a 12-layer, 768-wide model (fewer steps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from flowtrain.flow.config import FlowConfig
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.model.loss import lm_loss
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.config import ClipConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def char_tokens() -> tuple[torch.Tensor, int]:
    if DATA.is_file():
        text = DATA.read_text(encoding="utf-8")
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        return torch.tensor([index[c] for c in text[:200_000]], dtype=torch.long), len(vocab)
    print(f"({DATA} not found: random tokens)")
    return torch.randint(0, 65, (200_000,)), 65


class Setup:
    def __init__(self, cfg: ModelConfig, monitored: bool, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = GPT(cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
        self.clipper = GradClipper(ClipConfig(kind="norm", max_norm=1.0))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.monitor = FlowMonitor(self.model, self.opt, FlowConfig(interval=1)) if monitored else None
        self.step = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = lm_loss(self.model(x), y).loss
        loss.backward()
        if self.monitor:
            self.monitor.after_backward()
        clip = self.clipper(self.params)
        self.opt.step()
        if self.monitor:
            self.monitor.after_step(clip_stats=clip)
            self.monitor.collect(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # what a trainer's log line costs, on both sides
        self.step += 1
        return time.perf_counter() - t0


def measure(cfg: ModelConfig, batch: int, steps: int, rounds: int, tokens: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    off, on = Setup(cfg, False), Setup(cfg, True)

    def batch_at() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(tokens) - cfg.block_size - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s : s + cfg.block_size] for s in starts])
        y = torch.stack([tokens[s + 1 : s + cfg.block_size + 1] for s in starts])
        return x, y

    for setup in (off, on):  # warm up allocator, optimizer state, first-call overheads
        for _ in range(3):
            setup.train_step(*batch_at())
    times: dict[str, list[float]] = {"off": [], "on": []}
    ratios = []
    for r in range(rounds):
        order = [("off", off), ("on", on)] if r % 2 == 0 else [("on", on), ("off", off)]
        batches = [batch_at() for _ in range(steps)]
        medians = {}
        for name, setup in order:
            t = [setup.train_step(x, y) for x, y in batches]
            times[name] += t
            medians[name] = statistics.median(t)
        ratios.append(medians["on"] / medians["off"])
    m_off, m_on = statistics.median(times["off"]), statistics.median(times["on"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(
        f"  step time off {m_off * 1e3:.2f} ms, on {m_on * 1e3:.2f} ms (medians of {len(times['off'])} steps); "
        f"ratio on/off {m_on / m_off:.3f}; per-round ratios median {statistics.median(ratios):.3f}, "
        f"IQR {q[0]:.3f}-{q[2]:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--big", action="store_true", help="also the 12-layer, 768-wide model")
    parser.add_argument("--big-steps", type=int, default=3)
    parser.add_argument("--big-rounds", type=int, default=4)
    args = parser.parse_args()
    tokens, vocab = char_tokens()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    small = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=vocab)
    print("shakespeare-char recipe: 4 layers, 4 heads, 128 wide, ctx 64, batch 12")
    measure(small, 12, args.steps, args.rounds, tokens)
    if args.big:
        big = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=64, vocab_size=vocab)
        print("12 layers, 12 heads, 768 wide, ctx 64, batch 12")
        measure(big, 12, args.big_steps, args.big_rounds, tokens)


if __name__ == "__main__":
    main()

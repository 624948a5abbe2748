"""Configuration of the gradient-flow microscope (flow/monitor.py). Lives in the run config as `flow:`."""

from typing import Annotated, Literal

from pydantic import Field

from flowtrain._base import Section


class FlowConfig(Section):
    """What the microscope measures and how often. Everything defaults to on: it is cheap by design."""

    enabled: bool = Field(True, description="off: no hooks, no snapshots, collect() returns None")
    interval: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="monitored steps: per-tensor, per-layer and depth statistics, parameter and update norms every "
        "N steps (clip statistics are reported every step); between monitored steps the microscope costs nothing. "
        "auto: every step for the first `full_steps`, then the smallest interval that keeps the microscope's "
        "measured time under `budget` of the step time (re-chosen every `reprobe_steps`)",
    )
    budget: float = Field(
        0.02,
        gt=0,
        le=1,
        description="auto interval: the microscope's share of step time by its own stopwatch (2%: the step times "
        "measured side by side grow by more than it books, docs/flow.md)",
    )
    full_steps: int = Field(100, ge=0, description="auto interval: steps monitored every step at the start")
    reprobe_steps: int = Field(500, ge=1, description="auto interval: steps between choices of the interval")
    updates: bool = Field(
        True,
        description="update norms and ||dW||/||W|| on monitored steps (keeps one copy of the parameters in memory)",
    )
    residual: bool = Field(True, description="residual-stream gradient norm ||dL/dh_l|| at every block boundary")
    activations: bool = Field(True, description="activation RMS and max |x| at every block boundary")
    attention: bool = Field(True, description="attention entropy and max logit per block, from a sample")
    attn_heads: int = Field(4, ge=1, description="attention sample: first N heads")
    attn_positions: int = Field(16, ge=1, description="attention sample: N query positions, evenly spaced")
    attn_batch: int = Field(1, ge=1, description="attention sample: first N sequences of the first micro-batch")
    logits: bool = Field(True, description="output logits: max |z| and mean log-sum-exp (hook on the head)")
    histogram_interval: int = Field(
        100,
        ge=0,
        description="per-layer samples of the gradients and the weights for TensorBoard's histograms at the first "
        "monitored step of every N steps (0 = off; off when log.tensorboard is off; its cost: docs/performance.md)",
    )
    histogram_values: int = Field(4096, ge=16, description="at most this many values per layer histogram")
    clip_rate_window: int = Field(100, ge=1, description="steps in the rolling clip rate")

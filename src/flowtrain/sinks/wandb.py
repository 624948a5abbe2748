"""Weights & Biases, only when installed and asked for (offline mode needs no account or network)."""

from __future__ import annotations

import numbers
from typing import Any

from flowtrain.errors import ConfigError


class WandbSink:
    def __init__(self, project: str, mode: str, run_name: str, run_dir: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "log.wandb=true but wandb is not installed; pip install wandb or set log.wandb=false"
            ) from None
        self._run = wandb.init(project=project, mode=mode, name=run_name, dir=run_dir, config=config)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in scalars.items() if isinstance(v, numbers.Real)}, step=step)

    def close(self) -> None:
        self._run.finish()

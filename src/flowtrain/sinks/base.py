"""A sink receives the per-step scalar record; sinks never feed back into training."""

from __future__ import annotations

from typing import Any, Protocol


class Sink(Protocol):
    def write(self, step: int, scalars: dict[str, Any]) -> None: ...

    def close(self) -> None: ...

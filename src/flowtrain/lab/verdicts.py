"""Findings: a textbook claim, the numbers measured in this study, and whether the claim held.

Nothing here is pre-written about the outcome: a study builds each Finding from its measurements, with the
test that decides `held` spelled out in `rule`, so a reader sees exactly which comparison was made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Finding:
    claim: str  # the textbook expectation, in plain words
    measured: str  # the numbers this run produced
    rule: str  # the comparison that decides `held`
    held: bool | None  # None: a measurement without a textbook expectation

    @property
    def status(self) -> str:
        if self.held is None:
            return "measured"
        return "held" if self.held else "CONTRADICTED"

    def line(self) -> str:
        verdict = {
            "held": "as the textbook says",
            "CONTRADICTED": "this run contradicts the textbook",
            "measured": "no textbook expectation",
        }[self.status]
        return f"[{self.status}] {self.claim} — measured: {self.measured} ({self.rule}; {verdict})"

    def to_json(self) -> dict:
        return asdict(self) | {"status": self.status}


def fmt(value: float, digits: int = 3) -> str:
    """A measured number for prose: 3 significant digits, scientific for very small or large values."""
    if value is None or not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def table(findings: list[Finding]) -> str:
    """The console verdict table: one numbered block per finding, wrapped for a terminal."""
    import textwrap

    lines = []
    for i, f in enumerate(findings, 1):
        head = f"{i}. [{f.status}] "
        body = textwrap.wrap(f"{f.claim}", 110 - len(head))
        lines.append(head + body[0])
        lines.extend(" " * len(head) + b for b in body[1:])
        for label, text in (("measured", f.measured), ("test", f.rule)):
            for j, part in enumerate(textwrap.wrap(text, 100 - len(head))):
                lines.append(" " * len(head) + (f"{label}: " if j == 0 else " " * (len(label) + 2)) + part)
    held = sum(f.held is True for f in findings)
    judged = sum(f.held is not None for f in findings)
    lines.append(f"{held} of {judged} textbook expectations held in this run.")
    return "\n".join(lines)

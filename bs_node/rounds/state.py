"""What the BS holds of one device taking part in the current round."""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.control import Plan, Report


@dataclass
class Pending:
    """A participant of the current round: its plan, its report once it came, the SNR of each new frame, and why
    the BS gave up on it before a report (None while it is still expected)."""

    plan: Plan
    report: Report | None = None
    snr_db: list[float] = field(default_factory=list)
    dropped: str | None = None

    @property
    def settled(self) -> bool:
        """Nothing more is awaited from this device in this round."""
        return self.report is not None or bool(self.dropped)

"""The BS's round state machine (plan, collect, close), free of sockets: see `runner.py` and `ports.py`."""

from __future__ import annotations

from bs_node.rounds.close import RoundCloser
from bs_node.rounds.ports import (
    Clock,
    EdgeInfo,
    Event,
    FrameReceived,
    FromEdge,
    Registered,
    RoundModel,
    RoundTransport,
)
from bs_node.rounds.runner import RoundRunner, StartupError
from bs_node.rounds.state import Pending

__all__ = [
    "Clock",
    "EdgeInfo",
    "Event",
    "FrameReceived",
    "FromEdge",
    "Pending",
    "Registered",
    "RoundCloser",
    "RoundModel",
    "RoundRunner",
    "RoundTransport",
    "StartupError",
]

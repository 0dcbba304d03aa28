"""What the BS's plan tells the air about the world besides the subbands: band, channel, distances, clock.

Read by the air's uplink medium (phy.air_server) and its downlink (phy.air_downlink) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from config import ChannelConfig
from proto.air import RoundPlan


class AirError(ValueError):
    """A well-formed request the air cannot serve (no plan yet, a width that is not the device's subband, ...)."""


@dataclass(frozen=True)
class Physics:
    """What the BS's plan tells the air besides the subbands (from its bench and experiment)."""

    total_bandwidth_hz: float
    channel: ChannelConfig
    distances_m: tuple[float, ...]
    seed: int
    max_cfo_hz: float
    clock_speed: float
    hangover_s: float
    attenuation_db: float

    @classmethod
    def from_plan(cls, plan: RoundPlan) -> Physics:
        try:
            channel = ChannelConfig.model_validate(plan.channel)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            where = ".".join(["channel", *map(str, error["loc"])])
            raise AirError(f"plan: field {where!r}: {error['msg']}, got {error.get('input')!r}") from None
        return cls(
            plan.total_bandwidth_hz,
            channel,
            tuple(plan.distances_m),
            plan.seed,
            plan.max_cfo_hz,
            plan.clock_speed,
            plan.hangover_s,
            plan.attenuation_db,
        )

    def distance_m(self, device_id: int) -> float:
        return self.distances_m[device_id % len(self.distances_m)]  # cyclic, as BenchConfig.device()

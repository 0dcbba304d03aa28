"""The PER-vs-SNR calibration file's schema: the one definition of that format (phy.channel.PerCurve reads it).

A bench carries the table itself, not only its path, so an edge on another host never opens the file.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict, model_validator

from config.base import ConfigModel, Items, RuleError
from proto.numerology import Modulation

PacketErrorRate = Annotated[float, Field(ge=0.0, le=1.0)]
CurvePoint = Annotated[tuple[float, PacketErrorRate], Strict(False)]  # (snr_db, per)


class PerCurveTable(ConfigModel):
    """{ref_frame_bytes: int, curves: {modulation: [[snr_db, per], ...]}}, as calibration/per_sweep.py writes it.

    The controller inverts the curve, so SNR must increase strictly and PER must not increase along it.
    """

    ref_frame_bytes: int = Field(1000, gt=0)  # the frame size the PERs were measured at
    curves: dict[Modulation, Items[CurvePoint]] = Field(min_length=1)

    @model_validator(mode="after")
    def _invertible(self) -> PerCurveTable:
        for modulation, points in self.curves.items():
            key = f"curves.{modulation}"
            if not points:
                raise RuleError(key, [], "needs at least one [snr_db, per] point")
            snrs = [snr for snr, _ in points]
            pers = [per for _, per in points]
            if any(b <= a for a, b in zip(snrs, snrs[1:])):
                raise RuleError(key, snrs, "SNR points must be strictly increasing")
            if any(b > a for a, b in zip(pers, pers[1:])):
                raise RuleError(
                    key, pers, "PER must be non-increasing in SNR (smooth measured points first, e.g. min-accumulate)"
                )
        return self

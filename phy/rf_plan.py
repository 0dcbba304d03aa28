"""Where and when each device transmits on radios: FDMA subbands and carriers, TDMA slots (phy/rf.py's plans).

Pure arithmetic on the bench and the round's shares, kept apart from the flowgraphs so the BS and the tests use it
without opening a radio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from phy import fdma
from proto import numerology

__all__ = ["bs_subbands", "next_slot_start", "plan_center_freqs_hz", "rf_subbands", "slot_groups"]


def rf_subbands(
    total_bandwidth_hz: float, device_count: int, widths_hz: dict[int, float] | None = None
) -> dict[int, fdma.Subband]:
    """FDMA on radios: device k centred in slot k of K equal slots; its width (<= the slot) from the plan."""
    slot_hz = total_bandwidth_hz / device_count
    widths_hz = widths_hz or {}
    out = {}
    for k in range(device_count):
        width = min(float(widths_hz.get(k, slot_hz)), slot_hz)
        out[k] = fdma.Subband(k, -total_bandwidth_hz / 2 + (k + 0.5) * slot_hz, width)
    return out


def plan_center_freqs_hz(bench: Any, widths_hz: Mapping[int, float]) -> dict[int, float]:
    """Each planned device's carrier this round (Hz; for its Plan): fdma: rf.center_freq_hz + its subband's centre
    in phy.fdma's layout of the shares (as in the air); tdma: the band's centre (every device uses all of it)."""
    rf = bench.rf
    if rf.access == "tdma":
        return {k: float(rf.center_freq_hz) for k in widths_hz}
    plan = fdma.plan_subbands(bench.radio.total_bandwidth_hz, dict(widths_hz))
    return {k: rf.center_freq_hz + sb.center_hz for k, sb in plan.items()}


def next_slot_start(now_s: float, device_id: int, device_count: int, slot_s: float) -> float:
    """TDMA: the start (wall-clock seconds) of device k's next slot in a cycle of device_count slots of slot_s."""
    cycle_s = device_count * slot_s
    offset_s = (device_id % device_count) * slot_s
    start = math.floor((now_s - offset_s) / cycle_s) * cycle_s + offset_s
    return start if start >= now_s - 1e-9 else start + cycle_s


def slot_groups(frame_sizes: Sequence[int], modulation: str, sample_rate_hz: float, usable_s: float) -> list[list[int]]:
    """Indices of frames per slot: consecutive frames whose packets fit in usable_s (at least one each)."""
    groups: list[list[int]] = [[]]
    used = 0.0
    for i, n in enumerate(frame_sizes):
        t = numerology.packet_samples(n, modulation) / sample_rate_hz
        if groups[-1] and used + t > usable_s:
            groups.append([])
            used = 0.0
        groups[-1].append(i)
        used += t
    return [g for g in groups if g]


def bs_subbands(bench: Any, device_count: int, widths_hz: dict[int, float] | None = None) -> dict[int, fdma.Subband]:
    """What the BS channelizes: fdma: every device's slot; tdma: the whole band, once."""
    if bench.rf.access == "tdma":
        return {0: fdma.Subband(0, 0.0, bench.radio.total_bandwidth_hz)}
    return rf_subbands(bench.radio.total_bandwidth_hz, device_count, widths_hz)

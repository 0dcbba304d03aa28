"""The air's downlink: the BS's bursts over the whole band, each listening edge given its own channel.

The BS sends a ``dl_burst`` (proto.air.DownlinkHeader, complex64 IQ at the round's total_bandwidth_hz) naming the
devices it is for. The downlink is one transmitter (the BS) on its own band, so bursts go out one after another:
a burst starts when the one before it ended and takes len(iq) / rate / clock_speed seconds. When it has ended,
each listed device that told the air where it listens (``listen``) gets [``dl``, IQ]: the burst at that device's
SNR (the same path loss and fade draw as its uplink in that round, phy.channel.SimChannel, at the BS's power over
the whole band), its carrier offset (the uplink's, reversed), and fresh Gaussian noise, with noise before the
burst and after it (the receiver needs samples after a packet to release it). A device that is not listening
gets nothing: its edge finds the frames missing and asks again.

No sockets here: the air server calls ``submit`` / ``due`` and sends what ``due`` returns.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from phy import fdma
from phy.air_physics import Physics
from phy.channel import DeviceGeometry, SimChannel, TxSetting
from proto.air import DOWNLINK_NOISE_SAMPLES, DownlinkFrames, DownlinkHeader, DownlinkIq

log = logging.getLogger("air")

MAX_QUEUED_DOWNLINK_BURSTS = 1024  # BS bursts waiting for the downlink (each view is a few; a round has a few views)
MAX_QUEUED_DOWNLINK_SAMPLES = 1 << 24  # and their samples: 16 Mi (128 MiB), 16 s of downlink at 1 MHz
LEAD_NOISE_SAMPLES = 512  # noise before the burst: the receiver's synchronizer sees a noise floor first
TAIL_NOISE_SAMPLES = DOWNLINK_NOISE_SAMPLES - LEAD_NOISE_SAMPLES  # after it: the last packet leaves the receiver


class DownlinkError(ValueError):
    """A downlink burst the air cannot take (its reason names the field)."""


@dataclass
class _Queued:
    header: DownlinkHeader
    iq: np.ndarray
    physics: Physics
    end_s: float  # monotonic time at which its last sample is on the air


class DownlinkAir:
    """The downlink's queue, its listeners and the per-device channel."""

    def __init__(self, noise_seed: int = 0) -> None:
        self.listeners: dict[int, bytes] = {}  # device -> the ROUTER identity of its edge's socket
        self._queue: deque[_Queued] = deque()
        self._busy_until_s = 0.0
        self._rng = np.random.default_rng([noise_seed, 0xD0])
        self.stats = {"bursts": 0, "delivered": 0, "not_listening": 0}

    def listen(self, device_id: int, identity: bytes) -> None:
        if self.listeners.get(device_id) not in (None, identity):
            log.info("air: device %d listens on a new socket (edge restarted)", device_id)
        self.listeners[device_id] = identity

    def submit(self, request: DownlinkFrames, physics: Physics, now_s: float) -> float:
        """Queue a BS burst; returns when it will have been sent (monotonic seconds)."""
        header = request.header
        assert isinstance(header, DownlinkHeader)
        iq = np.frombuffer(request.iq, dtype=np.complex64)
        if not np.isfinite(iq.view(np.float32)).all():
            raise DownlinkError("dl_burst: IQ holds NaN or Inf")
        if not np.all(np.abs(iq.view(np.float32)) < 1e3):
            raise DownlinkError("dl_burst: IQ is not a unit-power OFDM burst (|sample| >= 1000)")
        self.admit(len(iq))
        try:
            TxSetting(header.tx_power_dbm, physics.total_bandwidth_hz, header.modulation)
        except ValueError as exc:
            raise DownlinkError(f"dl_burst: {exc}") from None
        start_s = max(now_s, self._busy_until_s)
        self._busy_until_s = start_s + len(iq) / physics.total_bandwidth_hz / physics.clock_speed
        self._queue.append(_Queued(header, iq, physics, self._busy_until_s))
        self.stats["bursts"] += 1
        return self._busy_until_s

    def admit(self, samples: int) -> None:
        """Room in the queue for a burst of `samples` (the air asks at its header, before its chunks come)."""
        queued = sum(len(q.iq) for q in self._queue)
        if len(self._queue) >= MAX_QUEUED_DOWNLINK_BURSTS or queued + samples > MAX_QUEUED_DOWNLINK_SAMPLES:
            raise DownlinkError(
                f"dl_burst: {len(self._queue)} downlink bursts of {queued} samples wait already (the BS sends faster "
                f"than the downlink carries them)"
            )

    def next_due_s(self) -> float | None:
        return self._queue[0].end_s if self._queue else None

    def due(self, now_s: float) -> Iterator[tuple[bytes, DownlinkIq, np.ndarray]]:
        """(identity, header, IQ) for every listening device of each burst whose airtime has passed."""
        while self._queue and self._queue[0].end_s <= now_s:
            burst = self._queue.popleft()
            for device_id in dict.fromkeys(burst.header.devices):  # once per device, in the BS's order
                identity = self.listeners.get(device_id)
                if identity is None:
                    self.stats["not_listening"] += 1
                    log.warning(
                        "air: downlink burst %d of round %d: device %d is not listening; it misses the burst",
                        burst.header.burst_id,
                        burst.header.round,
                        device_id,
                    )
                    continue
                snr_db, iq = self.heard(burst, device_id)
                self.stats["delivered"] += 1
                header = DownlinkIq(
                    device_id=device_id,
                    round=burst.header.round,
                    burst_id=burst.header.burst_id,
                    snr_db=round(snr_db, 3),
                    kind=burst.header.kind,
                    packets=burst.header.packets,
                    final=burst.header.final,
                )
                yield identity, header, iq

    def heard(self, burst: _Queued, device_id: int) -> tuple[float, np.ndarray]:
        """The channel's SNR at device_id and the IQ its receiver takes in (noise, the burst, noise)."""
        ph, header = burst.physics, burst.header
        setting = TxSetting(header.tx_power_dbm, ph.total_bandwidth_hz, header.modulation)
        channel = SimChannel(ph.channel, seed=ph.seed)  # the uplink's channel: the same draws for the device
        snr_db = channel.snr_db(DeviceGeometry(device_id, ph.distance_m(device_id)), header.round, setting)
        cfo_hz = -fdma.carrier_offset_hz(ph.seed, device_id, ph.max_cfo_hz)  # the uplink's offset, seen the other way
        n = len(burst.iq)
        out = np.empty(LEAD_NOISE_SAMPLES + n + TAIL_NOISE_SAMPLES, dtype=np.complex64)
        noise_std = math.sqrt(10 ** (-snr_db / 10) / 2)  # per real dimension; the burst's symbols have power 1
        out.real = self._rng.standard_normal(len(out), dtype=np.float32) * noise_std
        out.imag = self._rng.standard_normal(len(out), dtype=np.float32) * noise_std
        phase = 2 * np.pi * cfo_hz / ph.total_bandwidth_hz * np.arange(n)
        out[LEAD_NOISE_SAMPLES : LEAD_NOISE_SAMPLES + n] += burst.iq * np.exp(1j * phase).astype(np.complex64)
        return snr_db, out

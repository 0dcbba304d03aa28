"""The air of the gr-zmq-iq PHY: one process between the edges and the BS that does what the channel would.

    edge k --[burst: IQ at its subband rate]--> air: gain (path loss + fading + tx power), carrier offset,
    resample to the medium rate, shift into the device's FDMA subband, sum with the other edges' bursts, add
    thermal noise over the whole band --[medium: IQ at total_bandwidth_hz]--> BS (channelizer + OFDM receivers)

Run it as ``python -m phy.air --bench hw_configs/zmq_iq.yaml`` (the launcher does, for benches with
``phy: gr-zmq-iq``). The bench file only gives the air its addresses: the physics (band, channel model,
distances, seed, carrier offsets, clock) comes with every subband plan from the BS, which holds the validated
bench and experiment, so the two can never disagree and the air stays light (no torch: it starts in ~1 s).
Sockets (bench ``air:`` section; ``tcp://host:0`` picks a free port, and ``--endpoints-file`` tells which):

* ``air.address`` (ROUTER, bound): edges send ``[b"burst", meta JSON, complex64 IQ]`` and get
  ``[b"done", JSON]`` back once the burst's last sample is on the medium (that is when their send() returns);
  the BS sends ``[b"plan", JSON]`` (the round's subbands, phy.fdma) and gets ``[b"plan_ok" | b"error", JSON]``,
  and is told ``[b"burst_done", JSON]`` (device, medium index of the burst's end) so it can finish decoding a
  burst before it acknowledges it.
* ``air.medium`` (PUSH, bound): the summed medium as ``[header JSON {"index": first sample's medium index},
  complex64 IQ]``, in chunks of ~10 ms.

Why the channel is numpy here and not a GNU Radio flowgraph: everything the air does to a burst (gain, carrier
offset, polyphase resampling, mixing) is known when the burst arrives, so it is done once per burst, in C
loops (scipy's upfirdn, numpy), and the medium clock then only adds the bursts' slices and fresh noise.
CPU therefore scales with what is transmitted, not with the medium rate, and while no edge transmits the
medium stops altogether (after ``hangover_s`` of noise that flushes the receivers, pitfall 5): nothing is
streamed while the edges train. A flowgraph would need zero-filled continuous streams into ``add_cc``
(pitfall 9) running at the full medium rate all the time. The medium index counts samples put on the medium;
idle time is skipped, so the BS sees one continuous stream.

Clock: while active, the medium advances at ``clock_speed`` x total_bandwidth_hz samples per wall-clock
second (1 = real time), at most ``lead_s`` ahead. If the BS does not take the medium (PUSH queue full), the
clock waits: nothing is dropped and the BS decodes everything, only later. Malformed messages are logged with
their peer and answered with an error; they never stop the air.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import zmq

from phy import fdma
from phy.channel import ChannelConfig, DeviceGeometry, SimChannel, TxSetting

log = logging.getLogger("air")

WIRE_VERSION = 1
CHUNK_S = 0.01  # medium samples per message: 10 ms
LEAD_S = 0.05  # how far the medium may run ahead of the wall clock
MAX_BURST_SAMPLES = 64_000_000  # 512 MB of IQ: refuse anything larger from a peer
MODULATIONS = ("bpsk", "qpsk", "8psk", "16qam")


class AirError(ValueError):
    """A peer's message the air cannot use; answered with an error, never raised out of the loop."""


@dataclass
class Burst:
    """One edge burst, already converted to medium samples at its place in the band."""

    identity: bytes
    device_id: int
    round_idx: int
    burst_id: int
    samples: np.ndarray  # complex64 at the medium rate, gain/offset/subband applied
    start: int  # medium index of the first sample
    snr_db: float

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


def air_filter_taps(up: int, bandwidth_hz: float, attenuation_db: float) -> np.ndarray:
    """Low-pass for resample_poly(up, down) of a subband signal: flat to 0.42 b, stop from 0.58 b."""
    from scipy import signal as sps

    fs = up * bandwidth_hz
    width = (fdma.STOP_EDGE - fdma.PASS_EDGE) * bandwidth_hz
    numtaps, beta = sps.kaiserord(attenuation_db, width / (fs / 2))
    numtaps |= 1  # odd: integer group delay
    cutoff = (fdma.PASS_EDGE + fdma.STOP_EDGE) / 2 * bandwidth_hz
    return sps.firwin(numtaps, cutoff, window=("kaiser", beta), fs=fs)


def to_medium(
    iq: np.ndarray,
    subband: fdma.Subband,
    total_bandwidth_hz: float,
    *,
    amplitude: float,
    cfo_hz: float,
    start_index: int,
    attenuation_db: float = 70.0,
) -> np.ndarray:
    """A burst at the subband rate -> medium samples: scaled, resampled to the medium rate, shifted into place.

    Resampling by up/down: zero-stuff by up, low-pass (FFT overlap-add: ~5x faster than a polyphase loop for
    these lengths), keep every down-th sample, without the filter's delay. The shift uses the absolute medium
    index, so the phase of every link's carrier runs continuously.
    """
    from scipy import signal as sps

    ratio = Fraction(total_bandwidth_hz / subband.bandwidth_hz).limit_denominator(1000)
    if abs(float(ratio) - total_bandwidth_hz / subband.bandwidth_hz) > 1e-6 * float(ratio):
        raise AirError(
            f"total/subband bandwidth ratio {total_bandwidth_hz / subband.bandwidth_hz} is not a "
            f"ratio of integers up to 1000"
        )
    up, down = ratio.numerator, ratio.denominator
    x = iq.astype(np.complex64, copy=False)
    if up == 1 and down == 1:
        y = x * np.float32(amplitude)
    else:
        taps = air_filter_taps(up, subband.bandwidth_hz, attenuation_db).astype(np.float32)
        stuffed = np.zeros(len(x) * up, dtype=np.complex64)
        stuffed[::up] = x * np.float32(amplitude * up)
        delay = (len(taps) - 1) // 2
        y = sps.oaconvolve(stuffed, taps)[delay : delay + len(stuffed) : down].astype(np.complex64, copy=False)
    return mix(y, 2 * math.pi * (subband.center_hz + cfo_hz) / total_bandwidth_hz, start_index)


def mix(y: np.ndarray, phase_inc: float, start_index: int, block: int = 4096) -> np.ndarray:
    """y * exp(j phase_inc n), n = start_index + position (complex64; one table of block phasors)."""
    n_blocks = -(-len(y) // block)
    table = np.exp(1j * phase_inc * np.arange(block)).astype(np.complex64)
    starts = np.exp(
        1j * np.mod(phase_inc * (start_index + block * np.arange(n_blocks, dtype=np.float64)), 2 * math.pi)
    ).astype(np.complex64)
    padded = np.zeros(n_blocks * block, dtype=np.complex64)
    padded[: len(y)] = y
    padded = padded.reshape(n_blocks, block)
    padded *= table[None, :]
    padded *= starts[:, None]
    return padded.reshape(-1)[: len(y)]


@dataclass
class Physics:
    """What the BS's plan tells the air besides the subbands (from its bench and experiment)."""

    total_bandwidth_hz: float
    channel: ChannelConfig
    distances_m: dict[int, float]
    seed: int = 0
    max_cfo_hz: float = 0.0
    clock_speed: float = 1.0
    hangover_s: float = 0.02
    attenuation_db: float = 60.0

    @classmethod
    def from_plan(cls, msg: dict) -> Physics:
        channel = msg.get("channel")
        distances = msg.get("distances_m")
        if not isinstance(channel, dict):
            raise AirError("plan: 'channel' must be an object (phy.channel.ChannelConfig fields)")
        if not isinstance(distances, list) or not distances:
            raise AirError("plan: 'distances_m' must be a non-empty list (device k -> entry k)")
        try:
            config = ChannelConfig(**channel)
            geometry = {k: DeviceGeometry(k, float(d)).distance_m for k, d in enumerate(distances)}
        except (TypeError, ValueError) as exc:
            raise AirError(f"plan: {exc}") from None
        physics = cls(
            _num(msg, "total_bandwidth_hz"),
            config,
            geometry,
            _int(msg, "seed"),
            _num(msg, "max_cfo_hz"),
            _num(msg, "clock_speed"),
            _num(msg, "hangover_s"),
            _num(msg, "attenuation_db"),
        )
        if physics.total_bandwidth_hz <= 0 or physics.clock_speed <= 0 or not 0 <= physics.hangover_s <= 10:
            raise AirError("plan: total_bandwidth_hz and clock_speed must be > 0, hangover_s within [0, 10]")
        if not 20 <= physics.attenuation_db <= 150:
            raise AirError(f"plan: attenuation_db {physics.attenuation_db} is outside [20, 150]")
        return physics

    def distance_m(self, device_id: int) -> float:
        return self.distances_m[device_id % len(self.distances_m)]  # cyclic, as BenchConfig.device()


@dataclass
class _Peer:
    """What the air knows from the BS: its identity, the subband plan and the physics it announced."""

    identity: bytes | None = None
    round_idx: int = -1
    physics: Physics | None = None
    plan: dict[int, fdma.Subband] = field(default_factory=dict)


class Air:
    """The medium: sockets, subband plan, bursts on the air, the clock. ``run()`` until ``stop()``."""

    def __init__(
        self, *, address: str, medium_address: str, noise_seed: int = 0, context: zmq.Context | None = None
    ) -> None:
        ctx = context or zmq.Context.instance()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_BURST_SAMPLES * 8 + 65536)
        self.router.bind(_bindable(address))
        self.address = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.medium = ctx.socket(zmq.PUSH)
        self.medium.setsockopt(zmq.LINGER, 0)
        self.medium.setsockopt(zmq.SNDHWM, 64)  # ~0.6 s of medium queued for the BS, then the clock waits
        self.medium.bind(_bindable(medium_address))
        self.medium_address = self.medium.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bs = _Peer()
        self.queues: dict[int, deque[Burst]] = {}
        self.index = 0  # medium samples sent so far
        self.hangover_end = 0
        self.rng = np.random.default_rng([noise_seed, 0xA1A])
        self._clock: tuple[float, int] | None = None  # (wall time, medium index) when the medium became active
        self._pending_chunk: tuple[int, np.ndarray] | None = None  # built but not yet taken by the BS
        self._running = True
        self.stats = {"bursts": 0, "refused": 0, "malformed": 0, "medium_samples": 0, "busy_s": 0.0}

    @property
    def rate_hz(self) -> float:
        return self.bs.physics.total_bandwidth_hz if self.bs.physics else 0.0

    # ----------------------------------------------------------------------------------------- control
    def stop(self, *_: object) -> None:
        self._running = False

    def close(self) -> None:
        self.router.close(linger=0)
        self.medium.close(linger=0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while self._running:
            timeout_ms = 2 if self._active() else 100
            if dict(poller.poll(timeout_ms)).get(self.router):
                for _ in range(100):
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._on_message(parts)
            self._advance()
        log.info("air stopped: %s", self.stats)

    # ----------------------------------------------------------------------------------------- messages
    def _on_message(self, parts: list[bytes]) -> None:
        identity = parts[0]
        kind = parts[1] if len(parts) > 1 else b""
        try:
            if kind == b"plan" and len(parts) == 3:
                self._on_plan(identity, _json(parts[2]))
            elif kind == b"burst" and len(parts) == 4:
                self._on_burst(identity, _json(parts[2]), parts[3])
            else:
                raise AirError(f"unknown message: kind {kind[:16]!r}, {len(parts) - 1} part(s)")
        except AirError as exc:
            self.stats["malformed" if kind not in (b"plan", b"burst") else "refused"] += 1
            log.warning("air: refused a message from peer %r: %s", identity, exc)
            self._reply(identity, b"error", {"error": str(exc), "kind": kind[:16].decode("latin-1")})
        except Exception as exc:  # a bug or an odd input must cost one message, not the air
            self.stats["refused"] += 1
            log.exception("air: message from peer %r failed", identity)
            self._reply(identity, b"error", {"error": f"air failed on it: {exc}", "kind": kind[:16].decode("latin-1")})

    def _on_plan(self, identity: bytes, msg: dict) -> None:
        round_idx = _int(msg, "round")
        physics = Physics.from_plan(msg)
        if self.bs.physics and physics.total_bandwidth_hz != self.rate_hz and self._active():
            raise AirError(f"plan: the band changes from {self.rate_hz:.0f} Hz while bursts are on the air")
        subbands = msg.get("subbands")
        if not isinstance(subbands, list):
            raise AirError("plan: 'subbands' must be a list")
        widths = {}
        for i, s in enumerate(subbands):
            if not isinstance(s, dict):
                raise AirError(f"plan: subbands[{i}] must be an object")
            widths[_int(s, "device_id")] = _num(s, "bandwidth_hz")
        try:
            plan = fdma.plan_subbands(physics.total_bandwidth_hz, widths)
        except ValueError as exc:
            raise AirError(f"plan: {exc}") from None
        for s in subbands:  # the BS's centres must be the ones the rule gives: both ends apply the same plan
            if abs(plan[s["device_id"]].center_hz - _num(s, "center_hz")) > 1.0:
                raise AirError(
                    f"plan: device {s['device_id']} centre {s['center_hz']} Hz, the subband rule "
                    f"gives {plan[s['device_id']].center_hz} Hz"
                )
        self.bs = _Peer(identity, round_idx, physics, plan)
        log.info(
            "air: round %d plan from the BS: %s",
            round_idx,
            ", ".join(
                f"dev {k} {sb.center_hz / 1e3:+.1f} kHz / {sb.bandwidth_hz / 1e3:.1f} kHz"
                for k, sb in sorted(plan.items())
            ),
        )
        self._reply(identity, b"plan_ok", {"round": round_idx, "index": self.index})

    def _on_burst(self, identity: bytes, meta: dict, payload: bytes) -> None:
        if meta.get("v") != WIRE_VERSION:
            raise AirError(f"burst: wire version {meta.get('v')!r}, expected {WIRE_VERSION}")
        device_id, round_idx, burst_id = _int(meta, "device_id"), _int(meta, "round"), _int(meta, "burst_id")
        tx_power_dbm, bandwidth_hz = _num(meta, "tx_power_dbm"), _num(meta, "bandwidth_hz")
        modulation = meta.get("modulation")
        if modulation not in MODULATIONS:
            raise AirError(f"burst: unknown modulation {modulation!r}")
        if len(payload) % 8 or not payload:
            raise AirError(f"burst: {len(payload)} bytes of IQ is not a whole number of complex64 samples")
        if len(payload) // 8 > MAX_BURST_SAMPLES:
            raise AirError(f"burst: {len(payload) // 8} samples is above the limit {MAX_BURST_SAMPLES}")
        iq = np.frombuffer(payload, dtype=np.complex64)
        if not np.isfinite(iq.view(np.float32)).all():
            raise AirError("burst: IQ holds NaN or Inf")
        if not np.all(np.abs(iq.view(np.float32)) < 1e3):
            raise AirError("burst: IQ is not a unit-power OFDM burst (|sample| >= 1000)")
        subband = self.bs.plan.get(device_id)
        if subband is None:
            raise AirError(
                f"burst: device {device_id} has no subband in the BS's plan for round {self.bs.round_idx}"
                + ("" if self.bs.identity else " (no plan from the BS yet)")
            )
        if abs(subband.bandwidth_hz - bandwidth_hz) > 1e-6 * bandwidth_hz:
            raise AirError(
                f"burst: device {device_id} sends {bandwidth_hz:.0f} Hz wide, its subband in round "
                f"{self.bs.round_idx} is {subband.bandwidth_hz:.0f} Hz"
            )
        try:
            setting = TxSetting(tx_power_dbm, bandwidth_hz, modulation if modulation != "16qam" else "qpsk")
        except ValueError as exc:
            raise AirError(f"burst: {exc}") from None
        physics = self.bs.physics
        channel = SimChannel(physics.channel, seed=physics.seed)
        snr_db = channel.snr_db(DeviceGeometry(device_id, physics.distance_m(device_id)), round_idx, setting)
        queue = self.queues.setdefault(device_id, deque())
        start = max([self.index + (len(self._pending_chunk[1]) if self._pending_chunk else 0)] + [b.end for b in queue])
        samples = to_medium(
            iq,
            subband,
            self.rate_hz,
            amplitude=fdma.signal_amplitude(snr_db, bandwidth_hz, self.rate_hz),
            cfo_hz=fdma.carrier_offset_hz(physics.seed, device_id, physics.max_cfo_hz),
            start_index=start,
            attenuation_db=physics.attenuation_db,
        )
        queue.append(Burst(identity, device_id, round_idx, burst_id, samples, start, snr_db))
        self.stats["bursts"] += 1
        log.info(
            "air: device %d round %d burst %d: %d samples at %.0f Hz, SNR %.1f dB, on the medium at %d..%d",
            device_id,
            round_idx,
            burst_id,
            len(iq),
            bandwidth_hz,
            snr_db,
            start,
            start + len(samples),
        )

    def _reply(self, identity: bytes, kind: bytes, body: dict) -> None:
        try:
            self.router.send_multipart([identity, kind, json.dumps(body).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a peer that left: nothing to tell
            log.info("air: could not answer peer %r: %s", identity, exc)

    # ----------------------------------------------------------------------------------------- medium clock
    def _active(self) -> bool:
        return any(self.queues.values()) or self.index < self.hangover_end or self._pending_chunk is not None

    def _advance(self) -> None:
        """Put medium samples out up to the clock (real time x clock_speed, lead_s ahead)."""
        if not self._active():
            self._clock = None
            return
        now = time.monotonic()
        if self._clock is None:
            self._clock = (now, self.index)
        t0, i0 = self._clock
        target = i0 + int((now - t0 + LEAD_S) * self.rate_hz * self.bs.physics.clock_speed)
        busy0 = time.process_time()
        while self.index < target and self._active():
            if self._pending_chunk is None:
                chunk = max(256, int(self.rate_hz * CHUNK_S))
                self._pending_chunk = (self.index, self._build_chunk(self.index, min(chunk, target - self.index)))
            start, chunk = self._pending_chunk
            try:
                self.medium.send_multipart([json.dumps({"index": start}).encode(), chunk], zmq.NOBLOCK, copy=False)
            except zmq.Again:  # the BS is behind (or not there yet): the clock waits for it
                self._clock = (now, self.index)
                break
            self._pending_chunk = None
            self.index += len(chunk)
            self.stats["medium_samples"] += len(chunk)
            self._finish_bursts()
        self.stats["busy_s"] += time.process_time() - busy0

    def _build_chunk(self, start: int, n: int) -> np.ndarray:
        noise = self.rng.standard_normal((n, 2), dtype=np.float32)
        noise *= np.float32(math.sqrt(0.5))
        chunk = noise.view(np.complex64).reshape(n)
        for queue in self.queues.values():
            for b in queue:
                lo, hi = max(start, b.start), min(start + n, b.end)
                if lo < hi:
                    chunk[lo - start : hi - start] += b.samples[lo - b.start : hi - b.start]
        return chunk

    def _finish_bursts(self) -> None:
        for queue in self.queues.values():
            while queue and queue[0].end <= self.index:
                b = queue.popleft()
                self.hangover_end = max(self.hangover_end, b.end + int(self.bs.physics.hangover_s * self.rate_hz))
                done = {
                    "device_id": b.device_id,
                    "round": b.round_idx,
                    "burst_id": b.burst_id,
                    "medium_end": b.end,
                    "snr_db": b.snr_db,
                }
                if self.bs.identity is not None:  # first the BS: it must know before the edge's burst_end comes
                    self._reply(self.bs.identity, b"burst_done", done)
                self._reply(b.identity, b"done", done)


# --------------------------------------------------------------------------------------------- helpers
def _bindable(address: str) -> str:
    return address[:-2] + ":*" if address.startswith("tcp://") and address.endswith(":0") else address


def _json(raw: bytes) -> dict:
    try:
        msg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AirError(f"metadata is not JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise AirError(f"metadata is {type(msg).__name__}, expected an object")
    return msg


def _int(msg: dict, name: str) -> int:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AirError(f"field {name!r} must be an integer >= 0, got {value!r}")
    return value


def _num(msg: dict, name: str) -> float:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AirError(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def bench_addresses(path: str | Path, overrides: list[str]) -> tuple[str, str]:
    """air.address and air.medium of a bench file (with --bench-set overrides), without loading config:
    the air needs nothing else from the bench, and importing the full config would import torch."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"phy.air: cannot read bench {path}: {exc}") from None
    air = dict(doc.get("air") or {}) if isinstance(doc, dict) else {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("air.address", "air.medium"):
            air[key[4:]] = yaml.safe_load(value)
    address, medium = air.get("address", "tcp://127.0.0.1:5757"), air.get("medium", "tcp://127.0.0.1:5758")
    if not (isinstance(address, str) and isinstance(medium, str)):
        raise SystemExit(f"phy.air: {path}: air.address / air.medium must be zmq addresses")
    return address, medium


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phy.air", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bench",
        default=str(Path(__file__).resolve().parents[1] / "hw_configs" / "zmq_iq.yaml"),
        help="bench YAML: only its air.address / air.medium are used (default: hw_configs/zmq_iq.yaml)",
    )
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", help="bind address for edges and the BS (default: the bench's air.address)")
    parser.add_argument("--medium", help="bind address of the medium to the BS (default: the bench's air.medium)")
    parser.add_argument("--endpoints-file", help="write the bound addresses here as JSON")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s air %(levelname)s %(message)s")
    address, medium = bench_addresses(args.bench, args.bench_overrides)
    air = Air(address=args.address or address, medium_address=args.medium or medium, noise_seed=args.noise_seed)
    if args.endpoints_file:
        tmp = Path(args.endpoints_file + ".tmp")
        tmp.write_text(json.dumps({"address": air.address, "medium": air.medium_address}))
        tmp.replace(args.endpoints_file)
    log.info(
        "air: edges and BS at %s, medium to the BS at %s; waiting for the BS's plan", air.address, air.medium_address
    )
    signal.signal(signal.SIGINT, air.stop)
    signal.signal(signal.SIGTERM, air.stop)
    try:
        air.run()
    finally:
        air.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

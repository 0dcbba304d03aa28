"""Open the uplink of the bench's PHY: the only place that knows which link implementation runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from config import BenchConfig, ConfigError
from phy.channel import DeviceGeometry, PerCurve, SimChannel
from phy.replay import ReplayTrace, ReplayUplinkReceiver, ReplayUplinkTransmitter
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from phy.uplink import UplinkReceiver, UplinkTransmitter
from proto.link_trace import TraceError
from trust.keys import KeyPair


def open_uplink_transmitter(
    bench: BenchConfig,
    device_id: int,
    *,
    data_address: str,
    seed: int,
    context: zmq.Context[Any] | None = None,
    key: KeyPair | None = None,
) -> UplinkTransmitter:
    """key: the device's key pair on a sealed bench (CURVE to the air, or to the sim links' data port)."""
    geometry = DeviceGeometry(device_id=device_id, distance_m=bench.device(device_id).distance_m)
    if bench.phy in ("sim", "gr-loopback", "replay"):
        # gr-loopback's and replay's edges are the sim's (the BS runs the modem / holds the trace), with the
        # setting beside each frame
        from phy.gr_link import GrLoopbackTransmitter  # needs no GNU Radio on the edge

        senders = {"sim": SimUplinkTransmitter, "gr-loopback": GrLoopbackTransmitter, "replay": ReplayUplinkTransmitter}
        sender = senders[bench.phy]
        return sender(
            bs_data_address=data_address,
            geometry=geometry,
            channel=SimChannel(bench.channel, seed=seed),
            per_curve=PerCurve.for_sim_link(bench),  # the sim's true loss model (the controller's: for_bench)
            seed=seed,
            context=context,
            key=key,
        )
    if bench.phy == "gr-zmq-iq":
        from phy.gr_zmq_iq_tx import ZmqIqTransmitter  # the edge modulates: GNU Radio on the edge

        return ZmqIqTransmitter(
            air_address=reachable_address(bench.air.address, data_address),
            geometry=geometry,
            context=context,
            clock_speed=bench.air.clock_speed,
            key=key,
        )
    if bench.phy == "rf":
        from phy.rf import RfUplinkTransmitter

        return RfUplinkTransmitter(bench, geometry, device_count=len(bench.devices))
    raise ConfigError(f"bench {bench.name}: phy {bench.phy!r} has no uplink transmitter in this build")


def open_uplink_receiver(
    bench: BenchConfig,
    *,
    bind_address: str,
    context: zmq.Context[Any] | None = None,
    device_count: int | None = None,
    seed: int = 0,
    key: KeyPair | None = None,
    iq_base: Path | None = None,
) -> UplinkReceiver:
    """device_count / seed: the experiment's (gr-zmq-iq: one subband receiver per device; the air's channel draws).
    key: the BS's key pair on a sealed bench (sim, gr-loopback: its data port serves CURVE under it; gr-zmq-iq: the
    air does). iq_base: record the IQ at the BS receiver as SigMF at this path (+ .sigmf-data / .sigmf-meta)."""
    if iq_base is not None and bench.phy != "gr-loopback":
        raise ConfigError(f"bench {bench.name}: recording IQ needs phy gr-loopback (this bench's is {bench.phy})")
    if bench.phy == "sim":
        return SimUplinkReceiver(bind_address=bind_address, context=context, key=key)
    if bench.phy == "gr-loopback":
        from phy.gr_link import GrLoopbackReceiver  # GNU Radio is imported only when this PHY runs
        from phy.iq_record import SigmfRecording

        recording = None
        if iq_base is not None:
            recording = SigmfRecording(
                iq_base,
                sample_rate_hz=bench.radio.total_bandwidth_hz,
                description="gr-loopback: the IQ the BS's OFDM receiver took in; every packet runs at its "
                "bandwidth share's rate (its annotation says which frame, channel and outcome)",
            )
        return GrLoopbackReceiver(
            bind_address=bind_address,
            snr_offset_db=bench.snr_offset_db,
            context=context,
            key=key,
            iq_recording=recording,
        )
    if bench.phy == "replay":
        assert bench.replay.trace is not None  # BenchConfig's rule
        try:
            trace = ReplayTrace.load(bench.replay.trace)
        except TraceError as exc:
            raise ConfigError(f"bench {bench.name}: {exc}") from None
        return ReplayUplinkReceiver(
            bind_address=bind_address,
            trace=trace,
            per_curve=PerCurve.for_bench(bench),
            seed=bench.replay.seed,
            context=context,
            key=key,
        )
    if bench.phy == "gr-zmq-iq":
        from phy.gr_zmq_iq import ZmqIqReceiver

        count = device_count or len(bench.devices)
        air = bench.air
        return ZmqIqReceiver(
            air_address=air.address,
            medium_address=air.medium,
            total_bandwidth_hz=bench.radio.total_bandwidth_hz,
            device_count=count,
            distances_m=[bench.device(k).distance_m for k in range(count)],
            channel=bench.channel,
            seed=seed,
            snr_offset_db=bench.snr_offset_db,
            max_cfo_hz=air.max_cfo_hz,
            clock_speed=air.clock_speed,
            hangover_s=air.hangover_s,
            attenuation_db=air.filter_attenuation_db,
            context=context,
            key=key,
        )
    if bench.phy == "rf":
        from phy.rf import RfUplinkReceiver

        return RfUplinkReceiver(bench, device_count=device_count or len(bench.devices))
    raise ConfigError(f"bench {bench.name}: phy {bench.phy!r} has no uplink receiver in this build")


def reachable_address(bound: str, via: str) -> str:
    """The BS binds wildcards (tcp://0.0.0.0:port); an edge reaches that port on the host it used for `via`."""
    bound_parts, via_parts = urlsplit(bound), urlsplit(via)
    if bound_parts.hostname in ("0.0.0.0", "*", "::", None) and via_parts.hostname:
        return f"{bound_parts.scheme}://{via_parts.hostname}:{bound_parts.port}"
    return bound

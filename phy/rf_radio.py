"""The radios of the rf link: what a radio block is opened with, opening it (gr-uhd or gr-soapy), and a recorder
of the flowgraphs built around it (for ``python -m phy.rf --dry-run`` and the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def tx_gain_db(rf: Any, tx_power_dbm: float, max_tx_power_dbm: float) -> float:
    """The radio gain for a planned power: rf.tx_gain_db at the bench's max power, dB for dB below."""
    return rf.tx_gain_db - (max_tx_power_dbm - tx_power_dbm)


@dataclass
class RadioSpec:
    """What a radio block would be opened with (printed by --dry-run; the flowgraph opens it for real)."""

    driver: str
    direction: str  # "tx" | "rx"
    device_args: str
    center_freq_hz: float
    sample_rate_hz: float
    gain_db: float
    antenna: str

    def describe(self) -> str:
        kind = {
            "uhd": {"tx": "uhd.usrp_sink", "rx": "uhd.usrp_source"},
            "soapy": {"tx": "soapy.sink", "rx": "soapy.source"},
        }[self.driver][self.direction]
        return (
            f"{kind}({self.device_args!r}, {self.center_freq_hz / 1e6:.3f} MHz, {self.sample_rate_hz / 1e6:.3f} "
            f"Msps, gain {self.gain_db:.1f} dB{', antenna ' + self.antenna if self.antenna else ''})"
        )


def open_radio(spec: RadioSpec) -> Any:
    """The GNU Radio block of a real radio (raises if the device is not there)."""
    if spec.driver == "uhd":
        from gnuradio import uhd

        stream = uhd.stream_args(cpu_format="fc32", channels=[0])
        if spec.direction == "tx":
            block = uhd.usrp_sink(spec.device_args, stream, "packet_len")
        else:
            block = uhd.usrp_source(spec.device_args, stream)
        block.set_samp_rate(spec.sample_rate_hz)
        block.set_center_freq(spec.center_freq_hz, 0)
        block.set_gain(spec.gain_db, 0)
        if spec.antenna:
            block.set_antenna(spec.antenna, 0)
        return block
    from gnuradio import soapy

    make = soapy.sink if spec.direction == "tx" else soapy.source
    driver = dict(kv.split("=", 1) for kv in spec.device_args.split(",") if "=" in kv).get("driver", "")
    block = make(f"driver={driver}", "fc32", 1, spec.device_args, "", [""], [""])
    block.set_sample_rate(0, spec.sample_rate_hz)
    block.set_frequency(0, spec.center_freq_hz)
    block.set_gain(0, spec.gain_db)
    if spec.antenna:
        block.set_antenna(0, spec.antenna)
    return block


class Wiring:
    """Records a flowgraph's blocks and connections as it is built (for --dry-run and tests)."""

    def __init__(self, tb: Any) -> None:
        self.tb = tb
        self.labels: dict[int, str] = {}
        self.edges: list[tuple[str, str]] = []

    def label(self, block: Any, text: str) -> Any:
        self.labels[id(block)] = text
        return block

    def chain(self, *blocks: Any) -> None:
        self.tb.connect(*blocks)
        names = [self.labels.get(id(b), type(b).__name__) for b in blocks]
        self.edges += list(zip(names, names[1:]))

    def msg(self, src: Any, src_port: str, dst: Any, dst_port: str) -> None:
        self.tb.msg_connect(src, src_port, dst, dst_port)
        self.edges.append(
            (
                f"{self.labels.get(id(src), type(src).__name__)}:{src_port}",
                f"{self.labels.get(id(dst), type(dst).__name__)}:{dst_port}",
            )
        )

    def describe(self) -> str:
        return "\n".join(f"  {a} --> {b}" for a, b in self.edges)

"""The radios of the rf link: what a radio block is opened with, opening it (gr-uhd or gr-soapy), finding the
devices and reading their settings back (bring-up, phy.bringup), and a recorder of the flowgraphs built around
them (``python -m phy.rf --dry-run``)."""

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


@dataclass
class RadioReadback:
    """What an opened radio reports it is set to (bring-up compares it with the RadioSpec it was opened with)."""

    sample_rate_hz: float
    center_freq_hz: float
    gain_db: float
    gain_range_db: tuple[float, float]
    lo_locked: bool | None  # None: the radio has no lo_locked sensor
    clock: str  # clock source and master clock, as reported


def read_back(block: Any, spec: RadioSpec) -> RadioReadback:
    """Ask a gr-uhd / gr-soapy block (or a stand-in with its own read_back()) what it is set to."""
    if hasattr(block, "read_back"):
        return block.read_back()
    if spec.driver == "uhd":
        rng = block.get_gain_range(0)
        locked = block.get_sensor("lo_locked", 0).to_bool() if "lo_locked" in block.get_sensor_names(0) else None
        return RadioReadback(
            block.get_samp_rate(),
            block.get_center_freq(0),
            block.get_gain(0),
            (rng.start(), rng.stop()),
            locked,
            f"{block.get_clock_source(0)}, master clock {block.get_clock_rate(0) / 1e6:g} MHz",
        )
    rng = block.get_gain_range(0)
    sensors = block.list_sensors(0)
    locked = str(block.read_sensor(0, "lo_locked")).lower() == "true" if "lo_locked" in sensors else None
    return RadioReadback(
        block.get_sample_rate(0),
        block.get_frequency(0),
        block.get_gain(0),
        (rng.minimum(), rng.maximum()),
        locked,
        f"{block.get_clock_source() or 'default'}, master clock {block.get_master_clock_rate() / 1e6:g} MHz",
    )


class HardwareRadios:
    """The real radios: found through UHD or SoapySDR, opened as the rf link opens them."""

    def __init__(self, driver: str) -> None:
        self.driver = driver

    def find(self, device_args: str) -> list[str]:
        return find_uhd(device_args) if self.driver == "uhd" else find_soapy(device_args)

    def open(self, spec: RadioSpec) -> Any:
        return open_radio(spec)


def find_uhd(device_args: str) -> list[str]:
    """UHD's uhd::device::find. gnuradio.uhd.find_devices wraps a binding find_devices_raw that GNU Radio 3.10.5's
    pybind module names find: call whichever binding exists."""
    from gnuradio.uhd import uhd_python

    find = getattr(uhd_python, "find_devices_raw", None) or uhd_python.find
    return [str(addr.to_string()) for addr in find(uhd_python.device_addr_t(device_args))]


def find_soapy(device_args: str) -> list[str]:
    """SoapySDR's enumerate, through its C API (gr-soapy does not expose it; python3-soapysdr is optional)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("SoapySDR")
    if name is None:
        raise RuntimeError("libSoapySDR not found (install SoapySDR)")
    lib = ctypes.CDLL(name)

    class Kwargs(ctypes.Structure):
        _fields_ = [
            ("size", ctypes.c_size_t),
            ("keys", ctypes.POINTER(ctypes.c_char_p)),
            ("vals", ctypes.POINTER(ctypes.c_char_p)),
        ]

    lib.SoapySDRDevice_enumerateStrArgs.restype = ctypes.POINTER(Kwargs)
    lib.SoapySDRDevice_enumerateStrArgs.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.SoapySDRKwargsList_clear.argtypes = [ctypes.POINTER(Kwargs), ctypes.c_size_t]
    count = ctypes.c_size_t(0)
    found = lib.SoapySDRDevice_enumerateStrArgs(device_args.encode(), ctypes.byref(count))
    out = []
    for i in range(count.value):
        kw = found[i]
        out.append(",".join(f"{kw.keys[j].decode()}={kw.vals[j].decode()}" for j in range(kw.size)))
    lib.SoapySDRKwargsList_clear(found, count.value)
    return out


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

"""Energy meter of an edge device: what one round of training and transmitting cost, in joules.

Compute: this process's CPU-seconds x the calibrated watts of one busy core. Where the RAPL package counter
is readable, the measured package energy of the window is used instead, attributed to this process by its
share of the machine's busy CPU time (several edges may share one host).
On a GPU, the GPU's own energy is added from NVML's counter (fedlora.accelerator.GpuEnergy); `source` says
which figures were measured and which were modelled.
Transmit: RF power / PA efficiency x airtime, plus the radio's on-power x airtime.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fedlora.accelerator import GpuEnergy

RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
RAPL_RANGE = Path("/sys/class/powercap/intel-rapl:0/max_energy_range_uj")


def dbm_to_w(power_dbm: float) -> float:
    return 10.0 ** (power_dbm / 10.0) / 1000.0


@dataclass
class ComputeEnergy:
    cpu_s: float
    wall_s: float
    energy_j: float
    source: str  # "rapl" or "cpu_model", then "+nvml" (GPU measured) or "+gpu_unmeasured" on a GPU


class ComputeWindow:
    """Measures one stretch of local work: `with meter.compute() as w: ...; w.result`."""

    def __init__(self, watts_per_core: float, gpu: GpuEnergy | None = None):
        self.watts_per_core = watts_per_core
        self.gpu = gpu
        self.result: ComputeEnergy | None = None

    def __enter__(self) -> ComputeWindow:
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        self._rapl0 = _read_rapl_uj()
        self._busy0 = _machine_busy_s()
        if self.gpu is not None:
            self.gpu.start()
        return self

    def __exit__(self, *exc) -> None:
        cpu_s = time.process_time() - self._cpu0
        wall_s = time.perf_counter() - self._wall0
        energy_j, source = cpu_s * self.watts_per_core, "cpu_model"
        rapl1, busy1 = _read_rapl_uj(), _machine_busy_s()
        if self._rapl0 is not None and rapl1 is not None and self._busy0 is not None and busy1 is not None:
            delta_uj = rapl1 - self._rapl0
            if delta_uj < 0:  # counter wrapped
                delta_uj += _read_int(RAPL_RANGE) or 0
            machine_busy_s = busy1 - self._busy0
            if delta_uj > 0 and machine_busy_s > 0:
                share = min(1.0, cpu_s / machine_busy_s)
                energy_j, source = delta_uj * 1e-6 * share, "rapl"
        if self.gpu is not None:
            gpu_j = self.gpu.stop()
            if gpu_j is None:
                source += "+gpu_unmeasured"
            else:
                energy_j, source = energy_j + gpu_j, source + "+nvml"
        self.result = ComputeEnergy(cpu_s=cpu_s, wall_s=wall_s, energy_j=energy_j, source=source)


@dataclass
class EnergyMeter:
    watts_per_core: float
    pa_efficiency: float
    radio_on_power_w: float
    gpu: GpuEnergy | None = None  # the GPU this edge trains on, if any

    def compute(self) -> ComputeWindow:
        return ComputeWindow(self.watts_per_core, self.gpu)

    def transmit_energy_j(self, tx_power_dbm: float, airtime_s: float) -> float:
        return transmit_energy_j(tx_power_dbm, airtime_s, self.pa_efficiency, self.radio_on_power_w)


def transmit_energy_j(tx_power_dbm: float, airtime_s: float, pa_efficiency: float, radio_on_power_w: float) -> float:
    """A transmitter's energy: RF power through the PA's efficiency plus the radio's own draw, for the airtime
    (an edge's uplink and the BS's downlink alike)."""
    return (dbm_to_w(tx_power_dbm) / pa_efficiency + radio_on_power_w) * airtime_s


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_rapl_uj() -> int | None:
    return _read_int(RAPL_ENERGY) if os.access(RAPL_ENERGY, os.R_OK) else None


def _machine_busy_s() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(x) for x in fields]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

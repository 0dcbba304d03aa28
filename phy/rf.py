"""rf link: the gr-zmq-iq flowgraphs on radios: gr-uhd (USRP B210) or gr-soapy (HackRF One and others).

    edge: frames --> OfdmTransmitter (rate b) --> to the radio rate, into its subband --> level --> radio sink
    BS:   radio source --> OverrunCounter --+--> SubbandChannelizer(dev 0) --> OfdmReceiver --> frames
                                           +--> SubbandChannelizer(dev 1) --> OfdmReceiver --> frames ... (fdma)
          radio source --> OverrunCounter --> SubbandChannelizer(whole band) --> OfdmReceiver --> frames    (tdma)

What the air process does in gr-zmq-iq, the radios and the room do here: path loss, fading, noise, carrier
offsets are real, and the SNR the BS records is what its receivers measured.

Access (bench ``rf.access``):

* ``fdma`` (USRP B210: full duplex, 12-bit, 61 dB of dynamic range or more): width = the device's planned
  bandwidth_hz. Centre: where phy.fdma lays the round's shares out side by side, as in the air, when the BS
  gives each edge its carrier (``RfUplinkReceiver.start_round`` returns them from ``plan_center_freqs_hz``, the
  BS puts each in the device's Plan, the edge calls ``RfUplinkTransmitter.set_center_freq_hz``); without one,
  slot k of an equal grid over the band (``rf_subbands``), the width capped at the slot (B / K).
* ``tdma`` (HackRF One: half duplex, docs/pitfalls.md §10; 8-bit, 2-20 Msps): every device uses the whole band,
  in turn: device k transmits only in slot k of a cycle of K slots of ``slot_s`` (``next_slot_start``), a burst
  longer than a slot is sent over several cycles, ``guard_s`` of each slot stays silent. Same-band bursts at once
  collide (docs/pitfalls.md, measured facts) and an 8-bit receiver cannot hold a 10 m and a 50 m device side by
  side in frequency.
  Slots follow the hosts' wall clocks: keep them NTP-synchronised (a few ms) and guard_s above their error.
  The rate is the whole band, so airtime = samples / total_bandwidth_hz; the plan's share is not used.

Transmit power: the planned tx_power_dbm sets the radio's gain, ``rf.tx_gain_db`` at radio.max_tx_power_dbm
and dB for dB below it; the gain-to-dBm relation of a radio needs a bench measurement (see the bench files).

Underruns and overruns of the radio blocks are counted per round (``take_radio_counts``; phy.rf_counters).

``python -m phy.rf --bench hw_configs/usrp_b210.yaml --dry-run`` prints both flowgraphs (blocks and
connections) and the settings without opening a radio; ``fedlora-radio-check`` (phy.bringup) checks the radios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phy import fdma
from phy.air_medium import to_medium
from phy.channel import DeviceGeometry, TxSetting
from phy.rf_counters import ASYNC_MSGS_PORT, has_out_port, overrun_counter, underrun_counter
from phy.rf_plan import bs_subbands, next_slot_start, plan_center_freqs_hz, rf_subbands, slot_groups
from phy.rf_radio import RadioSpec, Wiring, open_radio, tx_gain_db
from phy.subband_inbox import FrameInbox, frame_collector
from phy.uplink import RxFrame, TxReport, UplinkReceiver, UplinkTransmitter
from proto import numerology


# --------------------------------------------------------------------------------------------- BS
class RfReceiverFlowgraph:
    """BS: radio source --> per subband: SubbandChannelizer --> OfdmReceiver --> FrameCollector.

    source: a radio block, or any stream source of the radio's rate (tests: a vector source).
    """

    def __init__(
        self,
        source: Any,
        source_label: str,
        subbands: dict[int, fdma.Subband],
        sample_rate_hz: float,
        *,
        snr_offset_db: float = 0.0,
        attenuation_db: float = fdma.DEFAULT_ATTENUATION_DB,
    ) -> None:
        from gnuradio import gr

        from phy.ofdm_rx import OfdmReceiver

        self.tb = gr.top_block("rf_bs")
        self.wiring = Wiring(self.tb)
        self.inbox = FrameInbox()
        self.source = self.wiring.label(source, source_label)
        # in series: whatever the receivers decoded has passed the count (a round's count is complete)
        self.overruns = self.wiring.label(overrun_counter(), "OverrunCounter(rx_rate re-tags)")
        self.wiring.chain(self.source, self.overruns)
        self.channelizers, self.receivers, self.collectors = {}, {}, {}
        for k, subband in subbands.items():
            channelizer = self.wiring.label(
                fdma.SubbandChannelizer(subband, sample_rate_hz, attenuation_db=attenuation_db),
                f"SubbandChannelizer(dev {k}: {subband.center_hz / 1e3:+.1f} kHz, "
                f"{subband.bandwidth_hz / 1e3:.1f} kHz)",
            )
            receiver = self.wiring.label(OfdmReceiver(snr_offset_db), f"OfdmReceiver(dev {k})")
            collector = self.wiring.label(frame_collector(k, self.inbox), f"FrameCollector(dev {k})")
            self.wiring.chain(self.overruns, channelizer, receiver)
            self.wiring.msg(receiver, "out", collector, "in")
            self.channelizers[k], self.receivers[k], self.collectors[k] = channelizer, receiver, collector

    def retune(self, subbands: dict[int, fdma.Subband]) -> None:
        for k, subband in subbands.items():
            if k in self.channelizers and subband != self.channelizers[k].subband:
                self.channelizers[k].retune(subband)


class RfUplinkReceiver(UplinkReceiver):
    """BS side of the rf link: one radio receiving the whole band continuously."""

    def __init__(self, bench: Any, *, device_count: int, source: Any | None = None) -> None:
        rf = bench.rf
        self.bench, self.device_count = bench, device_count
        self.total_bandwidth_hz = bench.radio.total_bandwidth_hz
        self.spec = RadioSpec(
            rf.driver, "rx", rf.bs_device_args, rf.center_freq_hz, rf.sample_rate_hz, rf.rx_gain_db, rf.rx_antenna
        )
        self.address = f"rf:{rf.bs_device_args}"
        self.flowgraph = RfReceiverFlowgraph(
            source if source is not None else open_radio(self.spec),
            self.spec.describe(),
            self._subbands(None),
            rf.sample_rate_hz,
            snr_offset_db=bench.snr_offset_db,
        )
        self._closed = False
        self.flowgraph.tb.start()

    def _subbands(self, widths_hz: dict[int, float] | None) -> dict[int, fdma.Subband]:
        return bs_subbands(self.bench, self.device_count, widths_hz)

    def start_round(self, round_idx: int, widths_hz: Mapping[int, float]) -> dict[int, float]:
        """Listen where this round's shares put the devices (phy.fdma's layout, as in the air); returns each
        device's carrier for its Plan (tdma: the band's centre, where every device sends in its slot)."""
        center_freqs_hz = plan_center_freqs_hz(self.bench, widths_hz)
        if self.bench.rf.access == "tdma":
            self.flowgraph.inbox.active = None  # fixed slots never overlap
            self.flowgraph.retune(self._subbands(dict(widths_hz)))
            return center_freqs_hz
        centre_hz = self.bench.rf.center_freq_hz
        self.flowgraph.retune(
            {k: fdma.Subband(k, center_freqs_hz[k] - centre_hz, float(w)) for k, w in widths_hz.items()}
        )
        self.flowgraph.inbox.active = set(widths_hz)  # an idle receiver's old subband may overlap a new one
        return center_freqs_hz

    def take_radio_counts(self) -> dict[str, int | None]:
        """The BS radio's overruns since the last call (a receiver has no underruns: None)."""
        return {"underruns": None, "overruns": self.flowgraph.overruns.take()}

    @property
    def poll_socket(self) -> int:
        return self.flowgraph.inbox.fd

    def recv(self, timeout_s: float) -> list[RxFrame]:
        return [] if self._closed else self.flowgraph.inbox.take(timeout_s)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flowgraph.tb.stop()
            self.flowgraph.tb.wait()
            self.flowgraph.inbox.close()


# --------------------------------------------------------------------------------------------- edge
def edge_burst(
    frames: Sequence[bytes], setting: TxSetting, subband: fdma.Subband, sample_rate_hz: float, backoff_db: float
) -> np.ndarray:
    """OfdmTransmitter's burst at the subband rate, resampled to the radio rate, shifted into its subband, and
    scaled so the OFDM peaks (~10 dB above the mean) sit backoff_db under the DAC's full scale."""
    from phy.ofdm_tx import modulate

    burst = modulate(frames, setting.modulation)
    level = 10 ** (-(10.0 + backoff_db) / 20)
    return to_medium(burst, subband, sample_rate_hz, amplitude=level, cfo_hz=0.0, start_index=0)


class RfTransmitterFlowgraph:
    """Edge: burst (vector source, one packet_len tag: one UHD burst) --> radio sink, run once per burst."""

    def __init__(self, burst: np.ndarray, sink: Any, sink_label: str, underruns: Any | None = None) -> None:
        import pmt
        from gnuradio import blocks, gr

        self.tb = gr.top_block("rf_edge")
        self.wiring = Wiring(self.tb)
        tag = gr.tag_t()
        tag.offset, tag.key, tag.value = 0, pmt.intern("packet_len"), pmt.from_long(len(burst))
        source = self.wiring.label(
            blocks.vector_source_c(burst.tolist(), False, 1, [tag]),
            "burst (OfdmTransmitter -> resample to the radio rate -> shift into the subband -> level)",
        )
        self.wiring.chain(source, self.wiring.label(sink, sink_label))
        if underruns is not None:
            self.wiring.msg(sink, ASYNC_MSGS_PORT, self.wiring.label(underruns, "UnderrunCounter"), "in")


class RfUplinkTransmitter(UplinkTransmitter):
    """Edge side of the rf link: one radio; fdma: its fixed subband; tdma: its time slots."""

    def __init__(self, bench: Any, geometry: DeviceGeometry, *, device_count: int, sink_factory=None) -> None:
        self.bench, self.geometry, self.device_count = bench, geometry, device_count
        rf = bench.rf
        self.device_args = rf.edge_device_args[geometry.device_id % len(rf.edge_device_args)]
        self._sink_factory = sink_factory or open_radio
        self._sink = None
        self._underruns: Any | None = None  # gr-uhd sinks only (phy.rf_counters)
        self.center_freq_hz: float | None = None
        self.last_error: str | None = None

    def set_center_freq_hz(self, center_freq_hz: float | None) -> None:
        """The carrier of this device's subband from its round's Plan (fdma); None: its fixed slot."""
        self.center_freq_hz = None if center_freq_hz is None else float(center_freq_hz)

    def take_radio_counts(self) -> dict[str, int | None]:
        """The radio's underruns since the last call (None: its block does not report them; no overruns: TX).
        UHD reports an underflow within ~0.1 s, so one at the very end of a burst may count in the next call."""
        return {"underruns": None if self._underruns is None else self._underruns.take(), "overruns": None}

    def _rate_hz(self, setting: TxSetting) -> float:
        return self.bench.radio.total_bandwidth_hz if self.bench.rf.access == "tdma" else setting.bandwidth_hz

    def _subband(self, setting: TxSetting) -> fdma.Subband:
        if self.bench.rf.access == "tdma":
            return fdma.Subband(self.geometry.device_id, 0.0, self.bench.radio.total_bandwidth_hz)
        if self.center_freq_hz is not None:
            sb = fdma.Subband(
                self.geometry.device_id, self.center_freq_hz - self.bench.rf.center_freq_hz, setting.bandwidth_hz
            )
            if max(-sb.low_hz, sb.high_hz) > self.bench.radio.total_bandwidth_hz / 2 * (1 + 1e-9):
                raise ValueError(f"device {sb.device_id}: its subband {sb} leaves the band (rf.center_freq_hz +- B/2)")
            return sb
        return rf_subbands(
            self.bench.radio.total_bandwidth_hz, self.device_count, {self.geometry.device_id: setting.bandwidth_hz}
        )[self.geometry.device_id]

    def spec(self, setting: TxSetting) -> RadioSpec:
        rf = self.bench.rf
        return RadioSpec(
            rf.driver,
            "tx",
            self.device_args,
            rf.center_freq_hz,
            rf.sample_rate_hz,
            tx_gain_db(rf, setting.tx_power_dbm, self.bench.radio.max_tx_power_dbm),
            rf.tx_antenna,
        )

    def estimate_airtime_s(self, frame_sizes: Sequence[int], setting: TxSetting) -> float:
        return numerology.burst_airtime_s(frame_sizes, setting.modulation, self._rate_hz(setting))

    def send(self, frames: Sequence[bytes], setting: TxSetting, *, round_idx: int) -> TxReport:
        frames = [bytes(f) for f in frames]
        if not frames:
            return TxReport(0, 0, 0.0)
        rf = self.bench.rf
        rate_setting = TxSetting(setting.tx_power_dbm, self._rate_hz(setting), setting.modulation)
        spec = self.spec(setting)
        if self._sink is None:
            self._sink = self._sink_factory(spec)
            self._underruns = underrun_counter() if has_out_port(self._sink, ASYNC_MSGS_PORT) else None
        elif hasattr(self._sink, "set_gain"):
            self._sink.set_gain(spec.gain_db, 0) if rf.driver == "uhd" else self._sink.set_gain(0, spec.gain_db)
        if rf.access == "tdma":
            groups = slot_groups(
                [len(f) for f in frames], setting.modulation, rate_setting.bandwidth_hz, rf.slot_s - rf.guard_s
            )
        else:
            groups = [list(range(len(frames)))]
        for group in groups:
            burst = edge_burst(
                [frames[i] for i in group],
                rate_setting,
                self._subband(setting),
                rf.sample_rate_hz,
                rf.digital_backoff_db,
            )
            if rf.access == "tdma":
                start = next_slot_start(time.time(), self.geometry.device_id, self.device_count, rf.slot_s)
                time.sleep(max(0.0, start - time.time()))
            RfTransmitterFlowgraph(burst, self._sink, spec.describe(), self._underruns).tb.run()
        return TxReport(
            len(frames), sum(len(f) for f in frames), self.estimate_airtime_s([len(f) for f in frames], setting)
        )


# --------------------------------------------------------------------------------------------- dry run
def describe(bench: Any, device_count: int) -> str:
    """Both flowgraphs, built with stand-ins for the radios (nothing is opened), and the settings."""
    from gnuradio import blocks, gr

    rf = bench.rf
    lines = [
        f"bench {bench.name}: phy rf, driver {rf.driver}, access {rf.access}, {device_count} devices",
        f"  centre {rf.center_freq_hz / 1e6:.3f} MHz, radio rate {rf.sample_rate_hz / 1e6:.3f} Msps, band "
        f"{bench.radio.total_bandwidth_hz / 1e3:.1f} kHz, tx gain {rf.tx_gain_db} dB at "
        f"{bench.radio.max_tx_power_dbm} dBm, rx gain {rf.rx_gain_db} dB"
        + (f", slots of {rf.slot_s} s (guard {rf.guard_s} s)" if rf.access == "tdma" else ""),
    ]
    spec = RadioSpec(
        rf.driver, "rx", rf.bs_device_args, rf.center_freq_hz, rf.sample_rate_hz, rf.rx_gain_db, rf.rx_antenna
    )
    bs = RfReceiverFlowgraph(
        blocks.null_source(gr.sizeof_gr_complex),
        spec.describe(),
        bs_subbands(bench, device_count),
        rf.sample_rate_hz,
        snr_offset_db=bench.snr_offset_db,
    )
    lines += ["BS flowgraph:", bs.wiring.describe()]
    bs.inbox.close()
    share = bench.radio.total_bandwidth_hz / device_count
    for k in range(device_count):
        tx = RfUplinkTransmitter(bench, DeviceGeometry(k, bench.device(k).distance_m), device_count=device_count)
        setting = TxSetting(bench.radio.max_tx_power_dbm, share, "qpsk")
        sb = tx._subband(setting)
        edge = RfTransmitterFlowgraph(
            np.zeros(16, np.complex64), blocks.null_sink(gr.sizeof_gr_complex), tx.spec(setting).describe()
        )
        lines += [
            f"edge {k} ({tx.device_args}; subband {sb.center_hz / 1e3:+.1f} kHz, "
            f"{sb.bandwidth_hz / 1e3:.1f} kHz at an equal share):",
            edge.wiring.describe(),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phy.rf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="bench YAML with phy: rf")
    parser.add_argument("--bench-set", dest="bench_overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--devices", type=int, help="device count (default: the bench's device list)")
    parser.add_argument("--dry-run", action="store_true", help="print the flowgraphs and settings; open no radio")
    args = parser.parse_args(argv)
    from config import ConfigError, load_bench

    try:
        bench = load_bench(args.bench, args.bench_overrides)
    except ConfigError as exc:
        print(f"phy.rf: configuration error: {exc}", file=sys.stderr)
        return 2
    if bench.phy != "rf":
        print(f"phy.rf: {args.bench} is a {bench.phy!r} bench, not rf", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(
            "phy.rf: only --dry-run runs on its own; fedlora-run --bench <rf bench> drives the radios", file=sys.stderr
        )
        return 2
    print(describe(bench, args.devices or len(bench.devices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

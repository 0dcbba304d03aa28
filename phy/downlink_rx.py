"""An edge's downlink receiver: the IQ the air delivers (proto.air ``dl``) through the real OFDM receiver.

    [dl IQ] --> IqQueue --> OfdmReceiver --> PduCollector --> packets (CRC-checked, with the measured SNR)

One flowgraph, started on first use and kept running (an OFDM receiver's set-up is ~30 GNU Radio blocks). The
source hands on what ``decode`` pushed and waits inside work() when there is nothing (as the BS's MediumSource:
a source that returns empty-handed is put to sleep by GNU Radio's scheduler). The air puts noise before and
after every burst, so the receiver releases the burst's last packet.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
from gnuradio import gr

from phy.gr_loopback import PduCollector
from phy.ofdm_rx import OfdmReceiver
from phy.uplink import RxFrame
from proto import numerology

log = logging.getLogger(__name__)

IDLE_RETURN_S = 5.0  # work() returns with nothing after this long without samples (so a stop always ends it)


class IqQueue(gr.sync_block):
    """Samples pushed from Python as a stream; waits in work() (10 ms polls) while there are none."""

    def __init__(self) -> None:
        gr.sync_block.__init__(self, "downlink_iq_queue", None, [np.complex64])
        self._chunks: deque[np.ndarray] = deque()
        self._lock = threading.Lock()
        self._running = True
        self.pushed = 0  # samples pushed so far

    def push(self, iq: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(iq)
            self.pushed += len(iq)

    def stop(self) -> bool:
        self._running = False
        return True

    def work(self, input_items: Sequence[np.ndarray], output_items: Sequence[np.ndarray]) -> int:
        out = output_items[0]
        idle_since = time.monotonic()
        while self._running:
            with self._lock:
                if self._chunks:
                    chunk = self._chunks[0]
                    n = min(len(out), len(chunk))
                    out[:n] = chunk[:n]
                    if n < len(chunk):
                        self._chunks[0] = chunk[n:]
                    else:
                        self._chunks.popleft()
                    return n
            if time.monotonic() - idle_since >= IDLE_RETURN_S:
                return 0
            time.sleep(0.01)
        return 0


class DownlinkReceiver:
    """The edge's OFDM receiver for downlink bursts; ``decode`` one burst's IQ into the packets it holds."""

    def __init__(self, snr_offset_db: float = 0.0) -> None:
        self.tb = gr.top_block("downlink_rx")
        self.source = IqQueue()
        self.rx = OfdmReceiver(snr_offset_db)
        self.collector = PduCollector()
        self.tb.connect(self.source, self.rx)
        self.tb.msg_connect(self.rx, "out", self.collector, "in")
        self._closed = False
        self.crc_failures = 0
        self.tb.start()

    def decode(
        self, iq: np.ndarray, packets_sent: int | None = None, *, quiet_s: float = 0.5, timeout_s: float = 60.0
    ) -> list[RxFrame]:
        """The packets that passed the CRC in iq (complex64 at the burst's rate), with their measured SNR.

        Waits until packets_sent packets came out (CRC failures included), or the receiver took in every sample
        and then quiet_s passed without a packet (a packet lost to noise never comes), at most timeout_s. The
        decoder lags its input on a busy machine: a packet that comes out after that is returned by the next
        call."""
        if self._closed:
            raise RuntimeError("DownlinkReceiver is closed")
        self.source.push(np.ascontiguousarray(iq, dtype=np.complex64))
        end = self.source.pushed - numerology.SYMBOL_SAMPLES
        deadline = time.monotonic() + timeout_s
        packets: list[tuple[bytes, dict]] = []
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            got = self.collector.take(0.01)
            now = time.monotonic()
            if got:
                packets += got
                last_change = now
            if packets_sent is not None and len(packets) >= packets_sent:
                break
            if self.rx.samples_in() >= end and now - last_change >= quiet_s:
                break
        else:
            log.warning("downlink receiver: the burst was not decoded within %.0f s", timeout_s)
        frames = []
        for data, meta in packets:
            if not meta.get("crc_ok", False):
                self.crc_failures += 1
                continue
            snr = meta.get("snr_db")
            snr_db = float(snr) if isinstance(snr, (int, float)) and math.isfinite(snr) else None
            frames.append(RxFrame(data, snr_db, time.time()))
        return frames

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.source.stop()
            self.tb.stop()
            self.tb.wait()

"""Where the BS's subband receivers put their decoded frames: one inbox, read by the BS's poll loop.

Each subband's OfdmReceiver publishes PDUs on a message port; a FrameCollector per receiver (one Python message
block per port, docs/pitfalls.md §8) hands them to the FrameInbox from GNU Radio's threads, and a pipe makes the
BS's zmq.Poller wake up for them. Used by the gr-zmq-iq receiver and the rf receiver.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from typing import Any

from phy.uplink import RxFrame


class FrameInbox:
    """Decoded frames handed over from GNU Radio threads; a pipe makes the BS's zmq.Poller wake for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: list[RxFrame] = []
        self.fd, self._wake_w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_w, False)
        self.packets: dict[int, int] = {}
        self.crc_failures = 0
        # receivers whose subband is in the current plan; the others keep an old subband that may now be part of
        # another device's, so what they decode is dropped (None: all)
        self.active: set[int] | None = None

    def deliver(self, device_id: int, data: bytes, meta: dict[str, Any]) -> None:
        """From a receiver thread: one decoded packet (CRC failures are counted, not delivered)."""
        if self.active is not None and device_id not in self.active:
            return
        self.packets[device_id] = self.packets.get(device_id, 0) + 1
        if not meta.get("crc_ok", False):
            self.crc_failures += 1
            return
        snr = meta.get("snr_db")
        frame = RxFrame(data, float(snr) if isinstance(snr, (int, float)) and math.isfinite(snr) else None, time.time())
        with self._lock:
            self._frames.append(frame)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # pipe full: the poller is awake anyway
            pass

    def take(self, timeout_s: float) -> list[RxFrame]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass
            with self._lock:
                out, self._frames = self._frames, []
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(0.01, remaining))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._wake_w)


def frame_collector(device_id: int, inbox: FrameInbox) -> Any:
    """The message sink that feeds one receiver's PDUs (port ``in``) into the inbox as device_id's."""
    return _frame_collector_class()(device_id, inbox)


@functools.cache
def _frame_collector_class() -> type:
    """Built on first use, so that FrameInbox imports without GNU Radio."""
    import pmt
    from gnuradio import gr

    from phy.ofdm_decoder import pdu_to_result

    class FrameCollector(gr.basic_block):
        """Message sink for one receiver's PDUs; wakes the BS's poller through the inbox's pipe."""

        def __init__(self, device_id: int, sink: FrameInbox) -> None:
            gr.basic_block.__init__(self, f"zmq_iq_collector_{device_id}", None, None)
            self.device_id = device_id
            self.sink = sink
            self.message_port_register_in(pmt.intern("in"))
            self.set_msg_handler(pmt.intern("in"), self._handle)

        def _handle(self, msg: Any) -> None:
            data, meta = pdu_to_result(msg)
            self.sink.deliver(self.device_id, data, meta)

    return FrameCollector

"""Underruns and overruns of the rf link's radio blocks, counted where the blocks report them.

How the radio blocks report them (GNU Radio 3.10, gr-uhd and gr-soapy sources):

* overrun (RX: the host did not read samples fast enough, the radio dropped some): ``uhd.usrp_source`` logs
  "O", and after every overflow re-tags its next sample with ``rx_time``, ``rx_rate`` and ``rx_freq`` (the
  same tags it puts on the first sample after start()). ``soapy.source`` prints "sO" and re-tags the same way
  (``rx_time`` only if the device has hardware time: a HackRF has not). So every ``rx_rate`` tag after the
  stream's first sample is one overflow (a retune or a new sample rate while streaming would count too; the rf
  receiver does neither). gr-uhd's source also publishes overflow counts on its ``async_msgs`` port, but only
  once per logging interval (750 ms), so the tags are the per-round count.
* underrun (TX: the host did not deliver samples in time, the radio sent zeros): ``uhd.usrp_sink`` publishes
  every UHD async event on its ``async_msgs`` message port as ``("uhd_async_msg" . {"event_code": (underflow
  ...), "channel": n, ...})``; ``underflow`` and ``underflow_in_packet`` are underruns. ``soapy.sink`` only
  prints "sU" to stderr: nothing a flowgraph can count, so a soapy transmitter reports None.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

OVERFLOW_TAG_KEY = "rx_rate"  # re-emitted by both sources after an overflow
ASYNC_MSGS_PORT = "async_msgs"  # gr-uhd's message port of async events
UNDERFLOW_EVENTS = frozenset({"underflow", "underflow_in_packet"})


def has_out_port(block: Any, port: str) -> bool:
    """Whether a GNU Radio block has an output message port of this name (gr-uhd's sink has async_msgs)."""
    import pmt

    try:
        return port in [str(p) for p in pmt.to_python(block.message_ports_out())]
    except AttributeError:  # not a GNU Radio block (a test double)
        return False


def uhd_event_codes(msg: Any) -> list[str]:
    """The event codes of one gr-uhd async message (empty for anything else)."""
    import pmt

    if not pmt.is_pair(msg) or not pmt.is_dict(pmt.cdr(msg)):
        return []
    codes = pmt.dict_ref(pmt.cdr(msg), pmt.intern("event_code"), pmt.PMT_NIL)
    if pmt.is_symbol(codes):
        return [pmt.symbol_to_string(codes)]
    out = []
    while pmt.is_pair(codes):
        if pmt.is_symbol(pmt.car(codes)):
            out.append(pmt.symbol_to_string(pmt.car(codes)))
        codes = pmt.cdr(codes)
    return out


def overrun_counter() -> Any:
    """A pass-through block counting the source's overflows (``rx_rate`` tags after its first sample); ``take()``.

    It sits in series after the radio, so every sample a receiver decoded has been counted."""
    return _overrun_counter_class()()


def underrun_counter() -> Any:
    """A message sink counting gr-uhd's underflow events (port ``in``, fed from ``async_msgs``); ``take()``."""
    return _underrun_counter_class()()


@functools.cache
def _overrun_counter_class() -> type:
    import numpy
    import pmt
    from gnuradio import gr

    class OverrunCounter(gr.sync_block):
        """Counts re-tags of the radio stream: one per overflow (see the module docstring)."""

        def __init__(self) -> None:
            gr.sync_block.__init__(self, "overrun_counter", in_sig=[numpy.complex64], out_sig=[numpy.complex64])
            self._key = pmt.intern(OVERFLOW_TAG_KEY)
            self._lock = threading.Lock()
            self._count = 0

        def work(self, input_items: Any, output_items: Any) -> int:
            n = len(input_items[0])
            output_items[0][:] = input_items[0]
            later = [t for t in self.get_tags_in_window(0, 0, n, self._key) if t.offset > 0]
            if later:
                with self._lock:
                    self._count += len(later)
            return n

        def take(self) -> int:
            """Overflows since the last take."""
            with self._lock:
                count, self._count = self._count, 0
            return count

    return OverrunCounter


@functools.cache
def _underrun_counter_class() -> type:
    import pmt
    from gnuradio import gr

    class UnderrunCounter(gr.basic_block):
        """Counts underflow events of gr-uhd async messages.

        The sink's event thread publishes whenever UHD reports, also after the burst's flowgraph has stopped;
        messages that arrive then wait in this block's queue, and take() counts them too.
        """

        def __init__(self) -> None:
            gr.basic_block.__init__(self, "underrun_counter", None, None)
            self._port = pmt.intern("in")
            self.message_port_register_in(self._port)
            self.set_msg_handler(self._port, self._handle)
            self._lock = threading.Lock()
            self._count = 0

        def _handle(self, msg: Any) -> None:
            n = sum(code in UNDERFLOW_EVENTS for code in uhd_event_codes(msg))
            with self._lock:
                self._count += n

        def take(self) -> int:
            """Underruns since the last take (queued messages included)."""
            while self.nmsgs(self._port) > 0:
                msg = self.delete_head_nowait(self._port)
                if msg is None:
                    break
                self._handle(msg)
            with self._lock:
                count, self._count = self._count, 0
            return count

    return UnderrunCounter

"""Bursts to the air in chunks: a ``burst`` or ``dl_burst`` header naming its samples and chunks, then its IQ as
``chunk`` messages of CHUNK_SAMPLES but the last (proto.air). ``burst_messages`` writes them (the edge's and the
BS's side), ``BurstAssembler`` puts them together again (the air's).

Why chunks: the air's request socket then takes no part larger than one chunk, and ZeroMQ's size limit is also
what a stranger can make it hold during the CURVE handshake (docs/security.md, "The air before authentication").

The air admits a header against the plan first (phy.air_server); only an admitted burst gets a buffer, of exactly
its declared size, and a peer has at most one burst in reassembly. A slot (a device, or the downlink) has at most
one too: a new admitted header for it drops the old one (an edge restarted on a new socket). The chunks of a
refused burst are counted and dropped without being stored. So what reassembly holds is at most the admitted
headers' sizes: one burst per planned device and one downlink burst.

No sockets and no numeric work here: the server decodes messages and hands them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proto.air import (
    CHUNK_BYTES,
    IQ_SAMPLE_BYTES,
    AirMessageError,
    BurstHeader,
    ChunkFrames,
    DownlinkHeader,
    IqChunk,
)

DOWNLINK_SLOT = -1  # the slot of the BS's downlink bursts; a device's slot is its id

Header = BurstHeader | DownlinkHeader


def burst_messages(header: Header, iq: np.ndarray) -> list[list[bytes | memoryview]]:
    """What a peer sends the air for one burst: [header], then [chunk, IQ] for each of header.chunks (the IQ parts
    are views of iq, for send_multipart(copy=False))."""
    raw = np.ascontiguousarray(iq, dtype=np.complex64).view(np.uint8).data
    if len(raw) != header.samples * IQ_SAMPLE_BYTES:
        raise ValueError(
            f"{header.type}: {len(raw) // IQ_SAMPLE_BYTES} samples of IQ, its header says {header.samples}"
        )
    messages: list[list[bytes | memoryview]] = [[header.encode()]]
    for index in range(header.chunks):
        chunk = IqChunk(burst_id=header.burst_id, index=index).encode()
        messages.append([chunk, raw[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]])
    return messages


@dataclass
class _Pending:
    header: Header
    slot: int | None  # None: refused
    buffer: np.ndarray | None  # uint8, the declared size; None: refused, its chunks are dropped
    next_index: int = 0


class BurstAssembler:
    """Bursts in reassembly, one per peer (the ROUTER identity of its connection)."""

    def __init__(self) -> None:
        self._pending: dict[bytes, _Pending] = {}
        self.stats = {"chunks": 0, "chunks_dropped": 0}

    def start(self, identity: bytes, header: Header, slot: int) -> None:
        """An admitted header: a buffer of its declared size (allocated, not touched: pages count as chunks fill
        them), in place of this peer's burst and of the slot's."""
        for peer in [p for p, pending in self._pending.items() if pending.slot == slot]:
            del self._pending[peer]
        self._pending[identity] = _Pending(header, slot, np.empty(header.samples * IQ_SAMPLE_BYTES, dtype=np.uint8))

    def refuse(self, identity: bytes, header: Header) -> None:
        """A refused header: its chunks, which follow it anyway, are dropped unread (no error for each)."""
        self._pending[identity] = _Pending(header, None, None)

    def kind_of(self, identity: bytes) -> str:
        """The type of the burst this peer's chunks belong to ("" when none): what an error about one names."""
        pending = self._pending.get(identity)
        return pending.header.type if pending else ""

    def add(self, identity: bytes, chunk: ChunkFrames) -> tuple[Header, np.ndarray] | None:
        """Store one chunk; the whole burst (header, complex64 IQ) when it was the last. A chunk that does not fit
        the burst this peer announced raises AirMessageError and ends that burst (its other chunks are dropped)."""
        pending = self._pending.get(identity)
        if pending is None:
            raise AirMessageError("chunk", "no burst announced by this peer (a chunk follows its burst's header)")
        header, index = pending.header, chunk.header.index
        if pending.buffer is None:
            self.stats["chunks_dropped"] += 1
            if index + 1 >= header.chunks:
                del self._pending[identity]
            return None
        try:
            self._check(pending, chunk)
        except AirMessageError:
            self.refuse(identity, header)
            raise
        pending.buffer[index * CHUNK_BYTES : index * CHUNK_BYTES + len(chunk.iq)] = np.frombuffer(chunk.iq, np.uint8)
        pending.next_index += 1
        self.stats["chunks"] += 1
        if pending.next_index < header.chunks:
            return None
        del self._pending[identity]
        return header, pending.buffer.view(np.complex64)

    def pending_bytes(self) -> int:
        """The declared sizes of the bursts in reassembly (what their buffers may grow to)."""
        return sum(p.buffer.nbytes for p in self._pending.values() if p.buffer is not None)

    @staticmethod
    def _check(pending: _Pending, chunk: ChunkFrames) -> None:
        header, index = pending.header, chunk.header.index
        if chunk.header.burst_id != header.burst_id:
            raise AirMessageError(
                "chunk", f"field 'burst_id': {chunk.header.burst_id}, this peer's {header.type} is {header.burst_id}"
            )
        if index != pending.next_index:
            raise AirMessageError(
                "chunk", f"field 'index': {index}, expected {pending.next_index} of {header.chunks} (in order)"
            )
        expected = min(CHUNK_BYTES, header.samples * IQ_SAMPLE_BYTES - index * CHUNK_BYTES)
        if len(chunk.iq) != expected:
            raise AirMessageError(
                "chunk",
                f"chunk {index} of {header.type} {header.burst_id} holds {len(chunk.iq) // IQ_SAMPLE_BYTES} samples, "
                f"expected {expected // IQ_SAMPLE_BYTES}",
            )

"""The edge's end of the control plane: one zmq DEALER connected to the BS's ROUTER.

Register, heartbeat, receive plans (with their attachment), send burst_end and wait for the ack, send the
report, say bye. Every message from the BS is decoded by `proto.control.decode_control`; garbage is logged and
skipped, never fatal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import zmq

from proto.control import (
    Ack,
    BurstEnd,
    Bye,
    ControlMessage,
    EdgeMessage,
    Heartbeat,
    MessageError,
    Plan,
    Register,
    Reject,
    Shutdown,
    Welcome,
    decode_control,
    encode,
)
from trust.curve import make_client, routing_id
from trust.keys import KeyPair

log = logging.getLogger("edge")
Received = tuple[ControlMessage, bytes | None]  # a message and its attachment


class BsClient:
    def __init__(
        self,
        bs_address: str,
        device_id: int,
        *,
        stopping: Callable[[], bool] = lambda: False,
        context: zmq.Context | None = None,
        key: KeyPair | None = None,
    ):
        """stopping: polled while waiting, so a stop request ends every wait promptly. key: this device's key
        pair; with it the socket speaks CURVE to the BS whose public key the key file names (docs/security.md)."""
        self.key = key
        self.bs_address = bs_address
        self.device_id = device_id
        self.stopping = stopping
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, routing_id(device_id))  # unguessable: no other peer can claim it first
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)  # a vanished BS is retried with back-off up to 5 s
        if key is not None:
            assert key.bs_public is not None  # load_key checks a device key file carries it
            make_client(self.sock, key, key.bs_public)
        self.sock.connect(bs_address)
        self._queued: list[Received] = []  # what arrived while waiting for an ack: handled next

    # ------------------------------------------------------------------------------------------ plumbing
    def send(self, message: EdgeMessage, attachment: bytes | None = None) -> None:
        self.sock.send_multipart([encode(message)] + ([attachment] if attachment is not None else []))

    def recv(self, timeout_s: float) -> Received | None:
        """Next valid message from the BS (queued first), or None after timeout. Garbage is logged, skipped."""
        if self._queued:
            return self._queued.pop(0)
        deadline = time.monotonic() + timeout_s
        while not self.stopping():
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(remaining_ms):
                return None
            parts = self.sock.recv_multipart()
            try:
                if len(parts) not in (1, 2):
                    raise MessageError(f"{len(parts)} message parts (expected 1 or 2)")
                return decode_control(parts[0]), (parts[1] if len(parts) == 2 else None)
            except MessageError as exc:
                log.warning("ignored bad message from BS %s: %s", self.bs_address, exc)
        return None

    # ------------------------------------------------------------------------------------------ messages
    def register(self) -> Welcome | None:
        """Register until welcomed; None if the BS rejects this device, ends the run, or we are stopped."""
        tries = 0
        while not self.stopping():
            tries += 1
            if tries == 7:  # ~30 s: a CURVE handshake that fails is silent, so say what to check
                log.warning(
                    "edge %d: no welcome from %s after 30 s. Is the BS up at that address? %s",
                    self.device_id,
                    self.bs_address,
                    "Does this key file belong to that BS's roster?"
                    if self.key is not None
                    else "If its bench seals frames (security.mode: sealed), start this edge with --key FILE.",
                )
            self.send(Register(device_id=self.device_id, host=socket.gethostname(), pid=os.getpid()))
            got = self.recv(5.0)
            while got is not None:
                msg, _ = got
                if isinstance(msg, Welcome) and msg.device_id == self.device_id:
                    return msg
                if isinstance(msg, Reject) and msg.kind == "register_first":
                    got = self.recv(0.5)  # answers a message sent before this registration: wait on
                    continue
                if isinstance(msg, Reject):
                    log.error("edge %d: BS rejected registration: %s", self.device_id, msg.reason)
                    return None
                if isinstance(msg, Shutdown):
                    return None
                got = self.recv(0.5)
            log.info("edge %d: no welcome yet from %s, retrying", self.device_id, self.bs_address)
        return None

    def heartbeat(
        self,
        state: str,
        *,
        round_idx: int | None = None,
        step: int | None = None,
        steps: int | None = None,
        loss: float | None = None,
    ) -> None:
        self.send(Heartbeat(device_id=self.device_id, state=state, round=round_idx, step=step, steps=steps, loss=loss))

    def request_ack(
        self, round_idx: int, attempt: int, seqs: list[int], total: int, timeout_s: float
    ) -> set[int] | None:
        """ARQ feedback over the control plane: which frames of this round the BS holds so far (None: no answer,
        or the BS moved on; a plan, shutdown or welcome that came instead is kept for `recv`)."""
        self.send(BurstEnd(device_id=self.device_id, round=round_idx, attempt=attempt, seqs=list(seqs), total=total))
        deadline = time.monotonic() + timeout_s
        while not self.stopping() and time.monotonic() < deadline:
            got = self.recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                break
            msg, _ = got
            if isinstance(msg, Ack) and msg.round == round_idx and msg.attempt == attempt:
                return set(msg.received)
            if isinstance(msg, (Plan, Shutdown, Welcome)):
                self._queued.append(got)  # the BS moved on: stop this round's ARQ
                return None
        log.warning("edge %d: no ack for round %d attempt %d", self.device_id, round_idx, attempt)
        return None

    def moved_on(self) -> bool:
        """Has a plan, shutdown or welcome come (kept for `recv`)? Then this round's exchange with the BS is over.
        Other messages (a late ack on the control plane, a report_ack) are dropped."""
        while (got := self.recv(0.0)) is not None:
            if isinstance(got[0], (Plan, Shutdown, Welcome)):
                self._queued.append(got)
                return True
        return False

    def bye(self, reason: str) -> None:
        """Tell the BS we leave; best effort (the BS may be gone already)."""
        try:
            self.send(Bye(device_id=self.device_id, reason=reason))
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.close()

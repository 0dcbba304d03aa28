"""The BS's sockets: the control plane (one zmq ROUTER every edge connects to), the uplink receiver, the registry
of edges and their liveness.

It decodes every control message with `proto.control.decode_control`, answers registrations itself (welcome or
reject), and hands the round logic typed events: registrations, messages from registered edges, uplink frames.
Bad messages are logged with their peer and ignored; a message from a peer that is not registered under the
device id it claims is answered with a reject, so an edge that outlived a BS restart registers again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from bs_node.live_view import LiveView
from bs_node.rounds.ports import Clock, EdgeInfo, Event, FrameReceived, FromEdge, Registered
from phy.uplink import DownlinkBurst, TxReport, UplinkReceiver
from proto.control import (
    MAX_MESSAGE_BYTES,
    BsMessage,
    BurstEnd,
    Bye,
    ControlMessage,
    Heartbeat,
    MessageError,
    Register,
    Reject,
    Report,
    ViewStatus,
    Welcome,
    decode_control,
    encode,
)
from trust.curve import make_server, recv_bounded, routing_id_device, sender_of, user_device
from trust.keys import KeyPair
from trust.sealing import FrameKeyring

log = logging.getLogger("bs")
# Messages queued per connected edge before its connection stops being read (libzmq counts whole messages): an
# edge has at most a heartbeat, a burst_end or view_status, a report and a bye in flight at once.
CONTROL_RCVHWM = 64


@dataclass
class Edge:
    """What the BS knows of one registered edge."""

    device_id: int
    identity: bytes
    host: str
    pid: int
    last_seen: float
    frame_salt: bytes | None = None  # of its registration: a repeated register from the same process keeps it
    frame_key: bytes | None = None
    state: str = "registered"  # then what its heartbeats say (ready, idle, training, ...); offline after bye


class ZmqTransport:
    """Implements `bs_node.rounds.RoundTransport` over a zmq ROUTER socket and the bench's uplink receiver."""

    def __init__(
        self,
        *,
        control_address: str,
        uplink: UplinkReceiver,
        device_count: int,
        welcome: Mapping[str, Any],
        view: LiveView,
        keyring: FrameKeyring | None = None,
        curve_key: KeyPair | None = None,
        silence_timeout_s: float = 30.0,
        clock: Clock = time.monotonic,
        context: zmq.Context | None = None,
    ):
        """welcome: the fields every welcome carries besides the device id (experiment, bench, run_id,
        data_address). keyring: issues each registration its frame key (None: frames are not sealed).
        curve_key: the BS's key pair; with it the control plane is CURVE, and the process's authenticator
        (trust.curve) admits only roster keys, so every message names the device whose key sent it."""
        self.keyring = keyring
        self.curve = curve_key is not None
        self._impostors: set[tuple[int | None, str]] = set()  # (key's device, what it claimed) logged once
        self._unregistered_logged: set[bytes] = set()
        self.rejected: Counter[str] = Counter()  # control messages refused, by reason (summary.json)
        self.uplink = uplink
        self.device_count = device_count
        self.welcome = dict(welcome)
        self.view = view
        self.silence_timeout_s = silence_timeout_s
        self.clock = clock
        self.ctx = context or zmq.Context.instance()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 500)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished edge raises instead of vanishing
        # an edge sends one JSON part (proto.control: at most MAX_MESSAGE_BYTES), a few at a time: bigger parts
        # close the connection at their header, before or after the handshake (docs/security.md)
        self.control.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.control.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
        if curve_key is not None:
            make_server(self.control, curve_key, max_message_bytes=MAX_MESSAGE_BYTES)
        self.control.bind(control_address)
        self.control_endpoint: str = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        if self.uplink.poll_socket is not None:
            self.poller.register(self.uplink.poll_socket, zmq.POLLIN)
        self.edges: dict[int, Edge] = {}

    # ------------------------------------------------------------------------------------------ events
    def poll(self, timeout_s: float) -> list[Event]:
        events: list[Event] = []
        ready = dict(self.poller.poll(int(timeout_s * 1000)))
        if self.control in ready:
            for _ in range(1000):  # drain what is there, bounded so data frames are not starved
                try:
                    frames, count = recv_bounded(self.control, 3, zmq.NOBLOCK)  # [routing id, message, attachment]
                except zmq.Again:
                    break
                sender = sender_of(frames[-1]) if self.curve else None
                event = self._on_control_safely([f.bytes for f in frames], count, sender)
                if event is not None:
                    events.append(event)
        if self.uplink.poll_socket is None or self.uplink.poll_socket in ready:
            events.extend(FrameReceived(rx.data, rx.snr_db) for rx in self.uplink.recv(0.0))
        return events

    def drain_frames(self, quiet_s: float, max_wait_s: float) -> Iterator[FrameReceived]:
        return (FrameReceived(rx.data, rx.snr_db) for rx in self.uplink.drain_until_quiet(quiet_s, max_wait_s))

    def _on_control_safely(self, parts: list[bytes], count: int, sender: str | None) -> Event | None:
        """One peer's message can cost that message, never the BS: whatever escapes the checks is logged."""
        try:
            return self._on_control(parts, count, sender)
        except Exception:
            self.rejected["error"] += 1
            log.exception("control: a message from peer %r could not be handled; ignored", parts[0][:64])
            return None

    def _on_control(self, parts: list[bytes], count: int, sender: str | None) -> Event | None:
        """count: the parts the message had (those beyond the first three were read and dropped)."""
        identity = parts[0]
        try:
            if count not in (2, 3):
                raise MessageError(f"{count - 1} message parts (expected 1 or 2)")
            msg = decode_control(parts[1])
        except MessageError as exc:
            self.rejected["malformed"] += 1
            log.warning("control: ignored bad message from peer %r: %s", identity[:64], exc)
            return None
        if self.curve and self._impostor(identity, msg, user_device(sender)):
            return None
        if isinstance(msg, Register):
            return self._on_register(identity, msg)
        device_id = getattr(msg, "device_id", None)
        edge = self.edges.get(device_id) if isinstance(device_id, int) else None
        if edge is None or edge.identity != identity:
            self.rejected["unregistered"] += 1
            if identity not in self._unregistered_logged and len(self._unregistered_logged) < 1024:
                self._unregistered_logged.add(identity)  # once per peer: a reconnecting edge flushes its queue
                log.warning(
                    "control: %s from unregistered peer %r (device %s) ignored", msg.type, identity[:64], device_id
                )
            if not isinstance(msg, Bye):  # e.g. an edge that outlived a BS restart: tell it to register again
                self._send_raw(
                    identity, Reject(reason="not registered with this BS run: register first", kind="register_first")
                )
            return None
        edge.last_seen = self.clock()
        if isinstance(msg, Heartbeat):
            edge.state = msg.state
        elif isinstance(msg, Bye):
            edge.state = "offline"
            self.view.line(f"edge {edge.device_id} left: {msg.reason or ''}")
        elif isinstance(msg, Report):
            msg = self.uplink.recorded_report(msg)
        elif not isinstance(msg, (BurstEnd, ViewStatus)):
            log.warning("control: unexpected %s from device %d ignored", msg.type, edge.device_id)
            return None
        return FromEdge(edge.device_id, msg)

    def _impostor(self, identity: bytes, msg: ControlMessage, key_device: int | None) -> bool:
        """A routing id, and a message's device, speak only for the key's own device: refused (a registration is
        told why), counted and logged once per (key, claim)."""
        claimed = getattr(msg, "device_id", None)
        if routing_id_device(identity) != key_device:
            reason = f"routing id {identity[:20]!r} is not this key's device's"
            self._log_impostor(key_device, f"routing id {identity[:20]!r}", msg.type)
        elif claimed != key_device:
            reason = f"this key belongs to device {key_device}, not {claimed}"
            self._log_impostor(key_device, f"device {claimed}", msg.type)
        else:
            return False
        self.rejected["impostor"] += 1
        if isinstance(msg, Register):
            self._send_raw(identity, Reject(reason=reason))
        return True

    def _log_impostor(self, key_device: int | None, claimed: str, message_type: str) -> None:
        """Once per (key, claim): a flood of impostures costs bounded memory and a line each up to the bound."""
        if (key_device, claimed) not in self._impostors and len(self._impostors) < 1024:
            self._impostors.add((key_device, claimed))
            log.warning("control: the key of device %s sent a %s as %s: refused", key_device, message_type, claimed)

    def _on_register(self, identity: bytes, msg: Register) -> Registered | None:
        device_id = msg.device_id
        if not 0 <= device_id < self.device_count:
            self._send_raw(identity, Reject(reason=f"device id {device_id} is outside 0..{self.device_count - 1}"))
            return None
        if self.keyring is not None and not self.keyring.knows(device_id):
            self._send_raw(identity, Reject(reason=f"device id {device_id} has no key in this BS's roster"))
            return None
        old = self.edges.get(device_id)
        replaced = old is not None and old.identity != identity
        if old is not None and replaced:
            self.view.line(f"edge {device_id} re-registered from {msg.host} pid {msg.pid} (was pid {old.pid})")
        elif old is None:
            self.view.line(f"edge {device_id} registered from {msg.host} pid {msg.pid}")
        if old is not None and not replaced:  # the same process asked again (its welcome may be on the way)
            salt, key = old.frame_salt, old.frame_key
        else:
            salt, key = self.keyring.issue(device_id) if self.keyring is not None else (None, None)
        self.edges[device_id] = Edge(device_id, identity, msg.host, msg.pid, self.clock(), salt, key)
        welcome = Welcome(device_id=device_id, frame_salt=None if salt is None else salt.hex(), **self.welcome)
        self._send_raw(identity, welcome)
        return Registered(device_id, replaced, frame_key=key)

    # ------------------------------------------------------------------------------------------ registry
    def ready_devices(self) -> list[EdgeInfo]:
        now = self.clock()
        return [
            EdgeInfo(e.device_id, e.host)
            for e in sorted(self.edges.values(), key=lambda e: e.device_id)
            if e.state not in ("registered", "offline") and now - e.last_seen < self.silence_timeout_s
        ]

    def silent_for_s(self, device_id: int) -> float | None:
        edge = self.edges.get(device_id)
        if edge is None:
            return None
        silent_s = self.clock() - edge.last_seen
        return silent_s if silent_s > self.silence_timeout_s else None

    def is_registered(self, device_id: int) -> bool:
        return device_id in self.edges

    def start_round(self, round_idx: int, bandwidth_hz: Mapping[int, float]) -> dict[int, float]:
        """The PHY's subbands for the round's shares; returns the carriers the devices must be told (radios)."""
        self.uplink.flush_recording()  # the last round's IQ annotations, before this round adds to them
        return self.uplink.start_round(round_idx, dict(bandwidth_hz))

    def rejected_messages(self) -> dict[str, int]:
        return dict(self.rejected)

    def take_radio_counts(self) -> dict[str, int | None]:
        return self.uplink.take_radio_counts()

    # ------------------------------------------------------------------------------------------ sends
    def send(self, device_id: int, message: BsMessage, attachment: bytes | None = None) -> bool:
        edge = self.edges.get(device_id)
        if edge is None:
            log.warning("control: no edge %d to send a %s to", device_id, message.type)
            return False
        if self._send_raw(edge.identity, message, attachment):
            return True
        if edge.state != "offline":  # the ROUTER knows the peer's connection is gone: a crash or a disconnect
            edge.state = "offline"
            self.view.line(f"edge {device_id} is disconnected (a {message.type} could not be delivered)")
        return False

    def broadcast(self, message: BsMessage) -> None:
        for edge in list(self.edges.values()):
            if edge.state != "offline":
                self.send(edge.device_id, message)

    def send_downlink(self, burst: DownlinkBurst) -> TxReport:
        return self.uplink.send_downlink(burst)

    def _send_raw(self, identity: bytes, message: BsMessage, attachment: bytes | None = None) -> bool:
        parts = [identity, encode(message)] + ([attachment] if attachment is not None else [])
        try:
            self.control.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("control: could not send %s to %r: %s", message.type, identity, exc)
            return False

    def close(self) -> None:
        self.uplink.close()
        self.control.close()

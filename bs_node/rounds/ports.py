"""What the round state machine needs from the world: a transport (events in, messages out) and a model.

The real process plugs in `bs_node.transport.ZmqTransport` and `bs_node.global_model.GlobalModel`; a test plugs
in an in-memory transport on a fake clock. Nothing here knows about sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bs_node.controllers.costs import ModelShape
from phy.uplink import DownlinkBurst, TxReport
from proto.control import BsMessage, BurstEnd, Bye, Heartbeat, Report, ViewStatus

if TYPE_CHECKING:  # pragma: no cover
    from fedlora.aggregation import ClientUpdate

Clock = Callable[[], float]  # monotonic seconds


@dataclass(frozen=True)
class Registered:
    """A device registered (and was welcomed); `replaced`: a new process took over a known device id.
    `frame_key`: the key its frames are sealed under from now on (None when the bench does not seal frames)."""

    device_id: int
    replaced: bool
    frame_key: bytes | None = None


@dataclass(frozen=True)
class FromEdge:
    """A message from a registered edge (the transport checked that its sender owns `device_id`)."""

    device_id: int
    message: Heartbeat | BurstEnd | ViewStatus | Report | Bye


@dataclass(frozen=True)
class FrameReceived:
    """One packet off the uplink with the receiver's measured SNR (None if the PHY measures none)."""

    data: bytes
    snr_db: float | None


Event = Registered | FromEdge | FrameReceived


@dataclass(frozen=True)
class EdgeInfo:
    device_id: int
    host: str


class RoundTransport(Protocol):
    """The BS's sockets and registry of edges, as the round logic sees them."""

    def poll(self, timeout_s: float) -> list[Event]:
        """What arrived within timeout_s: control messages first, then uplink frames."""
        ...

    def drain_frames(self, quiet_s: float, max_wait_s: float) -> Iterator[FrameReceived]:
        """Uplink frames until none came for quiet_s (at most max_wait_s): the PHY may lag the control plane.
        Lazy: the caller handles each frame before more are taken off the PHY (a flood must not pile up)."""
        ...

    def ready_devices(self) -> list[EdgeInfo]:
        """Registered edges that said they are ready and were heard within the silence timeout, by device id."""
        ...

    def silent_for_s(self, device_id: int) -> float | None:
        """Seconds since the device was last heard, if that exceeds the silence timeout; else None."""
        ...

    def start_round(self, round_idx: int, bandwidth_hz: Mapping[int, float]) -> dict[int, float]:
        """Tell the uplink receiver the round's subband schedule (PHYs without one ignore it); returns the carrier
        (Hz) of each device that must be told it (radios), else nothing."""
        ...

    def take_radio_counts(self) -> dict[str, int | None]:
        """The BS radio's overruns (and underruns) since the last call; None where nothing counts them."""
        ...

    def is_registered(self, device_id: int) -> bool:
        """The device registered in this run (offline or not)."""
        ...

    def rejected_messages(self) -> dict[str, int]:
        """Control messages refused so far, by reason (malformed, impostor, unregistered, error)."""
        ...

    def send(self, device_id: int, message: BsMessage, attachment: bytes | None = None) -> bool:
        """Send to a registered edge; False if it could not be delivered (the edge is then offline)."""
        ...

    def broadcast(self, message: BsMessage) -> None:
        """Send to every edge not offline."""
        ...

    def send_downlink(self, burst: DownlinkBurst) -> TxReport:
        """One burst of downlink frames over the PHY to these devices (bench downlink.over_phy)."""
        ...


class RoundModel(Protocol):
    """The learning side of a round: views down, updates up, aggregate, evaluate."""

    max_rank: int
    num_layers: int
    model_shape: ModelShape

    def examples(self, device_id: int) -> int: ...

    def adapter_view(self, rank: int, depth: int, round_idx: int) -> bytes: ...

    def max_update_bytes(self, rank: int, depth: int) -> int:
        """The largest update of this module the codec accepts: the bound of what reassembly holds for it."""
        ...

    def decode_update(self, payload: bytes, *, rank: int, depth: int, round_idx: int, device_id: int) -> ClientUpdate:
        """The device's update, checked against its plan and against what aggregation relies on; raises
        ValueError (CodecError, UpdateError) for a bad one, which then fails that device only."""
        ...

    def aggregate(
        self, updates: Mapping[int, ClientUpdate], absent: Sequence[int], capabilities: Mapping[int, tuple[int, int]]
    ) -> dict[str, Any]:
        """Step the adapter by the aggregate of `updates` (device -> update, stale ones included); `absent`: the
        devices present without one; `capabilities`: device -> (rank, depth) it is able to train. Returns what the
        aggregator measured (for the round record); raises if the step cannot be taken (nothing changed)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Accuracy and loss on the test set (reported only)."""
        ...

    def validate(self) -> dict[str, float]:
        """Accuracy and loss on the devices' held-out validation parts (NaN when nothing is held out)."""
        ...

    def adapter_state(self) -> dict[str, Any]: ...

    def load_adapter_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's adapter (ValueError if it is not this model's)."""
        ...

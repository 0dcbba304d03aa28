"""Identities and sealed frames (docs/security.md): provisioning, key files, key agreement, the gate, and forged,
replayed and mis-keyed frames going through the BS's real receive path (gate -> reassembly -> codec ->
aggregation) without displacing the genuine ones."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import zmq

from bs_node.rounds import FrameReceived
from proto.air import FrameSidecar
from proto.control import Register
from proto.framing import Frame, fragment
from tests.bs_fakes import frame_key_of, make_station, sends_update, update_frames
from tests.processes import ENV, REPO, Procs, read_rounds, wait_for
from trust.curve import make_client, routing_id, routing_id_device
from trust.keys import (
    KeyFileError,
    KeyPair,
    Roster,
    device_secret_file,
    generate_pair,
    load_bs_key,
    load_key,
    load_roster,
    provision,
)
from trust.run_files import RunFileError, checkpoint_key
from trust.sealing import FrameGate, FrameKeyring, FrameRejected, FrameSealer, frame_key, new_salt


def test_provision_makes_owner_only_secrets_and_a_roster_that_names_each_key(tmp_path):
    roster = provision(tmp_path / "keys", 3)
    d = tmp_path / "keys"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("bs.secret.json", *(device_secret_file(k) for k in range(3))):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert load_roster(d) == roster and sorted(roster.devices) == [0, 1, 2]
    assert len({roster.bs, *roster.devices.values()}) == 4  # every key distinct
    key = load_key(d / device_secret_file(2), role="device", device_id=2)
    assert key.public == roster.devices[2] and key.bs_public == roster.bs
    assert load_bs_key(d).public == roster.bs
    with pytest.raises(KeyFileError, match="not overwritten"):
        provision(d, 3)


def test_key_files_are_refused_with_a_reason(tmp_path):
    d = tmp_path / "keys"
    provision(d, 2)
    path = d / device_secret_file(1)
    with pytest.raises(KeyFileError, match="device 1, not of device 0"):
        load_key(path, role="device", device_id=0)
    with pytest.raises(KeyFileError, match="a device key, expected a bs key"):
        load_key(path, role="bs")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="owner only"):
        load_key(path, role="device", device_id=1)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(d / "nope.json", role="device")
    bad = json.loads((d / "roster.json").read_text())
    bad["devices"]["1"] = bad["devices"]["0"]
    with pytest.raises(ValueError, match="share one key"):
        Roster.model_validate(bad, strict=False)
    os.chmod(d / "roster.json", 0o666)  # anyone could add their key to it
    with pytest.raises(KeyFileError, match="writable by its owner only"):
        load_roster(d)
    os.chmod(d / "roster.json", 0o644)
    if os.geteuid() == 0:  # files of another user (a keys/ folder swapped in by whoever can write the run folder)
        for name in ("roster.json", device_secret_file(0)):
            os.chown(d / name, 65534, 65534)
        with pytest.raises(KeyFileError, match="owned by uid 65534, not by this process's user"):
            load_roster(d)
        with pytest.raises(KeyFileError, match="owned by uid 65534"):
            load_key(d / device_secret_file(0), role="device")
        key = checkpoint_key(tmp_path, create=True)  # <tmp>/keys/checkpoint.key
        assert len(key) == 32
        os.chown(tmp_path / "keys" / "checkpoint.key", 65534, 65534)
        with pytest.raises(RunFileError, match="owned by uid 65534"):
            checkpoint_key(tmp_path, create=False)
        for name in ("roster.json", device_secret_file(0)):
            os.chown(d / name, 0, 0)
    (d / "roster.json").write_text('{"format": "fedlora-roster/1", "bs": "short", "devices": {}}')
    with pytest.raises(KeyFileError, match="roster.json: bs"):
        load_roster(d)


def test_the_keys_cli(tmp_path):
    run = [sys.executable, "-m", "trust.main"]
    out = subprocess.run(
        [*run, "init", str(tmp_path / "k"), "--devices", "2"], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0 and "device-0.secret.json" in out.stdout, out.stderr
    shown = subprocess.run([*run, "show", str(tmp_path / "k")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert shown.stdout.count("device ") == 2
    again = subprocess.run(
        [*run, "init", str(tmp_path / "k"), "--devices", "2"], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 2 and "not overwritten" in again.stderr


def _pair(tmp_path, devices: int = 2):
    d = tmp_path / "keys"
    roster = provision(d, devices)
    bs = load_bs_key(d)
    return roster, bs, [load_key(d / device_secret_file(k), role="device") for k in range(devices)]


def test_edge_and_bs_agree_on_a_key_only_they_can_compute(tmp_path):
    roster, bs, devices = _pair(tmp_path)
    ring = FrameKeyring(bs.secret_bytes, {k: roster.public_bytes(k) for k in roster.devices}, "run1")
    salt, key = ring.issue(0)
    edge_key = frame_key(devices[0].secret_bytes, devices[0].bs_public_bytes, device_id=0, run_id="run1", salt=salt)
    assert edge_key == key
    # another device's secret, another run, another salt: another key
    assert frame_key(devices[1].secret_bytes, devices[1].bs_public_bytes, device_id=0, run_id="run1", salt=salt) != key
    assert frame_key(devices[0].secret_bytes, devices[0].bs_public_bytes, device_id=0, run_id="run2", salt=salt) != key
    assert ring.issue(0)[1] != key  # a new registration, a new key


def _frame(device_id: int = 0, seq: int = 0, total: int = 3, payload: bytes = b"fragment bytes") -> Frame:
    return Frame(device_id, 5, seq, total, payload)


def test_the_gate_opens_genuine_frames_and_rejects_everything_else():
    gate = FrameGate(sealed=True)
    key0, key1 = os.urandom(32), os.urandom(32)
    gate.admit(0, key0)
    gate.admit(1, key1)
    seal0 = FrameSealer(key0, 0).seal
    wire = seal0(_frame(), 1)
    assert len(wire) == len(_frame().to_bytes()) + 16  # the tag is on the air
    opened = gate.open(Frame.from_bytes(wire))
    assert opened.payload == b"fragment bytes" and not opened.sealed and opened.attempt == 1

    def rejected(data: bytes | Frame) -> str:
        frame = data if isinstance(data, Frame) else Frame.from_bytes(data)
        with pytest.raises(FrameRejected) as exc:
            gate.open(frame)
        return exc.value.reason

    assert rejected(wire) == "replayed"  # the same (seq, attempt) again
    gate.admit(0, key0)  # the same process registering again: its window stays
    assert rejected(wire) == "replayed"
    assert gate.open(Frame.from_bytes(seal0(_frame(), 2))).attempt == 2  # a retransmission is a new nonce
    assert rejected(_frame(seq=1).to_bytes()) == "unsealed"
    assert rejected(FrameSealer(key1, 0).seal(_frame(seq=1), 1)) == "forged"  # device 1's key, claiming device 0
    assert rejected(FrameSealer(os.urandom(32), 2).seal(_frame(device_id=2), 1)) == "no_key"
    genuine = Frame.from_bytes(seal0(_frame(seq=2), 1))
    for field, value in (("total", 9), ("round_idx", 6), ("seq", 1), ("attempt", 3), ("device_id", 1)):
        assert rejected(replace(genuine, **{field: value})) == "forged", field  # the header is authenticated
    flipped = bytearray(genuine.payload)
    flipped[0] ^= 1
    assert rejected(replace(genuine, payload=bytes(flipped))) == "forged"
    assert gate.open(genuine).payload == b"fragment bytes"  # none of that displaced the genuine frame
    assert rejected(seal0(replace(_frame(), round_idx=4), 1)) == "stale_round"
    assert gate.rejected == {0: 10, 1: 1, 2: 1}  # counted against the device each frame claimed
    plain = FrameGate(sealed=False)
    assert plain.open(_frame()) == _frame()
    with pytest.raises(FrameRejected, match="does not seal"):
        plain.open(Frame.from_bytes(seal0(_frame(seq=1), 1)))


def test_forged_replayed_and_miskeyed_frames_do_not_displace_an_update(tmp_path):
    """The BS's receive path with an attacker: before device 0's genuine frames arrive, frames claiming device 0
    with another total (the attack that used to make the genuine ones conflict), under device 1's key, and
    unsealed; after them, replays. Device 0's update is aggregated; each bad frame is counted against it."""
    bs = make_station(tmp_path / "run", ["devices.count=2"])
    t = bs.transport
    genuine: list[bytes] = []

    def device0(plan, attachment):
        frames = update_frames(plan, attachment, 0, 0.01)
        genuine.extend(frames)
        attacker_key = frame_key_of(1)
        forged = [
            FrameSealer(os.urandom(32), 0).seal(Frame(0, plan.round, 0, len(frames) + 5, b"x" * 500), 1),
            FrameSealer(attacker_key, 0).seal(Frame(0, plan.round, 0, len(frames), b"y" * 500), 1),
            Frame(0, plan.round, 0, 1, b"z" * 20).to_bytes(),  # unsealed, and a message of one frame
        ]
        for data in forged:
            t.deliver(FrameReceived(data, 20.0), 0.5)
        sends_update(t, 0, 0.01)(plan, attachment)
        for data in frames[:2]:
            t.deliver(FrameReceived(data, 20.0), 1.5)  # replays, while the round is still open

    t.join(0, device0)
    t.join(1, sends_update(t, 1, 0.02))
    bs.runner.wait_for_devices()
    record = bs.runner.run_round(1)
    rows = {d.device_id: d for d in record.devices}
    assert rows[0].status == "ok" and rows[1].status == "ok"
    assert rows[0].frames_received == len(genuine)
    assert rows[0].frames_rejected == 5 and rows[1].frames_rejected == 0 and record.frames_rejected == 5
    line = json.loads((bs.run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert line["devices"][0]["frames_rejected"] == 5 and line["frames_rejected"] == 5
    assert bs.runner.gate.reasons == {"forged": 2, "unsealed": 1, "replayed": 2}


def test_frames_replayed_from_the_previous_round_are_stale_and_displace_nothing(tmp_path):
    """An attacker records device 0's round-1 frames off the air and plays them back, all of them, before device 0's
    round-2 frames: every one is rejected as stale before reassembly, and round 2 aggregates the genuine update."""
    bs = make_station(tmp_path / "run", ["devices.count=2"])
    t = bs.transport
    recorded: dict[int, list[bytes]] = {}

    def device0(plan, attachment):
        if plan.round == 2:
            for data in recorded[1]:
                t.deliver(FrameReceived(data, 20.0), 0.5)
        recorded[plan.round] = update_frames(plan, attachment, 0, 0.01)
        sends_update(t, 0, 0.01)(plan, attachment)

    t.join(0, device0)
    t.join(1, sends_update(t, 1, 0.02))
    bs.runner.wait_for_devices()
    assert bs.runner.run_round(1).frames_rejected == 0
    second = bs.runner.run_round(2)
    rows = {d.device_id: d for d in second.devices}
    assert rows[0].status == "ok" and rows[1].status == "ok"
    assert rows[0].frames_received == len(recorded[2])
    assert rows[0].frames_rejected == len(recorded[1]) > 1
    assert bs.runner.gate.reasons == {"stale_round": len(recorded[1])}


def test_fragments_seal_within_the_phy_packet_limit():
    payload = os.urandom(9000)
    sealer = FrameSealer(os.urandom(32), 3)
    for frame in fragment(payload, 3, 1, 4000):
        assert len(sealer.seal(frame, 65535)) <= 4091
    with pytest.raises(ValueError, match="device 3's key"):
        sealer.seal(_frame(device_id=4), 1)


def test_a_fresh_salt_each_time():
    assert new_salt() != new_salt() and len(new_salt()) == 16


@pytest.mark.integration
def test_strangers_impostors_and_rogue_frames_are_refused_by_a_real_bs(tmp_path):
    """Real BS and edges (sim PHY, keys the BS provisions for the run). On the control plane a peer without CURVE
    and one with a key outside the roster get no answer (the refusal is logged once), and device 1's key cannot
    register as device 0. On the data port a stranger cannot connect, and a rogue holding device 1's key pushes
    unsealed frames and frames sealed under keys of its own, for both devices and both rounds, with a conflicting
    total: every round aggregates both devices, and each rogue frame is counted against the device it claimed."""
    procs = Procs(tmp_path)
    stop = threading.Event()
    rogue = zmq.Context.instance().socket(zmq.PUSH)
    thread = threading.Thread(target=lambda: spam(), daemon=True)
    try:
        run_dir = tmp_path / "run"
        bs, ep = procs.bs(
            run_dir, "--set", "devices.count=2", "--set", "round.rounds=2", "--set", "training.local_steps=10"
        )
        keys = run_dir / "keys"
        assert stat.S_IMODE((keys / device_secret_file(1)).stat().st_mode) == 0o600
        roster = load_roster(keys)
        ctx = zmq.Context.instance()

        def ask(key: KeyPair | None, claim: int, identity: bytes | None = None) -> bytes | None:
            """Register as device `claim` over a socket holding `key` (None: no CURVE) and routing id `identity`
            (None: the key's device's, as an edge makes it); the answer, if any."""
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity or routing_id(key.device_id if key and key.device_id else 0))
            if key is not None:
                make_client(sock, key, roster.bs)
            sock.connect(ep["control"])
            sock.send(Register(device_id=claim, host="test", pid=1).model_dump_json().encode())
            answer = sock.recv() if sock.poll(3000) else None
            sock.close(0)
            return answer

        public, secret = generate_pair()
        stranger = KeyPair(role="device", device_id=0, public=public, secret=secret, bs_public=roster.bs)
        assert ask(None, 0) is None and ask(stranger, 0) is None and ask(stranger, 0) is None  # no handshake
        device1 = load_key(keys / device_secret_file(1), role="device")
        assert b"this key belongs to device 1, not 0" in ask(device1, 0)  # a key speaks only for its device
        # routing ids are bound to keys: device 1's key cannot take an id in device 0's name (it once could take
        # device 0's very id, `edge-0-<pid>`, before the edge connected, and lock it out), nor an id of no device
        for squatted in (routing_id(0), b"edge-0-4242", b"\x00\x00\x00\x00\x01"):
            answer = ask(device1, 1, identity=squatted)
            assert answer is not None and b"is not this key's device's" in answer, (squatted, answer)
        assert routing_id(0) != routing_id(0) and routing_id_device(routing_id(7)) == 7  # unguessable, named
        wait_for(lambda: "unknown key" in procs.output("bs"), 30, "the refusal in the BS log")
        assert procs.output("bs").count("unknown key") == 1  # once per key, however often it knocks
        make_client(rogue, device1, roster.bs)
        rogue.connect(ep["data"])
        sidecar = FrameSidecar(snr_db=20.0).encode()
        outsider = ctx.socket(zmq.PUSH)  # no CURVE: the handshake fails, nothing it sends reaches the BS
        outsider.setsockopt(zmq.LINGER, 0)
        outsider.setsockopt(zmq.SNDTIMEO, 200)
        outsider.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection that completed its handshake
        outsider.connect(ep["data"])
        with pytest.raises(zmq.Again):  # nowhere to queue: no connection ever completes
            outsider.send_multipart([sidecar, Frame(0, 1, 0, 1, b"x").to_bytes()])
        outsider.close(0)

        def spam() -> None:
            while not stop.is_set():
                for r in (1, 2):
                    for d in (0, 1):
                        fake = Frame(d, r, 0, 7, os.urandom(400))
                        rogue.send_multipart([sidecar, fake.to_bytes()])
                        rogue.send_multipart([sidecar, FrameSealer(os.urandom(32), d).seal(fake, 1)])
                time.sleep(0.05)

        thread.start()
        for k in range(2):
            procs.edge(ep["control"], k)
        assert bs.wait(timeout=300) == 0, procs.output("bs")
        rounds = read_rounds(run_dir)
        assert len(rounds) == 2
        assert all(d["status"] == "ok" and d["frames_rejected"] > 0 for r in rounds for d in r["devices"]), rounds
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["security"] == "sealed"
        assert (
            summary["frames_rejected_by_reason"]["forged"] > 0 and summary["frames_rejected_by_reason"]["unsealed"] > 0
        )
        assert "frames claiming device 0 rejected" in procs.output("bs")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)  # a zmq socket is not thread-safe: no close while the rogue may still be sending
        rogue.close(0)
        procs.cleanup()


def test_the_air_takes_plans_only_from_the_bs_and_bursts_only_from_their_device(tmp_path):
    """The air under the run's keys: a device's key cannot send a plan, and cannot send a burst as another device;
    the BS's plan and the device's own burst are taken."""
    pytest.importorskip("scipy")
    import numpy as np

    from phy.air_server import Air
    from tests.test_zmq_iq import GOOD_BURST, GOOD_CHUNK, GOOD_PLAN
    from trust.keys import load_run_keys

    provision(tmp_path / "keys", 2)
    ctx = zmq.Context()
    air = Air(
        address="tcp://127.0.0.1:0",
        medium_address="tcp://127.0.0.1:0",
        context=ctx,
        keys=load_run_keys(tmp_path / "keys"),
    )
    try:
        iq = np.full(1000, 0.1, dtype=np.complex64).tobytes()
        plan, burst = GOOD_PLAN.encode(), GOOD_BURST.encode()  # a plan for device 0; a burst of device 0
        air.on_message([b"peer", plan], "device:0")
        assert air.stats["refused"] == 1 and air.bs.physics is None
        air.on_message([b"bs", plan], "bs")
        assert air.bs.physics is not None
        air.on_message([b"peer", burst], "device:1")  # refused at its header: its chunk is dropped unread
        air.on_message([b"peer", GOOD_CHUNK.encode(), iq], "device:1")
        assert air.stats["refused"] == 2 and air.stats["bursts"] == 0 and air.chunks.stats["chunks_dropped"] == 1
        air.on_message([b"peer", burst], "device:0")
        air.on_message([b"peer", GOOD_CHUNK.encode(), iq], "device:0")
        assert air.stats["refused"] == 2 and air.stats["bursts"] == 1
    finally:
        air.close()
        ctx.term()

"""gr-zmq-iq: FDMA subband plan, the air's gain math, config checks, the air's robustness against garbage, a
link of real processes (air + 2 edge transmitters, BS receiver here) and one fedlora-run over it (tiny model).

Run an edge transmitter on its own: ``python -m tests.test_zmq_iq edge AIR DEVICE ROUND N_FRAMES POWER BW``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from phy import fdma
from phy.air_chunks import burst_messages
from phy.channel import DeviceGeometry, SimChannel, TxSetting
from proto.air import (
    CHUNK_SAMPLES,
    AirMessageError,
    BurstHeader,
    ChunkFrames,
    FrameSidecar,
    IqChunk,
    MediumChunk,
    RoundPlan,
    decode_endpoints,
    decode_medium,
    decode_reply,
    decode_request,
    decode_sidecar,
)
from tests.processes import ENV, REPO, TINY, read_rounds

ZMQ_IQ = REPO / "hw_configs" / "zmq_iq.yaml"


def load_bench(*args, **kwargs):  # imported here, not at the top: the edge helper processes need no torch
    from config import load_bench

    return load_bench(*args, **kwargs)


# --------------------------------------------------------------------------------------------- subband plan
def test_equal_shares_tile_the_band_in_device_order():
    plan = fdma.equal_subbands(1e6, 4)
    assert [plan[k].center_hz for k in range(4)] == [-375e3, -125e3, 125e3, 375e3]
    assert all(s.bandwidth_hz == 250e3 for s in plan.values())
    assert plan[0].low_hz == -500e3 and plan[3].high_hz == 500e3


def test_unequal_shares_and_absent_devices_pack_from_the_lower_edge():
    plan = fdma.plan_subbands(1e6, {3: 100e3, 0: 500e3, 2: 200e3})  # device 1 does not take part
    assert sorted(plan) == [0, 2, 3]
    assert plan[0].low_hz == -500e3 and plan[0].high_hz == 0
    assert plan[2].low_hz == 0 and plan[2].high_hz == 200e3
    assert plan[3].low_hz == 200e3 and plan[3].high_hz == 300e3
    ordered = sorted(plan.values(), key=lambda s: s.center_hz)
    for a, b in zip(ordered, ordered[1:]):
        assert a.high_hz <= b.low_hz + 1e-6  # no overlap


@pytest.mark.parametrize(
    "widths, match",
    [
        ({0: 600e3, 1: 500e3}, "more than"),
        ({0: 0.0}, "bandwidth_hz"),
        ({0: float("nan")}, "bandwidth_hz"),
        ({-1: 1e5}, "device id"),
    ],
)
def test_bad_plans_are_refused(widths, match):
    with pytest.raises(ValueError, match=match):
        fdma.plan_subbands(1e6, widths)


# --------------------------------------------------------------------------------------------- gain math
@pytest.mark.parametrize("bandwidth_hz", [100e3, 250e3, 1e6])
def test_amplitude_gives_the_sim_channel_snr_in_the_subband(bandwidth_hz):
    """Unit medium noise over B; in a subband of width b the noise is b / B of it: SNR = a^2 B / b."""
    bench = load_bench(ZMQ_IQ)
    channel = SimChannel(bench.channel, seed=0)
    setting = TxSetting(10.0, bandwidth_hz, "qpsk")
    snr_db = channel.snr_db(DeviceGeometry(2, 35.0), 3, setting)
    a = fdma.signal_amplitude(snr_db, bandwidth_hz, 1e6)
    assert 10 * math.log10(a * a * 1e6 / bandwidth_hz) == pytest.approx(snr_db, abs=1e-9)
    # the same number from the dBm side: rx power over thermal noise in the whole band, times B / b
    rx_dbm = setting.tx_power_dbm + channel.gain_db(DeviceGeometry(2, 35.0), 3)
    assert 20 * math.log10(a) == pytest.approx(rx_dbm - channel.noise_dbm(1e6), abs=1e-9)


def test_carrier_offsets_are_reproducible_and_bounded():
    offsets = [fdma.carrier_offset_hz(7, k, 300.0) for k in range(50)]
    assert offsets == [fdma.carrier_offset_hz(7, k, 300.0) for k in range(50)]
    assert max(map(abs, offsets)) <= 300.0 and len(set(offsets)) == 50
    assert fdma.carrier_offset_hz(7, 3, 0.0) == 0.0


def test_to_medium_puts_the_burst_in_its_subband_at_its_power():
    pytest.importorskip("scipy")
    from phy.air_medium import to_medium

    rng = np.random.default_rng(0)
    n = 40_000
    # a unit-power signal confined to +-0.4 b (like the OFDM carriers)
    spectrum = np.zeros(n, dtype=np.complex128)
    keep = np.abs(np.fft.fftfreq(n)) < 0.4
    spectrum[keep] = rng.standard_normal(keep.sum()) + 1j * rng.standard_normal(keep.sum())
    x = np.fft.ifft(spectrum).astype(np.complex64)
    x /= np.sqrt(np.mean(np.abs(x) ** 2))
    plan = fdma.plan_subbands(1e6, {0: 400e3, 1: 200e3, 2: 400e3})  # ratios 5/2 and 5/1
    for k in (0, 1):
        y = to_medium(x, plan[k], 1e6, amplitude=2.0, cfo_hz=0.0, start_index=123)
        assert len(y) == round(n * 1e6 / plan[k].bandwidth_hz)
        # power per medium sample: a^2 (interpolation keeps the sample power; unit noise in the subband is b / B)
        assert np.mean(np.abs(y) ** 2) == pytest.approx(4.0, rel=0.03)
        f = np.fft.fftfreq(len(y), 1e-6)
        p = np.abs(np.fft.fft(y)) ** 2
        inside = (f > plan[k].low_hz) & (f < plan[k].high_hz)
        others = [
            (f > s.low_hz + 0.03 * s.bandwidth_hz) & (f < s.high_hz - 0.03 * s.bandwidth_hz)
            for j, s in plan.items()
            if j != k
        ]
        for m in others:
            assert p[m].mean() < 1e-5 * p[inside].mean()  # > 50 dB below, in every other subband


def test_frame_inbox_keeps_good_frames_of_planned_subbands_only():
    from phy.subband_inbox import FrameInbox

    inbox = FrameInbox()
    try:
        inbox.deliver(0, b"a", {"crc_ok": True, "snr_db": 20.0})
        inbox.deliver(1, b"b", {"crc_ok": False, "snr_db": 20.0})
        inbox.active = {0}
        inbox.deliver(1, b"c", {"crc_ok": True, "snr_db": 20.0})  # a stale subband's receiver
        inbox.deliver(0, b"d", {"crc_ok": True, "snr_db": float("nan")})
        got = inbox.take(0.0)
        assert [f.data for f in got] == [b"a", b"d"] and got[0].snr_db == 20.0 and got[1].snr_db is None
        assert inbox.crc_failures == 1 and inbox.take(0.05) == []
    finally:
        inbox.close()


# --------------------------------------------------------------------------------------------- messages
GOOD_BURST = BurstHeader(
    device_id=0, round=1, burst_id=1, tx_power_dbm=10.0, bandwidth_hz=250e3, modulation="qpsk", samples=1000, chunks=1
)
GOOD_CHUNK = IqChunk(burst_id=1, index=0)  # GOOD_BURST's only chunk
GOOD_PLAN = RoundPlan(
    round=1,
    total_bandwidth_hz=1e6,
    seed=0,
    channel={},
    distances_m=[10.0, 20.0],
    max_cfo_hz=100.0,
    clock_speed=1.0,
    hangover_s=0.02,
    attenuation_db=60.0,
    subbands=[{"device_id": 0, "center_hz": -375e3, "bandwidth_hz": 250e3}],
)


def test_air_messages_round_trip_with_their_binary_frames():
    iq = np.ones(4, dtype=np.complex64).tobytes()
    assert decode_request([GOOD_BURST.encode()]) == GOOD_BURST
    chunk = decode_request([GOOD_CHUNK.encode(), iq])
    assert isinstance(chunk, ChunkFrames) and chunk.header == GOOD_CHUNK and chunk.iq == iq
    assert decode_request([GOOD_PLAN.encode()]) == GOOD_PLAN
    # a burst in chunks: the header, then chunks of CHUNK_SAMPLES but the last, which together are the IQ
    long_iq = np.arange(2 * CHUNK_SAMPLES + 5, dtype=np.complex64)
    header = GOOD_BURST.model_copy(update={"samples": len(long_iq), "chunks": 3})
    messages = burst_messages(header, long_iq)
    assert decode_request([bytes(p) for p in messages[0]]) == header
    chunks = [decode_request([bytes(p) for p in m]) for m in messages[1:]]
    assert [c.header.index for c in chunks] == [0, 1, 2] and all(c.header.burst_id == 1 for c in chunks)
    assert [len(c.iq) // 8 for c in chunks] == [CHUNK_SAMPLES, CHUNK_SAMPLES, 5]
    assert b"".join(c.iq for c in chunks) == long_iq.tobytes()
    chunk, samples = decode_medium([MediumChunk(index=7).encode(), iq])
    assert chunk.index == 7 and samples == iq
    assert decode_sidecar(FrameSidecar(snr_db=3.5).encode()).snr_db == 3.5
    assert decode_sidecar(FrameSidecar(snr_db=1.0, modulation="8psk").encode()).modulation == "8psk"


@pytest.mark.parametrize(
    "decode, frames, named",
    [
        (decode_request, [b'{"v": 4, "type": "burst", "device_id": true}'], "burst: field 'device_id'"),
        (decode_request, [b'{"v": 4, "type": "beam"}'], "request: "),
        (decode_request, [GOOD_CHUNK.encode(), b"1234567"], "chunk: IQ of 7 bytes"),
        (decode_request, [GOOD_CHUNK.encode(), bytes(8 * CHUNK_SAMPLES + 8)], "chunk: 131073 samples is above"),
        (decode_request, [GOOD_BURST.encode(), b"12345678"], "burst: 2 frame(s), expected 1 [header]"),
        (decode_request, [GOOD_PLAN.encode(), b"12345678"], "plan: 2 frame(s)"),
        (decode_request, [GOOD_CHUNK.encode(), b"12345678", b"12345678"], "request: 3 frames, at most 2"),
        (decode_request, [GOOD_BURST.encode().replace(b'"chunks":1', b'"chunks":2')], "burst: field 'chunks'"),
        (decode_request, [GOOD_BURST.encode().replace(b'"v":4', b'"v":3')], "protocol version 3 is not supported"),
        (decode_reply, [b'{"v": 4, "type": "done", "device_id": 0}'], "done: field 'round' is missing"),
        (decode_reply, [b'{"v": 1, "type": "error", "error": "x", "kind": ""}'], "error: field 'v'"),
        (decode_medium, [b'{"v": 4, "index": -1}', b"12345678"], "medium: field 'index'"),
        (decode_medium, [b'{"v": 4, "index": 0}', b""], "medium: IQ of 0 bytes"),
        (lambda f: decode_sidecar(f[0]), [b'{"v": 4, "snr_db": "high"}'], "sidecar: field 'snr_db'"),
        (lambda f: decode_sidecar(f[0]), [b'{"snr_db": 1.0}'], "sidecar: field 'v' (the protocol version) is missing"),
        (lambda f: decode_endpoints(f[0]), [b'{"v": 4, "address": "tcp://a:1"}'], "endpoints: field 'medium'"),
    ],
)
def test_bad_air_messages_raise_one_error_naming_type_and_field(decode, frames, named):
    with pytest.raises(AirMessageError) as err:
        decode(frames)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_the_wire_format_doc_lists_every_air_message_and_field():
    import re

    from proto import air as messages

    text = (REPO / "docs" / "wire-format.md").read_text()
    start = text.index("## Air and PHY links (`proto/air.py`)")
    section = text[start : text.index("\n## ", start + 1)]
    assert f"`v` (protocol version, now {messages.AIR_PROTOCOL_VERSION})" in section
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| socket | `type` | model |"))
    documented = {}
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        fields = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[4]))  # nested fields are in brackets
        documented[cells[2].strip("`")] = (cells[1].strip("`"), fields)
    models = [
        messages.BurstHeader,
        messages.RoundPlan,
        messages.Listen,
        messages.DownlinkHeader,
        messages.IqChunk,
        messages.DownlinkIq,
        messages.BurstDone,
        messages.BurstOnMedium,
        messages.PlanAccepted,
        messages.AirRefusal,
        messages.MediumChunk,
        messages.AirEndpoints,
        messages.FrameSidecar,
    ]
    assert set(documented) == {m.__name__ for m in models}
    for model in models:
        type_tag = model.model_fields["type"].default if "type" in model.model_fields else ""
        fields = [f for f in model.model_fields if f not in ("v", "type")]
        assert documented[model.__name__] == (type_tag, fields), model.__name__


def test_air_messages_load_no_heavy_modules():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, proto.air; print(sorted(set(sys.modules) & {'numpy', 'zmq', 'torch'}))"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- config
def test_zmq_iq_bench_loads():
    bench = load_bench(ZMQ_IQ)
    assert bench.phy == "gr-zmq-iq"
    assert [d.distance_m for d in bench.devices] == [10, 20, 35, 50]
    assert bench.air.max_cfo_hz == 300 and bench.air.clock_speed == 1.0


@pytest.mark.parametrize(
    "override, field",
    [
        ("air.max_cfo_hz=5000", "air.max_cfo_hz"),
        ("air.max_cfo_hz=-1", "air.max_cfo_hz"),
        ("air.clock_speed=0", "air.clock_speed"),
        ("air.hangover_s=0", "air.hangover_s"),
        ("air.filter_attenuation_db=20", "air.filter_attenuation_db"),
        ("air.address=localhost:5757", "air.address"),
        ("air.medium=5758", "air.medium"),
        ("air.colour=blue", "colour"),
        ("phy=gr-zmq", "phy"),
    ],
)
def test_bad_air_settings_name_the_field(override, field):
    from config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_bench(ZMQ_IQ, [override])
    assert field in str(err.value) and "zmq_iq.yaml" in str(err.value)


def test_air_settings_are_not_checked_for_other_phys():
    load_bench(REPO / "hw_configs" / "sim.yaml", ["air.max_cfo_hz=5000"])


def test_the_air_reports_a_bad_bench_in_one_line_and_exits_2():
    cmd = [sys.executable, "-m", "phy.air", "--bench", str(ZMQ_IQ), "--bench-set", "air.clock_speed=0"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "air.clock_speed" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- real processes
gnuradio = pytest.mark.gnuradio


def _start_air(tmp_path, *bench_set: str, keys: Path | None = None) -> tuple[subprocess.Popen, dict]:
    """The air on free ports; with `keys` (a key directory) it serves CURVE, else the bench is insecure."""
    endpoints = tmp_path / "air.json"
    cmd = [
        sys.executable,
        "-m",
        "phy.air",
        "--bench",
        str(ZMQ_IQ),
        "--address",
        "tcp://127.0.0.1:0",
        "--medium",
        "tcp://127.0.0.1:0",
        "--endpoints-file",
        str(endpoints),
    ]
    cmd += [x for o in bench_set for x in ("--bench-set", o)]
    cmd += ["--keys", str(keys)] if keys is not None else ["--bench-set", "security.mode=none"]
    log = open(tmp_path / "air.log", "w")
    air = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not endpoints.exists():
            assert air.poll() is None, (tmp_path / "air.log").read_text()
            assert time.monotonic() < deadline, "the air did not bind"
            time.sleep(0.05)
        ep = decode_endpoints(endpoints.read_bytes())
        return air, {"address": ep.address, "medium": ep.medium}
    except BaseException:
        air.kill()
        air.wait()
        raise


def _edges(air_address: str, jobs: list[tuple[int, int, int, float, float]], keys: Path | None = None) -> list[dict]:
    """Edge transmitters as processes: (device, round, frames, power dBm, bandwidth Hz[, key of device]) each, with
    that device's key file from `keys` (a job's sixth entry: another device's key); their reports."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.test_zmq_iq",
                "edge",
                air_address,
                *map(str, job[:5]),
                *([str(keys / f"device-{job[5] if len(job) > 5 else job[0]}.secret.json")] if keys else []),
            ],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _by_device(frames) -> dict[int, list[float]]:
    from proto.framing import Frame

    got: dict[int, list[float]] = {}
    for rx in frames:
        f = Frame.from_bytes(rx.data)
        got.setdefault(f.device_id, []).append(rx.snr_db)
    return got


@gnuradio
@pytest.mark.integration
def test_air_link_delivers_by_subband_with_snr_following_distance(tmp_path):
    pytest.importorskip("gnuradio")
    from link.factory import open_uplink_receiver
    from trust.keys import load_bs_key, provision

    # devices 0 and 3 of zmq_iq.yaml: 10 m and 50 m; no fading, so the order is the path loss's. The air serves
    # CURVE under the run's keys: the BS and each edge connect with their own key pair
    keys = tmp_path / "keys"
    provision(keys, 4)
    air, ep = _start_air(tmp_path, keys=keys)
    rx = open_uplink_receiver(
        load_bench(ZMQ_IQ, ["channel.fading=none", f"air.address={ep['address']}", f"air.medium={ep['medium']}"]),
        bind_address="",
        seed=0,
        key=load_bs_key(keys),
    )
    try:
        # round 1: equal shares, full power: nothing lost, the near device is measured higher
        rx.start_round(1, {k: 250e3 for k in range(4)})
        reports = _edges(ep["address"], [(0, 1, 20, 10.0, 250e3), (3, 1, 20, 10.0, 250e3)], keys)
        got = _by_device(rx.drain_until_quiet(0.2, 30.0))
        assert all(r["error"] is None for r in reports), reports
        assert reports[0]["airtime_s"] == pytest.approx(reports[0]["samples"] / 250e3)
        assert len(got.get(0, [])) == 20 and len(got.get(3, [])) == 20, {k: len(v) for k, v in got.items()}
        channel = SimChannel(load_bench(ZMQ_IQ, ["channel.fading=none"]).channel, seed=0)
        expect = {k: channel.snr_db(DeviceGeometry(k, d), 1, TxSetting(10.0, 250e3)) for k, d in ((0, 10), (3, 50))}
        assert np.mean(got[0]) > np.mean(got[3]) + 15
        assert np.mean(got[3]) == pytest.approx(expect[3], abs=1.5)  # 21.5 dB: measured within the estimator's error
        assert np.mean(got[0]) > 40  # 46 dB: readings saturate in the mid 40s (fdma: filter ringing)

        # round 2: unequal shares (both ends retune; 5/3 and 5/2 rate ratios), device 3 far too weak to decode
        rx.start_round(2, {0: 600e3, 3: 400e3})
        reports = _edges(ep["address"], [(0, 2, 10, 10.0, 600e3), (3, 2, 10, -40.0, 400e3)], keys)
        got = _by_device(rx.drain_until_quiet(0.2, 30.0))
        assert len(got.get(0, [])) == 10, {k: len(v) for k, v in got.items()}
        assert len(got.get(3, [])) == 0  # -40 dBm at 50 m: SNR ~ -30 dB
        assert np.mean(got[0]) > 35

        # a burst whose width is not the device's subband is refused, and reported as an error
        reports = _edges(ep["address"], [(0, 2, 2, 10.0, 250e3)], keys)
        assert "subband" in reports[0]["error"]
        # device 3's key cannot put a burst on the air as device 0
        reports = _edges(ep["address"], [(0, 2, 2, 10.0, 600e3, 3)], keys)
        assert "the key of device:3 cannot send as device 0" in reports[0]["error"]
        # the downlink's trust boundary: device 3's key cannot listen as device 0, nor send the BS's bursts
        import zmq

        from proto.air import DownlinkHeader, Listen
        from trust.curve import make_client
        from trust.keys import load_key

        device3 = load_key(keys / "device-3.secret.json", role="device")
        assert device3.bs_public is not None
        peer = zmq.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        make_client(peer, device3, device3.bs_public)
        peer.connect(ep["address"])
        peer.send(Listen(device_id=0).encode())
        assert (
            peer.poll(5000)
            and "the key of device:3 cannot listen as device 0" in decode_reply(peer.recv_multipart()).error
        )
        dl = DownlinkHeader(
            round=2,
            burst_id=1,
            devices=[0],
            tx_power_dbm=20.0,
            modulation="qpsk",
            kind="ack",
            packets=1,
            final=True,
            samples=100,
            chunks=1,
        )
        for message in burst_messages(dl, np.zeros(100, np.complex64)):  # refused at its header
            peer.send_multipart(message)
        assert (
            peer.poll(5000)
            and "only the BS's key may send downlink bursts" in decode_reply(peer.recv_multipart()).error
        )
        peer.close(0)
        # a stranger's key gets no answer at all, to a plan or a burst, and is logged once

        from trust.curve import make_client
        from trust.keys import KeyPair, generate_pair, load_roster

        public, secret = generate_pair()
        stranger = zmq.Context.instance().socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        make_client(stranger, KeyPair(role="bs", public=public, secret=secret), load_roster(keys).bs)
        stranger.connect(ep["address"])
        stranger.send(GOOD_PLAN.encode())
        for message in burst_messages(GOOD_BURST, np.zeros(1000, np.complex64)):
            stranger.send_multipart(message)
        assert not stranger.poll(2000)
        stranger.close(0)
    finally:
        rx.close()
        air.terminate()
        assert air.wait(timeout=20) == 0
    air_log = (tmp_path / "air.log").read_text()
    assert "air stopped" in air_log
    assert air_log.count("refused a peer with an unknown key") == 1


def test_air_survives_garbage_from_peers():
    pytest.importorskip("scipy")
    import zmq

    from phy.air_server import Air

    ctx = zmq.Context()
    air = Air(address="tcp://127.0.0.1:0", medium_address="tcp://127.0.0.1:0", context=ctx)
    peer = ctx.socket(zmq.DEALER)
    peer.connect(air.address)
    good = json.loads(GOOD_BURST.encode())
    plan = json.loads(GOOD_PLAN.encode())
    iq = np.ones(1000, dtype=np.complex64).tobytes()
    chunk = GOOD_CHUNK.encode()

    def burst(**fields: object) -> bytes:
        return json.dumps({**good, **fields}).encode()

    garbage: list[tuple[list[bytes], str | None]] = [  # each message, and what the air answers (None: nothing)
        ([b"hello"], "request: Invalid JSON"),
        ([b"burst", burst(), iq], "request: 3 frames"),  # protocol 1: a kind frame first
        ([b"not json", iq], "request: Invalid JSON"),
        ([json.dumps([1, 2]).encode(), iq], "request: "),
        ([burst()], "no plan from the BS yet"),
        ([chunk, iq], None),  # the refused burst's chunk: dropped unread
        ([chunk, iq], "chunk: no burst announced by this peer"),
        ([burst(), iq], "burst: 2 frame(s), expected 1"),  # protocol 3: the IQ beside the header
        (
            [json.dumps({"v": 4, "type": "plan", "round": 1, "total_bandwidth_hz": 1e6, "subbands": []}).encode()],
            "plan",
        ),
        ([json.dumps({**plan, "channel": {"fading": "x"}}).encode()], "plan: field 'channel.fading'"),
        (
            [json.dumps({**plan, "subbands": [{"device_id": 0, "center_hz": 0.0, "bandwidth_hz": 250e3}]}).encode()],
            "subband rule",
        ),
        ([json.dumps(plan).encode(), iq], "plan: 2 frame(s)"),
        ([json.dumps(plan).encode()], "plan_ok"),  # the good plan
        ([burst(v=9)], "protocol version 9"),
        ([burst(device_id=-2)], "burst: field 'device_id'"),
        ([burst(modulation="ook")], "burst: field 'modulation'"),
        ([burst(colour="blue")], "burst: field 'colour'"),
        ([json.dumps(good).replace('"round": 1', '"round": NaN').encode()], "burst: field 'round'"),
        ([burst(chunks=2)], "burst: field 'chunks'"),
        ([burst(round=2)], "burst: field 'round': 2, the BS's plan is for round 1"),
        ([burst(bandwidth_hz=100e3)], "its subband in round 1 is 250000 Hz"),
        ([burst(device_id=2)], "device 2 has no subband"),
        ([burst(samples=(1 << 23) + 1, chunks=65)], "are 33554436 on the medium, more than 33554432"),  # 250 kHz: x4
        ([chunk, iq], None),
        ([burst()], None),  # admitted: no answer until its burst is whole
        ([chunk, iq[:-8]], "chunk 0 of burst 1 holds 999 samples, expected 1000"),
        ([burst(burst_id=2)], None),
        ([IqChunk(burst_id=2, index=1).encode(), iq], "chunk: field 'index': 1, expected 0"),
        ([burst(burst_id=3)], None),
        ([IqChunk(burst_id=3, index=0).encode(), np.full(1000, np.nan, dtype=np.complex64).tobytes()], "NaN"),
    ]
    try:
        for parts, _ in garbage:
            peer.send_multipart(parts)
        answers = []
        deadline = time.monotonic() + 10
        expected = [want for _, want in garbage if want is not None]
        while len(answers) < len(expected) and time.monotonic() < deadline:
            for _ in range(50):
                try:
                    air.on_message(air.router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            while peer.poll(10):
                answers.append(decode_reply(peer.recv_multipart()))
        assert not peer.poll(200)  # and nothing more
        said = [a.type if a.type == "plan_ok" else a.error for a in answers]
        assert len(said) == len(expected), said
        for got, want in zip(said, expected):
            assert want in got, (want, got)
        assert not air.medium.queues.get(0)  # nothing of that reached the medium
        assert air.chunks.stats["chunks_dropped"] == 2 and air.chunks.pending_bytes() == 0
        # and a good burst after all that is taken
        for message in burst_messages(GOOD_BURST.model_copy(update={"burst_id": 4}), np.frombuffer(iq, np.complex64)):
            peer.send_multipart(message)
        time.sleep(0.2)
        for _ in range(2):
            air.on_message(air.router.recv_multipart())
        assert len(air.medium.queues[0]) == 1
    finally:
        air.close()
        peer.close(linger=0)
        ctx.term()


@gnuradio
@pytest.mark.integration
def test_fedlora_run_over_the_air(tmp_path):
    pytest.importorskip("gnuradio")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launcher.main",
        "--bench",
        str(ZMQ_IQ),
        "--run-dir",
        str(run_dir),
        *TINY,
        "--set",
        "devices.count=2",
        "--set",
        "round.rounds=2",
        "--set",
        "training.local_steps=2",
        "--bench-set",
        "channel.fading=none",
        "--bench-set",
        "devices=[{distance_m: 10}, {distance_m: 50}]",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        near, far = r["devices"]
        for d in (near, far):
            assert d["status"] == "ok", d
            assert d["frames_lost"] == 0 and d["frames_received"] == d["frames_sent"] > 0
            assert d["bandwidth_hz"] == 500e3 and d["airtime_s"] > 0
        assert near["snr_db"] > far["snr_db"] + 15, (near["snr_db"], far["snr_db"])  # 46 vs 21.5 dB (no fading)
    assert "air stopped" in (run_dir / "logs" / "air.log").read_text()


# --------------------------------------------------------------------------------------------- edge helper
def _edge_main(argv: list[str]) -> int:
    from phy.gr_zmq_iq_tx import ZmqIqTransmitter
    from proto.framing import fragment
    from trust.keys import load_key

    air, device, round_idx, n_frames, power, bandwidth, *key_file = argv
    device, round_idx, n_frames = int(device), int(round_idx), int(n_frames)
    key = load_key(Path(key_file[0]), role="device") if key_file else None
    rng = np.random.default_rng(device)
    payload = rng.integers(0, 256, n_frames * 990, dtype=np.uint8).tobytes()
    frames = [f.to_bytes() for f in fragment(payload, device, round_idx, 978)][:n_frames]
    tx = ZmqIqTransmitter(air_address=air, geometry=DeviceGeometry(device, 10.0), key=key)
    report = tx.send(frames, TxSetting(float(power), float(bandwidth), "qpsk"), round_idx=round_idx)
    samples = round(report.airtime_s * float(bandwidth))
    print(
        json.dumps(
            {
                "frames_sent": report.frames_sent,
                "airtime_s": report.airtime_s,
                "samples": samples,
                "error": tx.last_error,
            }
        )
    )
    tx.close()
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "edge":
    sys.exit(_edge_main(sys.argv[2:]))

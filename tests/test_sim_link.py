"""The sim link over real zmq sockets on 127.0.0.1 (random ports)."""

import logging
import socket
import time
import tracemalloc

import numpy as np
import pytest
import zmq

from config import BenchConfig, ConfigError, load_bench, read_per_curve, to_mapping, validated
from config.base import REPO_ROOT
from link.factory import open_uplink_transmitter
from phy.channel import ChannelConfig, DeviceGeometry, PerCurve, SimChannel, TxSetting
from phy.sim import SimUplinkReceiver, SimUplinkTransmitter
from proto.air import FrameSidecar
from proto.framing import Frame, fragment
from proto.numerology import packet_airtime_s

pytestmark = pytest.mark.integration

SIGMA_DB = 1.5
CFG = ChannelConfig(fading="none", snr_est_sigma_db=SIGMA_DB)  # SNR = tx_power + 65 dB at 1 m, 1 MHz
BW_HZ = 1e6
HIGH = TxSetting(tx_power_dbm=20.0, bandwidth_hz=BW_HZ)  # 85 dB
LOW = TxSetting(tx_power_dbm=-60.0, bandwidth_hz=BW_HZ)  # 5 dB: QPSK PER = 1
MID = TxSetting(tx_power_dbm=13.5 - 65.0, bandwidth_hz=BW_HZ)  # 13.5 dB: QPSK PER(1000 B) = 0.5
SENTINEL = Frame(device_id=999, round_idx=0, seq=0, total=1, payload=b"END").to_bytes()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # closes sockets a failed test left open; term() would hang


@pytest.fixture
def rx(ctx):
    receiver = SimUplinkReceiver(bind_address="tcp://127.0.0.1:0", context=ctx)
    yield receiver
    receiver.close()


def make_tx(ctx, address, *, seed=7, device_id=1, cfg=CFG, **kw):
    return SimUplinkTransmitter(
        bs_data_address=address,
        geometry=DeviceGeometry(device_id=device_id, distance_m=1.0),
        channel=SimChannel(cfg, seed=3),
        per_curve=PerCurve.default(),
        seed=seed,
        context=ctx,
        **kw,
    )


def collect_until_sentinel(rx, timeout_s=20.0):
    """Frames before the sentinel; PUSH/PULL keeps order, so none can still be in flight."""
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got.extend(rx.recv(0.2))
        if any(f.data == SENTINEL for f in got):
            assert got[-1].data == SENTINEL
            return got[:-1]
    raise AssertionError(f"sentinel not received; got {len(got)} frames")


def frames_bytes(n, payload_bytes=978, round_idx=0):
    return [f.to_bytes() for f in fragment(bytes(n * payload_bytes), 1, round_idx, payload_bytes)]


def test_address_resolved(rx):
    assert rx.address.startswith("tcp://127.0.0.1:")
    assert not rx.address.endswith(":0") and not rx.address.endswith(":*")


def test_high_snr_all_arrive_with_measured_snr(ctx, rx):
    tx = make_tx(ctx, rx.address)
    data = frames_bytes(200)
    report = tx.send(data, HIGH, round_idx=0)
    tx.send([SENTINEL], HIGH, round_idx=0)
    got = collect_until_sentinel(rx)
    tx.close()

    true_snr = tx.channel.snr_db(tx.geometry, 0, HIGH)
    assert tx.last_true_snr_db == pytest.approx(true_snr) == pytest.approx(85.0)
    assert [f.data for f in got] == data
    snrs = np.array([f.snr_db for f in got])
    assert np.all(np.abs(snrs - true_snr) < 6 * SIGMA_DB)
    assert snrs.mean() == pytest.approx(true_snr, abs=4 * SIGMA_DB / np.sqrt(len(snrs)))
    assert snrs.std() == pytest.approx(SIGMA_DB, rel=0.25)
    assert all(isinstance(f.rx_time, float) for f in got)

    assert report.frames_sent == 200
    assert report.bytes_sent == sum(len(d) for d in data)
    assert report.airtime_s == pytest.approx(sum(packet_airtime_s(len(d), "qpsk", BW_HZ) for d in data))


def test_low_snr_almost_none_arrive_but_airtime_counted(ctx, rx):
    tx = make_tx(ctx, rx.address)
    data = frames_bytes(200)
    report = tx.send(data, LOW, round_idx=0)
    assert tx.last_frames_lost == 200
    tx.send([SENTINEL], HIGH, round_idx=0)
    got = collect_until_sentinel(rx)
    tx.close()
    assert got == []
    assert report.frames_sent == 200
    assert report.airtime_s == pytest.approx(200 * packet_airtime_s(1000, "qpsk", BW_HZ))


def _mid_snr_survivors(ctx, rx, seed, attempts=1):
    tx = make_tx(ctx, rx.address, seed=seed)
    data = frames_bytes(150)
    out = []
    for _ in range(attempts):
        tx.send(data, MID, round_idx=4)
        tx.send([SENTINEL], HIGH, round_idx=999)
        out.append(frozenset(Frame.from_bytes(f.data).seq for f in collect_until_sentinel(rx)))
    tx.close()
    return out


def test_mid_snr_loss_reproducible_per_seed_and_attempt(ctx, rx):
    a = _mid_snr_survivors(ctx, rx, seed=1, attempts=2)
    b = _mid_snr_survivors(ctx, rx, seed=1, attempts=2)
    c = _mid_snr_survivors(ctx, rx, seed=2, attempts=1)
    assert a == b  # same seed, same history -> same outcome
    assert a[0] != a[1]  # a retransmission draws fresh losses
    assert a[0] != c[0]
    for survivors in a + c:
        assert 0.3 < len(survivors) / 150 < 0.7  # PER(13.5 dB, 1000 B) = 0.5


def test_garbage_is_skipped(ctx, rx, caplog):
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(rx.address)
    good = Frame(1, 1, 0, 1, b"ok").to_bytes()
    garbage = [
        [b"just one part"],
        [b"\xff\xfe not utf8", good],
        [b"{not json", good],
        [b"[1, 2]", good],
        [b'{"snr_db": "high"}', good],
        [b'{"snr_db": NaN}', good],
        [b"{}", good, b"extra"],
    ]
    with caplog.at_level(logging.WARNING, logger="phy.sim"):
        for msg in garbage:
            push.send_multipart(msg)
        push.send_multipart([FrameSidecar(snr_db=12.5).encode(), good])
        push.send_multipart([FrameSidecar().encode(), SENTINEL])  # no snr_db: accepted with None
        got = collect_until_sentinel(rx)
    push.close()
    assert [(f.data, f.snr_db) for f in got] == [(good, 12.5)]
    assert rx.malformed_count == len(garbage)
    assert sum("malformed" in r.getMessage() for r in caplog.records) == len(garbage)


def test_a_message_of_40000_parts_is_one_malformed_message_read_without_a_copy(ctx, rx, caplog):
    """libzmq bounds each part (MAXMSGSIZE) but not how many there are: the receiver reads such a message part by
    part, keeps two, counts it once as malformed and goes on (it once copied every part into Python first)."""
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(rx.address)
    good = Frame(1, 1, 0, 1, b"ok").to_bytes()
    with caplog.at_level(logging.WARNING, logger="phy.sim"):
        push.send_multipart([b"x" * 1000] * 40_000)
        push.send_multipart([FrameSidecar(snr_db=3.0).encode(), good])
        push.send_multipart([FrameSidecar().encode(), SENTINEL])
        assert rx.poll_socket.poll(20_000)  # the 40,000 parts are all in libzmq's queue before one can be read
        tracemalloc.start()
        got = collect_until_sentinel(rx)
        python_peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    push.close()
    assert [(f.data, f.snr_db) for f in got] == [(good, 3.0)]
    assert rx.malformed_count == 1
    assert any("got 40000" in r.getMessage() for r in caplog.records)
    assert python_peak_bytes < 4 << 20, python_peak_bytes  # 40 MB as bytes objects before


def test_recv_timeout_empty_and_poll_socket(ctx, rx):
    assert rx.recv(0) == []
    assert rx.recv(0.05) == []
    poller = zmq.Poller()
    poller.register(rx.poll_socket, zmq.POLLIN)
    assert poller.poll(0) == []
    tx = make_tx(ctx, rx.address)
    tx.send([SENTINEL], HIGH, round_idx=0)
    assert poller.poll(20_000)  # readable once the frame is queued
    got = rx.drain_until_quiet(quiet_s=0.1, max_wait_s=20.0)
    assert [f.data for f in got] == [SENTINEL]
    tx.close()


def test_drain_takes_a_batch_at_a_time_so_a_flood_does_not_pile_up(ctx, rx):
    # the BS handles each drained frame before more come off the socket: a peer that never goes quiet costs the
    # drain's time, not memory (a list-returning drain held 500 MB of a flood's frames at once)
    rx.max_batch = 10
    push = ctx.socket(zmq.PUSH)
    push.connect(rx.address)
    frame = Frame(1, 1, 0, 1, b"x" * 100).to_bytes()
    for _ in range(100):
        push.send_multipart([FrameSidecar(snr_db=20.0).encode(), frame])
    push.send_multipart([FrameSidecar().encode(), SENTINEL])
    time.sleep(0.5)  # all 101 queued at the receiver
    drain = rx.drain_until_quiet(quiet_s=1.0, max_wait_s=20.0)
    assert next(drain).data == frame
    assert len(rx.recv(0)) == 10  # the next batch is still on the socket, not in the drain's hands
    rest = list(drain)
    assert len(rest) == 101 - 1 - 10 and rest[-1].data == SENTINEL
    push.close()


def test_bs_gone_does_not_block_forever(ctx, caplog):
    # a port held by a socket that never listens: connections are refused, and no other process of the suite can
    # bind it meanwhile (a closed receiver's port could be taken again, and then frames would be delivered)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{held.getsockname()[1]}"
    tx = make_tx(ctx, address, send_timeout_s=0.2, sndhwm=4)
    with caplog.at_level(logging.WARNING, logger="phy.sim"):
        report = tx.send(frames_bytes(50), HIGH, round_idx=0)
    assert report.frames_sent == 50
    assert tx.last_frames_lost == 0
    assert 0 < tx.last_frames_undeliverable <= 50
    assert any("send timeout" in r.getMessage() for r in caplog.records)
    tx.close()
    held.close()


def test_send_validation(ctx, rx):
    tx = make_tx(ctx, rx.address)
    assert tx.send([], HIGH, round_idx=0).frames_sent == 0
    with pytest.raises(ValueError, match="4091"):
        tx.send([bytes(4092)], HIGH, round_idx=0)
    tx.close()
    with pytest.raises(RuntimeError):
        tx.send([SENTINEL], HIGH, round_idx=0)


# ---------------------------------------------------------------- a sim whose loss model is not the controller's
MISMATCH = REPO_ROOT / "hw_configs" / "sim_mismatch.yaml"
TRUE_CURVE = REPO_ROOT / "hw_configs" / "calibration" / "sim_mismatch.true.yaml"


def test_sim_mismatch_bench_loads_with_its_impairments_and_true_curve():
    bench = load_bench(MISMATCH)
    ch = bench.channel
    assert len(bench.devices) == 6 and bench.phy == "sim" and bench.per_curve is None
    assert (ch.fading, ch.rician_k_db, ch.shadowing_sigma_db, ch.fading_correlation) == ("rician", 3.0, 6.0, 0.7)
    assert (ch.interference, ch.interference_prob, ch.interference_inr_db) == ("gilbert-elliott", 0.2, 10.0)
    assert ch.true_per_curve == str(TRUE_CURVE.resolve())  # resolved from the bench's folder, content carried
    assert ch.true_per_curve_table == read_per_curve(TRUE_CURVE)
    assert validated(BenchConfig, to_mapping(bench), "welcome: bench") == bench  # an edge needs no file
    with pytest.raises(ConfigError, match=r"channel\.true_per_curve = 'nowhere\.yaml': no such file"):
        load_bench(MISMATCH, ["channel.true_per_curve=nowhere.yaml"])


def test_true_curve_is_the_built_in_one_two_db_worse_and_only_the_sim_link_uses_it():
    bench = load_bench(MISMATCH)
    true_curve, told = PerCurve.for_sim_link(bench), PerCurve.for_bench(bench)
    assert told.to_dict() == PerCurve.default().to_dict()  # the controller's curve
    for modulation in ("bpsk", "qpsk", "8psk"):
        for snr_db in np.arange(5.0, 25.0, 0.5):
            assert true_curve.per(snr_db + 2.0, modulation, 1000) == pytest.approx(
                told.per(snr_db, modulation, 1000), abs=1e-5
            )
    nominal = load_bench(REPO_ROOT / "hw_configs" / "sim_hetero.yaml")
    assert PerCurve.for_sim_link(nominal).to_dict() == PerCurve.for_bench(nominal).to_dict()  # no true curve


def test_sim_link_draws_losses_from_the_true_curve(ctx, rx):
    # 15.5 dB QPSK at 1 m: the controller's curve says PER 0.11, the true one 0.5
    bench = load_bench(
        MISMATCH,
        [
            "channel.fading=none",
            "channel.shadowing_sigma_db=0",
            "channel.interference=none",
            "devices=[{distance_m: 1}]",
        ],
    )
    tx = open_uplink_transmitter(bench, 0, data_address=rx.address, seed=5, context=ctx)
    assert tx.per_curve.to_dict() == PerCurve.for_sim_link(bench).to_dict()
    setting = TxSetting(tx_power_dbm=15.5 - 65.0, bandwidth_hz=BW_HZ)
    data = frames_bytes(300)
    assert {len(d) for d in data} == {1000}
    tx.send(data, setting, round_idx=0)
    assert tx.last_true_snr_db == pytest.approx(15.5)
    tx.send([SENTINEL], HIGH, round_idx=0)
    got = collect_until_sentinel(rx)
    tx.close()
    assert PerCurve.for_bench(bench).per(15.5, "qpsk", 1000) < 0.15
    assert 0.35 < len(got) / len(data) < 0.65  # PER 0.5: 150 expected, standard deviation 8.7


def test_sim_transmitter_applies_the_impairments_through_sim_channel(ctx, rx):
    bench = load_bench(MISMATCH)
    tx = open_uplink_transmitter(bench, 3, data_address=rx.address, seed=5, context=ctx)
    world = SimChannel(bench.channel, seed=5)
    nominal = SimChannel(bench.channel.nominal(), seed=5)
    geom = DeviceGeometry(3, bench.device(3).distance_m)
    rises = []
    for r in range(40):
        tx.send([Frame(3, r, 0, 1, b"x").to_bytes()], HIGH, round_idx=r)
        assert tx.last_true_snr_db == world.snr_db(geom, r, HIGH)
        offset_db = world.shadowing_db(3) + world.fading_db(3, r) - world.interference_rise_db(r)
        assert tx.last_true_snr_db == pytest.approx(nominal.snr_db(geom, r, HIGH) - nominal.fading_db(3, r) + offset_db)
        rises.append(world.interference_rise_db(r))
    tx.close()
    assert world.shadowing_db(3) != 0.0 and 0 < sum(rise > 0 for rise in rises) < 40

import json
import math

import numpy as np
import pytest

from phy.channel import (
    ChannelConfig,
    DeviceGeometry,
    PerCurve,
    SimChannel,
    TxSetting,
)
from proto.numerology import MODULATION_NAMES

# ---------------------------------------------------------------- TxSetting (airtime: tests/test_numerology.py)


def test_tx_setting_validation():
    TxSetting(tx_power_dbm=10.0, bandwidth_hz=1e6, modulation="8psk")
    with pytest.raises(ValueError, match="modulation"):
        TxSetting(10.0, 1e6, "16qam")
    with pytest.raises(ValueError, match="bandwidth"):
        TxSetting(10.0, 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        TxSetting(10.0, -1e6)
    with pytest.raises(ValueError):
        TxSetting(float("nan"), 1e6)


# ---------------------------------------------------------------- PerCurve


def test_default_per_matches_measured_points():
    pc = PerCurve.default()
    for mod, snr50, snr_full in [("bpsk", 12.0, 16.0), ("qpsk", 13.5, 18.0), ("8psk", 19.0, 22.0)]:
        assert pc.per(snr50, mod, 1000) == pytest.approx(0.5, abs=0.01)
        assert pc.per(snr_full, mod, 1000) <= 0.02
        assert pc.per(snr50 - 4.0, mod, 1000) >= 0.9
        assert pc.per(-50.0, mod, 1000) == 1.0
        assert pc.per(60.0, mod, 1000) == 0.0


def test_default_per_monotone_and_ordered():
    pc = PerCurve.default()
    snrs = np.linspace(-5, 35, 801)
    for mod in MODULATION_NAMES:
        per = [pc.per(s, mod, 1000) for s in snrs]
        assert all(b <= a for a, b in zip(per, per[1:]))
        assert all(0.0 <= p <= 1.0 for p in per)
    # Denser constellations need more SNR.
    for s in snrs:
        assert pc.per(s, "bpsk", 1000) <= pc.per(s, "qpsk", 1000) + 1e-12
        assert pc.per(s, "qpsk", 1000) <= pc.per(s, "8psk", 1000) + 1e-12
    assert pc.per(15.0, "qpsk", 1000) < pc.per(15.0, "8psk", 1000)


def test_frame_size_scaling():
    pc = PerCurve.from_points({"qpsk": [(0.0, 1.0), (10.0, 0.2), (20.0, 0.0)]}, ref_frame_bytes=1000)
    assert pc.per(10.0, "qpsk", 1000) == pytest.approx(0.2)
    assert pc.per(10.0, "qpsk", 2000) == pytest.approx(1 - 0.8**2)
    assert pc.per(10.0, "qpsk", 500) == pytest.approx(1 - 0.8**0.5)
    assert pc.per(10.0, "qpsk", 0) == 0.0
    assert pc.per(5.0, "qpsk", 1000) == pytest.approx(0.6)  # linear in dB between points
    assert pc.per(0.0, "qpsk", 4000) == 1.0
    assert pc.per(20.0, "qpsk", 4000) == 0.0


def test_min_snr_inverts_per():
    pc = PerCurve.default()
    for mod in MODULATION_NAMES:
        for size in (200, 1000, 4020):
            for target in (0.5, 0.1, 0.01):
                s = pc.min_snr_db(mod, size, target)
                assert pc.per(s, mod, size) == pytest.approx(target, abs=1e-6)
                assert pc.per(s - 0.1, mod, size) > target
    assert pc.min_snr_db("qpsk", 1000, 1.0) == -math.inf


def test_per_curve_validation():
    with pytest.raises(ValueError, match="increasing"):
        PerCurve.from_points({"qpsk": [(10.0, 0.5), (5.0, 0.1)]})
    with pytest.raises(ValueError, match="<= 1"):
        PerCurve.from_points({"qpsk": [(5.0, 1.5), (10.0, 0.1)]})
    with pytest.raises(ValueError, match="non-increasing"):
        PerCurve.from_points({"qpsk": [(5.0, 0.1), (10.0, 0.5)]})
    with pytest.raises(ValueError, match="expected one of 'bpsk'"):
        PerCurve.from_points({"64qam": [(5.0, 0.1)]})
    with pytest.raises(ValueError):
        PerCurve.from_points({"qpsk": []})
    with pytest.raises(ValueError):
        PerCurve.from_points({"qpsk": [(5.0, 0.1)]}, ref_frame_bytes=0)
    pc = PerCurve.from_points({"qpsk": [(5.0, 0.1)]})
    with pytest.raises(ValueError, match="no table"):
        pc.per(5.0, "bpsk", 100)


def test_from_file_json_and_yaml_round_trip(tmp_path):
    pc = PerCurve.default()
    jpath = tmp_path / "per.json"
    jpath.write_text(json.dumps(pc.to_dict()))
    ypath = tmp_path / "per.yaml"
    ypath.write_text("ref_frame_bytes: 500\ncurves:\n  bpsk: [[0, 1.0], [10, 0.5], [20, 0.0]]\n")
    from_json = PerCurve.from_file(jpath)
    from_yaml = PerCurve.from_file(str(ypath))
    assert from_json.points("qpsk") == pc.points("qpsk")
    assert from_yaml.ref_frame_bytes == 500
    assert from_yaml.per(10.0, "bpsk", 500) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text, field",
    [
        ("[1, 2]", "top level"),
        ('{"curves": {}}', "curves"),
        ('{"ref_frame_bytes": -5, "curves": {"qpsk": [[0, 0.5]]}}', "ref_frame_bytes"),
        ('{"curves": {"qam": [[0, 0.5]]}}', "curves.qam"),
        ('{"curves": {"qpsk": [[0, 0.5], [1]]}}', r"curves.qpsk\[1\]"),
        ('{"curves": {"qpsk": [[0, 0.5], [1, "x"]]}}', r"curves.qpsk\[1\]"),
        ('{"curves": {"qpsk": "nope"}}', "curves.qpsk"),
        ('{"curves": {"qpsk": [[5, 0.5], [1, 0.6]]}}', "increasing"),
        ('{"curves": {"qpsk": [[0, 0.5]]}, "extra": 1}', "extra"),
        ("{not json", "parse"),
    ],
)
def test_from_file_errors_name_file_and_field(tmp_path, text, field):
    path = tmp_path / "curve.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=field) as info:
        PerCurve.from_file(path)
    assert "curve.json" in str(info.value)


def test_from_file_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nothere.yaml"):
        PerCurve.from_file(tmp_path / "nothere.yaml")


# ---------------------------------------------------------------- SimChannel

GEOM = DeviceGeometry(device_id=3, distance_m=20.0)
NO_FADING = ChannelConfig(fading="none")


def test_path_loss_slope():
    ch = SimChannel(ChannelConfig(path_loss_exponent=3.5, ref_loss_db=40.0), seed=1)
    assert ch.path_loss_db(1.0) == pytest.approx(40.0)
    for d in (2.0, 10.0, 37.0):
        assert ch.path_loss_db(10 * d) - ch.path_loss_db(d) == pytest.approx(35.0)
    assert ch.path_loss_db(0.1) == pytest.approx(40.0)  # clamped at ref distance
    with pytest.raises(ValueError):
        ch.path_loss_db(0.0)


def test_noise_and_snr_formula():
    ch = SimChannel(NO_FADING, seed=1)
    assert ch.noise_dbm(1e6) == pytest.approx(-174 + 60 + 9)
    s = TxSetting(tx_power_dbm=10.0, bandwidth_hz=1e6)
    expected = 10.0 - ch.path_loss_db(20.0) - ch.noise_dbm(1e6)
    assert ch.snr_db(GEOM, 0, s) == pytest.approx(expected)


def test_narrower_bandwidth_higher_snr():
    ch = SimChannel(ChannelConfig(), seed=5)
    wide = TxSetting(10.0, 2e6)
    for bw in (1e6, 250e3, 31.25e3):
        narrow = TxSetting(10.0, bw)
        gain = ch.snr_db(GEOM, 7, narrow) - ch.snr_db(GEOM, 7, wide)
        assert gain == pytest.approx(10 * math.log10(2e6 / bw))


def test_gain_inversion_round_trip():
    ch = SimChannel(ChannelConfig(), seed=5)
    s = TxSetting(3.0, 500e3, "bpsk")
    snr = ch.snr_db(GEOM, 4, s)
    gain = ch.gain_db_from_snr(snr, s)
    assert gain == pytest.approx(ch.gain_db(GEOM, 4))
    assert gain == pytest.approx(snr - s.tx_power_dbm + ch.noise_dbm(s.bandwidth_hz))
    other = TxSetting(13.0, 125e3, "qpsk")
    assert ch.snr_db_from_gain(gain, other) == pytest.approx(ch.snr_db(GEOM, 4, other))


def test_rayleigh_mean_power_is_one():
    ch = SimChannel(ChannelConfig(fading="rayleigh"), seed=11)
    power = np.array([10 ** (ch.fading_db(d, r) / 10) for d in range(4) for r in range(2500)])
    # |h|^2 ~ Exp(1): mean 1, std 1 -> standard error 0.01 over 10k samples.
    assert power.mean() == pytest.approx(1.0, abs=0.05)
    assert np.median(power) == pytest.approx(math.log(2), abs=0.05)
    assert power.std() == pytest.approx(1.0, abs=0.1)


def test_fading_deterministic_and_block():
    a = SimChannel(ChannelConfig(), seed=42)
    b = SimChannel(ChannelConfig(), seed=42)
    c = SimChannel(ChannelConfig(), seed=43)
    va = [a.fading_db(d, r) for d in range(3) for r in range(20)]
    assert va == [b.fading_db(d, r) for d in range(3) for r in range(20)]
    assert va == [a.fading_db(d, r) for d in range(3) for r in range(20)]  # same block on repeat
    assert va != [c.fading_db(d, r) for d in range(3) for r in range(20)]
    assert a.fading_db(0, 1) != a.fading_db(1, 0)
    assert len(set(va)) == len(va)
    assert SimChannel(NO_FADING, seed=42).fading_db(0, 1) == 0.0


def test_channel_config_validation():
    with pytest.raises(ValueError, match="fading"):
        ChannelConfig(fading="rician")
    with pytest.raises(ValueError):
        ChannelConfig(snr_est_sigma_db=-1)
    with pytest.raises(ValueError):
        DeviceGeometry(1, 0.0)
    with pytest.raises(ValueError):
        SimChannel(ChannelConfig(), seed=-1)

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
        ChannelConfig(fading="nakagami")
    with pytest.raises(ValueError):
        ChannelConfig(snr_est_sigma_db=-1)
    with pytest.raises(ValueError):
        DeviceGeometry(1, 0.0)
    with pytest.raises(ValueError):
        SimChannel(ChannelConfig(), seed=-1)


# ---------------------------------------------------------------- impairments (the world the controller is not told)


def _nominal_fading_db(seed: int, device_id: int, round_idx: int) -> float:
    """The nominal block Rayleigh draw as SimChannel made it before the impairments existed."""
    rng = np.random.default_rng([seed, 0xFAD1, device_id, round_idx])
    re, im = rng.standard_normal(2)
    return 10.0 * math.log10(max((re * re + im * im) / 2.0, 1e-30))


def _powers(cfg: ChannelConfig, devices: int = 4, rounds: int = 2500, seed: int = 11) -> np.ndarray:
    ch = SimChannel(cfg, seed=seed)
    return np.array([10 ** (ch.fading_db(d, r) / 10) for d in range(devices) for r in range(rounds)])


def test_defaults_reproduce_the_nominal_draws_exactly():
    ch = SimChannel(ChannelConfig(), seed=42)
    setting = TxSetting(5.0, 250e3)
    for d in range(3):
        geom = DeviceGeometry(d, 15.0 + 10 * d)
        for r in range(30):
            fade_db = _nominal_fading_db(42, d, r)
            assert ch.fading_db(d, r) == fade_db  # bit for bit
            assert ch.gain_db(geom, r) == -ch.path_loss_db(geom.distance_m) + fade_db
            assert ch.snr_db(geom, r, setting) == setting.tx_power_dbm + ch.gain_db(geom, r) - ch.noise_dbm(250e3)
            assert ch.shadowing_db(d) == 0.0 and ch.interference_rise_db(r) == 0.0
    assert ch.fading_gain(1, 2) == pytest.approx(
        complex(*np.random.default_rng([42, 0xFAD1, 1, 2]).standard_normal(2)) / math.sqrt(2)
    )
    assert SimChannel(NO_FADING, seed=1).fading_gain(0, 3) == 1.0


def test_rician_large_k_tends_to_no_fading():
    stds = [_powers(ChannelConfig(fading="rician", rician_k_db=k), rounds=500).std() for k in (0.0, 10.0, 20.0, 40.0)]
    assert stds == sorted(stds, reverse=True)
    power = _powers(ChannelConfig(fading="rician", rician_k_db=40.0), rounds=500)
    assert power.mean() == pytest.approx(1.0, abs=0.01)
    assert stds[-1] < 0.03  # sqrt(2K + 1) / (K + 1) = 0.014 at K = 40 dB
    assert np.all(np.abs(10 * np.log10(power)) < 0.5)


def test_rician_small_k_is_rayleigh_and_k3db_has_its_spread():
    rayleigh = _powers(ChannelConfig(fading="rayleigh"))
    almost = _powers(ChannelConfig(fading="rician", rician_k_db=-40.0))
    # |h|^2 ~ Exp(1): mean 1, std 1, median ln 2 (standard error 0.01 over 10k samples)
    for power in (rayleigh, almost):
        assert power.mean() == pytest.approx(1.0, abs=0.05)
        assert power.std() == pytest.approx(1.0, abs=0.1)
        assert np.median(power) == pytest.approx(math.log(2), abs=0.05)
    k_lin = 10**0.3
    k3 = _powers(ChannelConfig(fading="rician", rician_k_db=3.0))
    assert k3.mean() == pytest.approx(1.0, abs=0.05)  # E|h|^2 = 1 whatever K
    assert k3.std() == pytest.approx(math.sqrt(2 * k_lin + 1) / (k_lin + 1), abs=0.06)  # 0.746


@pytest.mark.parametrize("fading", ["rayleigh", "rician"])
def test_ar1_correlation_of_successive_gains_matches_the_coefficient(fading):
    rho = 0.7
    ch = SimChannel(ChannelConfig(fading=fading, rician_k_db=3.0, fading_correlation=rho), seed=5)
    h = np.array([[ch.fading_gain(d, r) for r in range(2500)] for d in range(4)])
    scattered = h - h.mean()  # the line-of-sight part is constant
    var = np.mean(np.abs(scattered) ** 2)

    def lag(k: int) -> float:
        return float(np.real(np.mean(scattered[:, k:] * np.conj(scattered[:, :-k]))) / var)

    assert lag(1) == pytest.approx(rho, abs=0.04)
    assert lag(2) == pytest.approx(rho**2, abs=0.05)
    assert np.mean(np.abs(h) ** 2) == pytest.approx(1.0, abs=0.1)  # still unit mean power (stationary start)
    # uncorrelated fading: successive gains independent
    iid = SimChannel(ChannelConfig(fading=fading, rician_k_db=3.0), seed=5)
    g = np.array([iid.fading_gain(0, r) for r in range(5000)])
    g = g - g.mean()
    assert abs(np.real(np.mean(g[1:] * np.conj(g[:-1])) / np.mean(np.abs(g) ** 2))) < 0.06


def test_correlated_fading_is_deterministic_in_any_query_order():
    cfg = ChannelConfig(fading_correlation=0.9)
    forward = SimChannel(cfg, seed=3)
    values = [forward.fading_db(d, r) for d in range(3) for r in range(40)]
    backward = SimChannel(cfg, seed=3)
    assert [backward.fading_db(d, r) for d in reversed(range(3)) for r in reversed(range(40))] == values[::-1]
    assert values != [SimChannel(cfg, seed=4).fading_db(d, r) for d in range(3) for r in range(40)]
    # the first round is the nominal draw (stationary start), later ones are not
    assert forward.fading_db(1, 0) == _nominal_fading_db(3, 1, 0)
    assert forward.fading_db(1, 5) != _nominal_fading_db(3, 1, 5)


def test_shadowing_is_fixed_per_device_and_seeded():
    sigma_db = 6.0
    ch = SimChannel(ChannelConfig(shadowing_sigma_db=sigma_db), seed=9)
    nominal = SimChannel(ChannelConfig(), seed=9)
    for d in range(4):
        geom = DeviceGeometry(d, 30.0)
        offsets = {ch.gain_db(geom, r) - nominal.gain_db(geom, r) for r in range(20)}
        assert max(offsets) - min(offsets) < 1e-9  # the same in every round
        assert ch.gain_db(geom, 7) - nominal.gain_db(geom, 7) == pytest.approx(ch.shadowing_db(d))
    assert SimChannel(ch.cfg, seed=9).shadowing_db(2) == ch.shadowing_db(2)
    assert SimChannel(ch.cfg, seed=10).shadowing_db(2) != ch.shadowing_db(2)
    draws = np.array([ch.shadowing_db(d) for d in range(2000)])
    assert draws.mean() == pytest.approx(0.0, abs=0.6)  # standard error 0.13 dB
    assert draws.std() == pytest.approx(sigma_db, abs=0.6)  # standard error 0.1 dB


def test_interference_occupies_the_configured_fraction_and_raises_the_floor_by_the_inr():
    cfg = ChannelConfig(
        fading="none",
        interference="gilbert-elliott",
        interference_prob=0.2,
        interference_persist=0.6,
        interference_inr_db=10.0,
    )
    ch = SimChannel(cfg, seed=7)
    bad = np.array([ch.interference_active(r) for r in range(20_000)])
    assert bad.mean() == pytest.approx(0.2, abs=0.03)  # standard error 0.005 (bursts of mean length 2.5)
    assert np.mean(bad[1:][bad[:-1]]) == pytest.approx(0.6, abs=0.05)  # P(bad | bad) = persist: bursty
    assert np.mean(bad[1:][~bad[:-1]]) == pytest.approx(0.1, abs=0.03)  # P(bad | good) = 0.2 * 0.4 / 0.8
    rise_db = 10 * math.log10(1 + 10.0)  # N + I with I = INR N: 10.41 dB
    nominal = SimChannel(cfg.model_copy(update={"interference": "none"}), seed=7)
    setting = TxSetting(0.0, 125e3)
    for r in range(60):
        assert ch.noise_floor_dbm(125e3, r) - ch.noise_dbm(125e3) == pytest.approx(rise_db if bad[r] else 0.0)
        for d in (0, 3):  # every device in the same bad rounds: the interference is at the BS
            geom = DeviceGeometry(d, 20.0)
            drop_db = nominal.snr_db(geom, r, setting) - ch.snr_db(geom, r, setting)
            assert drop_db == pytest.approx(rise_db if bad[r] else 0.0)
    assert [SimChannel(cfg, seed=7).interference_active(r) for r in reversed(range(100))] == list(bad[:100][::-1])
    assert not any(SimChannel(ChannelConfig(), seed=7).interference_active(r) for r in range(100))


def test_impairment_config_validation():
    with pytest.raises(ValueError, match="interference_persist"):  # P(good -> bad) would exceed 1
        ChannelConfig(interference="gilbert-elliott", interference_prob=0.6, interference_persist=0.2)
    ChannelConfig(interference="gilbert-elliott", interference_prob=0.6, interference_persist=0.4)
    for bad in (
        {"fading_correlation": 1.0},
        {"fading_correlation": -0.1},
        {"shadowing_sigma_db": -1.0},
        {"interference_prob": 1.0},
        {"interference": "bursty"},
        {"rician_k_db": float("inf")},
    ):
        with pytest.raises(ValueError):
            ChannelConfig(**bad)
    with pytest.raises(ValueError, match="true_per_curve"):
        ChannelConfig(true_per_curve="x.yaml")

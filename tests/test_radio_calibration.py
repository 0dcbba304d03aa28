"""Radio calibration files (phy/radio_calibration.py) and the noise-floor helper (calibration/noise_floor.py).

Everything here is offline: the noise floor is checked on synthetic captures whose PSD is known exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibration.noise_floor import (
    full_scale_dbm_from_tone,
    load_samples,
    noise_floor_dbm_hz,
    power_dbfs,
    psd_dbfs_hz,
)
from calibration.noise_floor import (
    main as noise_floor_main,
)
from phy.channel import ChannelConfig, SimChannel
from phy.radio_calibration import (
    RadioCalibration,
    RadioCalibrationError,
    from_mapping,
    load_radio_calibration,
    write_radio_calibration,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "hw_configs" / "calibration" / "usrp_b210.example.yaml"


def _doc(**changes):
    doc = {
        "radio": "hackrf_one",
        "center_freq_hz": 2.45e9,
        "sample_rate_hz": 2e6,
        "tx": [[0, -40.0], [10, -30.5], [20, -20.0], [30, -11.0], [40, -4.0]],
        "rx_gain_db": 32,
        "noise_floor_dbm_hz": -162.5,
        "measured_on": "2026-11-20",
        "by": "lab",
        "notes": "test",
        "placeholder": False,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


# ------------------------------------------------------------------------------------------------ file
def test_example_file_is_a_marked_placeholder_and_loads_only_when_allowed():
    with pytest.raises(RadioCalibrationError, match="placeholder.*need a bench measurement") as info:
        load_radio_calibration(EXAMPLE)
    assert "usrp_b210.example.yaml" in str(info.value)
    cal = load_radio_calibration(EXAMPLE, allow_placeholder=True)
    assert cal.placeholder and cal.radio == "usrp_b210"
    assert cal.center_freq_hz == 2.45e9 and cal.measured_on == "2026-11-22"
    assert "needs a bench measurement" in EXAMPLE.read_text()


def test_tx_gain_and_power_invert_each_other_monotonically():
    cal = from_mapping(_doc())
    assert cal.tx_power_range_dbm == (-40.0, -4.0)
    assert cal.tx_power_dbm_for(10) == pytest.approx(-30.5)
    assert cal.tx_gain_db_for(-30.5) == pytest.approx(10.0)
    assert cal.tx_gain_db_for(-25.25) == pytest.approx(15.0)  # linear in dB between points
    powers = np.linspace(-40.0, -4.0, 97)
    gains = [cal.tx_gain_db_for(p) for p in powers]
    assert all(b > a for a, b in zip(gains, gains[1:]))
    for p, g in zip(powers, gains):
        assert cal.tx_power_dbm_for(g) == pytest.approx(p, abs=1e-9)
    assert cal.tx_gain_db_for(-40.0) == 0.0 and cal.tx_gain_db_for(-4.0) == 40.0  # end points included


@pytest.mark.parametrize("power_dbm", [-40.01, -3.9, 15.0])
def test_tx_power_outside_the_table_is_a_clear_error(power_dbm):
    cal = from_mapping(_doc(), "bench/hackrf.yaml")
    with pytest.raises(RadioCalibrationError, match=r"outside the measured TX table.*-40 \.\. -4 dBm") as info:
        cal.tx_gain_db_for(power_dbm)
    assert "bench/hackrf.yaml" in str(info.value) and "hackrf_one" in str(info.value)


def test_tx_gain_outside_the_table_and_non_numbers_are_errors():
    cal = from_mapping(_doc())
    for gain in (-1.0, 40.5):
        with pytest.raises(RadioCalibrationError, match="outside the measured table"):
            cal.tx_power_dbm_for(gain)
    with pytest.raises(RadioCalibrationError, match="finite"):
        cal.tx_gain_db_for(float("nan"))
    with pytest.raises(RadioCalibrationError, match="finite"):
        cal.tx_power_dbm_for("10")


def test_noise_numbers_map_onto_the_sim_channel_model():
    cal = from_mapping(_doc())
    assert cal.noise_figure_db == pytest.approx(11.5)
    assert cal.noise_dbm(1e6) == pytest.approx(-162.5 + 60.0)
    overrides = cal.bench_overrides()
    assert overrides == {
        "radio.min_tx_power_dbm": -40.0,
        "radio.max_tx_power_dbm": -4.0,
        "channel.noise_psd_dbm_hz": -174.0,
        "channel.noise_figure_db": 11.5,
    }
    channel = SimChannel(
        ChannelConfig(
            noise_psd_dbm_hz=overrides["channel.noise_psd_dbm_hz"], noise_figure_db=overrides["channel.noise_figure_db"]
        ),
        seed=0,
    )
    for bw in (31.25e3, 250e3, 1e6):
        assert channel.noise_dbm(bw) == pytest.approx(cal.noise_dbm(bw))


def test_write_and_load_round_trip(tmp_path):
    cal = RadioCalibration(
        radio="usrp_b210",
        center_freq_hz=915e6,
        sample_rate_hz=1e6,
        tx_table=[[60, -20.0], [70, -10.2], [80, -0.7]],
        rx_gain_db=45.0,
        noise_floor_dbm_hz=-167.2,
        measured_on="2026-11-21",
        by="A. Tester",
        notes="power meter, 40 dB pad",
        serial="31AB5C7",
        tx_level_dbfs=-12.0,
        rx_full_scale_dbm=-28.0,
    )
    path = write_radio_calibration(cal, tmp_path / "cal" / "b210.yaml", header="measured in lab 2\nsee notes")
    text = path.read_text()
    assert text.startswith("# measured in lab 2\n# see notes\n")
    back = load_radio_calibration(path)
    assert back == cal and back.tx_table == ((60, -20.0), (70, -10.2), (80, -0.7))
    assert back.source == str(path)
    assert yaml.safe_load(text)["tx"] == [[60, -20.0], [70, -10.2], [80, -0.7]]


def test_yaml_dates_and_exponent_strings_are_accepted(tmp_path):
    path = tmp_path / "radio.yaml"
    path.write_text(yaml.safe_dump(_doc(center_freq_hz="2.45e9")).replace("'2026-11-20'", "2026-11-20"))
    cal = load_radio_calibration(path)
    assert cal.center_freq_hz == 2.45e9 and cal.measured_on == "2026-11-20"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"radio": ""}, "'radio'"),
        ({"center_freq_hz": -1}, "'center_freq_hz'"),
        ({"sample_rate_hz": "fast"}, "'sample_rate_hz'"),
        ({"tx": "nope"}, "'tx'"),
        ({"tx": [[0, -40.0]]}, "'tx'"),
        ({"tx": [[0, -40.0], [10]]}, r"'tx\[1\]'"),
        ({"tx": [[0, -40.0], [10, True]]}, r"'tx\[1\]'"),
        ({"tx": [[0, -40.0], [0, -30.0]]}, r"'tx\[1\]'.*gain_db must be strictly increasing"),
        ({"tx": [[0, -40.0], [10, -30.0], [20, -30.0]]}, r"'tx\[2\]'.*power_dbm must rise"),
        ({"rx_gain_db": None}, "missing field.*rx_gain_db"),
        ({"noise_floor_dbm_hz": -180.0}, "'noise_floor_dbm_hz'.*thermal"),
        ({"noise_floor_dbm_hz": -40.0}, "'noise_floor_dbm_hz'"),
        ({"measured_on": "last tuesday"}, "'measured_on'.*YYYY-MM-DD"),
        ({"by": ""}, "'by'"),
        ({"placeholder": "yes"}, "'placeholder'"),
        ({"tx_level_dbfs": 3.0}, "'tx_level_dbfs'"),
        ({"rx_full_scale_dbm": float("inf")}, "'rx_full_scale_dbm'"),
        ({"by": ...}, r"missing field\(s\) \['by'\]"),
        ({"gain_table": []}, r"unknown field.*gain_table"),
    ],
)
def test_bad_files_name_the_file_and_the_field(tmp_path, changes, field):
    path = tmp_path / "b210.yaml"
    path.write_text(yaml.safe_dump(_doc(**changes)))
    with pytest.raises(RadioCalibrationError, match=field) as info:
        load_radio_calibration(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, problem", [("- 1\n- 2\n", "top level"), ("radio: [unclosed\n", "cannot parse")])
def test_unparsable_or_wrong_shape_files(tmp_path, text, problem):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(RadioCalibrationError, match=problem):
        load_radio_calibration(path)
    with pytest.raises(RadioCalibrationError, match="missing.yaml"):
        load_radio_calibration(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ noise floor
FS_HZ = 1e6


def _white(n: int, power: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(n) + 1j * rng.standard_normal(n)) * math.sqrt(power / 2)).astype(np.complex64)


def _floor_for(power: float, full_scale_dbm: float, fs_hz: float = FS_HZ) -> float:
    return full_scale_dbm + 10 * math.log10(power / fs_hz)


def test_psd_of_white_noise_is_its_power_over_the_sample_rate():
    x = _white(400_000, 1e-4)
    freqs, psd = psd_dbfs_hz(x, FS_HZ, nfft=512)
    assert freqs[0] == -FS_HZ / 2 and len(freqs) == 512
    assert 10 * np.log10(np.mean(10 ** (psd / 10))) == pytest.approx(10 * math.log10(1e-4 / FS_HZ), abs=0.05)
    assert power_dbfs(x) == pytest.approx(-40.0, abs=0.05)


def test_noise_floor_of_a_terminated_capture():
    # -166 dBm/Hz at the port (NF 8 dB) with 0 dBFS = -30 dBm: noise power -166 + 60 + 30 = -76 dBFS
    power = 10 ** ((-166.0 + 30.0 + 60.0) / 10)
    result = noise_floor_dbm_hz(_white(500_000, power, seed=1), FS_HZ, full_scale_dbm=-30.0)
    assert result.noise_floor_dbm_hz == pytest.approx(-166.0, abs=0.1)
    assert result.noise_figure_db == pytest.approx(8.0, abs=0.1)
    assert result.max_excess_db < 3.0


def test_dc_spike_and_filter_roll_off_are_kept_out():
    """A direct-conversion radio's LO leakage at DC and the anti-alias roll-off must not bias the floor."""
    power, fs_dbm = 1e-7, -25.0
    x = _white(600_000, power, seed=2)
    taps = np.sinc(0.9 * np.arange(-64, 65)) * np.hamming(129)  # low-pass at 0.45 fs: edges roll off
    x = np.convolve(x, taps / taps.sum(), mode="same").astype(np.complex64)
    x += np.complex64(0.003 + 0.002j)  # DC offset 23 dB above the whole noise power
    result = noise_floor_dbm_hz(x, FS_HZ, fs_dbm)
    assert result.noise_floor_dbm_hz == pytest.approx(_floor_for(power, fs_dbm), abs=0.15)
    assert result.power_dbfs > 10 * math.log10(power) + 10  # total power is dominated by the DC offset
    naive = fs_dbm + result.power_dbfs - 10 * math.log10(FS_HZ)
    assert naive > result.noise_floor_dbm_hz + 10  # why the PSD, not the total power, is used
    whole_band = noise_floor_dbm_hz(x, FS_HZ, fs_dbm, band_fraction=1.0, dc_exclude_hz=0.0)
    assert whole_band.noise_floor_dbm_hz > result.noise_floor_dbm_hz + 1.0


def test_full_scale_reference_from_a_known_tone():
    n = 200_000
    tone = (0.1 * np.exp(2j * np.pi * 0.0123 * np.arange(n))).astype(np.complex64)  # -20 dBFS
    assert full_scale_dbm_from_tone(tone, input_power_dbm=-50.0) == pytest.approx(-30.0, abs=1e-3)
    noise = _white(n, 0.005, seed=3)  # 3 dB below the tone: must be subtracted
    with_noise = tone + _white(n, 0.005, seed=4)
    assert full_scale_dbm_from_tone(with_noise, -50.0, noise_samples=noise) == pytest.approx(-30.0, abs=0.1)
    assert full_scale_dbm_from_tone(with_noise, -50.0) < -31.0  # without: off by the noise power
    with pytest.raises(ValueError, match="no power above the noise"):
        full_scale_dbm_from_tone(noise, -50.0, noise_samples=with_noise * 2)


@pytest.mark.parametrize("fmt, suffix", [("fc32", ".cfile"), ("sc16", ".sc16"), ("sc8", ".cs8"), ("npy", ".npy")])
def test_capture_files_load_in_full_scale_units(tmp_path, fmt, suffix):
    x = _white(100_000, 0.01, seed=5)
    path = tmp_path / f"capture{suffix}"
    iq = np.stack([x.real, x.imag], axis=1).ravel()
    if fmt == "fc32":
        iq.astype(np.float32).tofile(path)
    elif fmt == "sc16":
        np.round(iq * 32768).astype(np.int16).tofile(path)
    elif fmt == "sc8":
        np.clip(np.round(iq * 128), -128, 127).astype(np.int8).tofile(path)
    else:
        np.save(path, x)
    y = load_samples(path)
    assert y.dtype == np.complex64 and y.size == x.size
    assert power_dbfs(y) == pytest.approx(power_dbfs(x), abs=0.1)


def test_bad_samples_and_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        noise_floor_dbm_hz(np.ones(4096), FS_HZ, -30.0)
    with pytest.raises(ValueError, match="at least nfft"):
        noise_floor_dbm_hz(_white(100, 1.0), FS_HZ, -30.0)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        noise_floor_dbm_hz(_white(4096, 1.0), 0.0, -30.0)
    bad = tmp_path / "capture.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="unknown sample file type"):
        load_samples(bad)
    odd = tmp_path / "odd.sc16"
    np.arange(3, dtype=np.int16).tofile(odd)
    with pytest.raises(ValueError, match="odd number"):
        load_samples(odd)


def test_measured_floor_goes_into_a_calibration_file(tmp_path, capsys):
    """The measuring path end to end: capture file -> CLI -> value that validates in the radio file."""
    power = 10 ** ((-160.0 + 27.0 + 60.0) / 10)
    capture = tmp_path / "terminated.npy"
    np.save(capture, _white(300_000, power, seed=6))
    assert noise_floor_main([str(capture), "--sample-rate-hz", "1e6", "--full-scale-dbm", "-27"]) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    floor = float(out["noise_floor_dbm_hz"])
    assert floor == pytest.approx(-160.0, abs=0.1)
    cal = from_mapping(_doc(noise_floor_dbm_hz=round(floor, 2), rx_full_scale_dbm=-27.0))
    assert cal.noise_figure_db == pytest.approx(14.0, abs=0.1)
    assert noise_floor_main([str(tmp_path / "none.npy"), "--sample-rate-hz", "1e6", "--full-scale-dbm", "-27"]) == 2

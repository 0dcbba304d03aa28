"""The bench: PHY link, radio, ARQ, channel, addresses and the device profiles (hw_configs/*.yaml)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from config.base import ConfigModel, Items, RuleError
from config.per_curve import PerCurveTable
from proto.numerology import Modulation

NonEmptyStr = Annotated[str, Field(min_length=1)]
ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")
FadingModel = Literal["rayleigh", "rician", "none"]
InterferenceModel = Literal["none", "gilbert-elliott"]
# The sim channel's impairments beyond the nominal model. A controller is never told them (ChannelConfig.nominal).
IMPAIRMENT_KEYS = (
    "rician_k_db",
    "shadowing_sigma_db",
    "fading_correlation",
    "interference",
    "interference_prob",
    "interference_persist",
    "interference_inr_db",
    "true_per_curve",
    "true_per_curve_table",
)


class DeviceProfile(ConfigModel):
    """One edge device of the bench: where it stands and what its hardware costs."""

    distance_m: float = Field(gt=0.0)
    compute_watts_per_core: float = Field(12.0, gt=0.0)  # calibrated power of one busy core (CPU-s x this = J)
    energy_budget_j: float | None = Field(None, ge=0.0)  # long-term average energy per round (energy-aware policies)
    # EMULATION of slower hardware: 0.5 = a device half as fast. The edge stretches its measured training
    # time (it waits out the difference) and reports CPU-seconds and compute energy divided by this factor.
    compute_speed: float = Field(1.0, gt=0.0, le=1.0)


class RadioConfig(ConfigModel):
    total_bandwidth_hz: float = Field(1.0e6, gt=0.0)  # shared by the devices (FDMA)
    max_tx_power_dbm: float = 10.0
    min_tx_power_dbm: float = -10.0
    pa_efficiency: float = Field(0.3, gt=0.0, le=1.0)  # RF power out / DC power in of the transmit chain
    radio_on_power_w: float = Field(0.5, ge=0.0)  # baseband + RF circuits while transmitting
    frame_payload_bytes: int = Field(1000, gt=0)  # update bytes per PHY frame

    @model_validator(mode="after")
    def _power_range(self) -> RadioConfig:
        if self.min_tx_power_dbm > self.max_tx_power_dbm:
            limit = f"must be <= radio.max_tx_power_dbm ({self.max_tx_power_dbm:g})"
            raise RuleError("min_tx_power_dbm", self.min_tx_power_dbm, limit)
        return self


class ArqConfig(ConfigModel):
    max_attempts: int = Field(4, gt=0)
    guard_s: float = Field(0.2, ge=0.0)  # BS waits this long after a burst ends for frames in flight before it acks
    ack_timeout_s: float = Field(10.0, gt=0.0)  # edge gives up on an ack after this long
    airtime_budget_s: float | None = Field(60.0, gt=0.0)  # no new attempt would push the round's airtime past this


class ChannelConfig(ConfigModel):
    """Log-distance path loss, block fading and thermal noise of the sim link (phy/channel.py SimChannel).

    The defaults are the nominal channel the controller models. The impairments below them (IMPAIRMENT_KEYS) make
    the sim's world differ from it; the controller only sees `nominal()` and must learn them from measurements.
    """

    noise_psd_dbm_hz: float = -174.0
    noise_figure_db: float = 9.0
    ref_loss_db: float = 40.0
    ref_distance_m: float = Field(1.0, gt=0.0)
    path_loss_exponent: float = Field(3.5, ge=0.0)
    fading: FadingModel = "rayleigh"
    snr_est_sigma_db: float = Field(1.5, ge=0.0)  # the receiver's per-frame SNR estimation error (std)
    # --- impairments (sim link, and the air's gains on gr-zmq-iq); the defaults leave the nominal channel as is
    rician_k_db: float = Field(3.0, ge=-40.0, le=60.0)  # fading: rician: line-of-sight / scattered power
    shadowing_sigma_db: float = Field(0.0, ge=0.0, le=20.0)  # log-normal shadowing, one draw per device
    fading_correlation: float = Field(0.0, ge=0.0, lt=1.0)  # AR(1) coefficient of the gain round to round; 0 = iid
    interference: InterferenceModel = "none"  # bursty interference at the BS: a Gilbert-Elliott state per round
    interference_prob: float = Field(0.2, ge=0.0, lt=1.0)  # long-run fraction of rounds in the bad state
    interference_persist: float = Field(0.5, ge=0.0, lt=1.0)  # P(bad round | previous round bad)
    interference_inr_db: float = Field(10.0, ge=-30.0, le=60.0)  # interference / thermal noise in a bad round
    # PER calibration file the sim link draws losses from instead of the bench's per_curve (the controller keeps
    # per_curve or the built-in curve). load_bench resolves it like per_curve and reads it into true_per_curve_table.
    true_per_curve: str | None = None
    true_per_curve_table: PerCurveTable | None = None

    @model_validator(mode="after")
    def _impairment_rules(self) -> ChannelConfig:
        if self.true_per_curve is not None and self.true_per_curve_table is None:
            raise RuleError("true_per_curve", self.true_per_curve, "its table is missing (load_bench reads the file)")
        # P(good -> bad) = prob (1 - persist) / (1 - prob) keeps the long-run bad fraction at prob; it must be <= 1
        if self.interference_prob * (2.0 - self.interference_persist) > 1.0:
            limit = f"expected >= 2 - 1/interference_prob = {2.0 - 1.0 / self.interference_prob:g}"
            raise RuleError("interference_persist", self.interference_persist, limit)
        return self

    def nominal(self) -> ChannelConfig:
        """What a controller is told: path loss, noise, the estimation error and whether the channel fades (modelled
        as Rayleigh); none of the impairments, nor the sim's true PER curve."""
        defaults = ChannelConfig()
        update: dict[str, object] = {key: getattr(defaults, key) for key in IMPAIRMENT_KEYS}
        update["fading"] = "none" if self.fading == "none" else "rayleigh"
        return self.model_copy(update=update)


class AddressConfig(ConfigModel):
    control: str = "tcp://127.0.0.1:5755"  # BS control plane (ROUTER); edges connect here
    data: str = "tcp://127.0.0.1:5756"  # BS data-plane receiver (sim link)


class AirConfig(ConfigModel):
    """gr-zmq-iq: the air process (phy/air.py) between the edges and the BS (tcp://host:0 = a free port)."""

    address: str = "tcp://127.0.0.1:5757"  # air's ROUTER: edges send bursts here, the BS announces subbands
    medium: str = "tcp://127.0.0.1:5758"  # air's PUSH: the summed medium; the BS connects here
    max_cfo_hz: float = Field(300.0, ge=0.0)  # per-link carrier frequency offset, drawn uniform in +-this per device
    clock_speed: float = Field(1.0, gt=0.0)  # medium clock / real time (>1 runs the air faster, if CPU allows)
    hangover_s: float = Field(0.02, ge=0.005, le=10.0)  # noise after the last burst, so receivers release packets
    filter_attenuation_db: float = Field(60.0, ge=40.0, le=120.0)  # stopband of the subband filters


class RfConfig(ConfigModel):
    """rf: the OFDM flowgraphs on radios (phy/rf.py); gr-uhd (USRP) or gr-soapy (HackRF and others)."""

    driver: Literal["uhd", "soapy"] = "uhd"
    bs_device_args: str = Field("type=b200", min_length=1)  # the BS's radio (uhd device address or SoapySDR args)
    edge_device_args: Items[NonEmptyStr] = Field(("type=b200",), min_length=1)  # edge k uses entry k (cyclically)
    center_freq_hz: float = Field(2.45e9, gt=0.0)
    sample_rate_hz: float = Field(1.0e6, gt=0.0)  # the radios' rate (>= radio.total_bandwidth_hz)
    tx_gain_db: float = 60.0  # at radio.max_tx_power_dbm; a lower planned power lowers the gain dB for dB
    rx_gain_db: float = 40.0
    tx_antenna: str = ""  # "" = the driver's default
    rx_antenna: str = ""
    access: Literal["fdma", "tdma"] = "fdma"  # tdma: devices take turns in time slots over the whole band
    slot_s: float = Field(0.5, gt=0.0)  # tdma: one device's slot
    guard_s: float = Field(0.02, ge=0.0)  # tdma: silence at the end of a slot (clock error, TX/RX switching)
    digital_backoff_db: float = Field(6.0, ge=0.0, le=30.0)  # peak headroom of the OFDM samples below DAC full scale

    @model_validator(mode="after")
    def _radios_and_slots(self) -> RfConfig:
        if self.driver == "soapy":
            for key, args in (("bs_device_args", self.bs_device_args), ("edge_device_args", self.edge_device_args)):
                if not all("driver=" in a for a in ((args,) if isinstance(args, str) else args)):
                    raise RuleError(key, args, "SoapySDR args need driver=... (e.g. driver=hackrf)")
        if self.guard_s >= self.slot_s:
            raise RuleError("guard_s", self.guard_s, f"must be below rf.slot_s ({self.slot_s})")
        return self


class SecurityConfig(ConfigModel):
    """docs/security.md. sealed: every uplink frame is sealed (AEAD) under a per-device key derived from the
    devices' provisioned keys; none: frames in the clear, to measure a bare PHY (the records say which)."""

    mode: Literal["sealed", "none"] = "sealed"
    # the key directory made by `fedlora-keys init` (a relative path is taken from the bench file's folder);
    # None: the BS provisions fresh keys for the run in <run dir>/keys
    keys_dir: str | None = None


class DownlinkConfig(ConfigModel):
    """The BS -> edge direction: the adapter view as OFDM bursts over the whole band (gr-zmq-iq, docs/DESIGN.md
    "Downlink over the PHY"), or as an attachment of the plan on the control plane (no airtime, energy or loss)."""

    over_phy: bool | None = None  # None: on for gr-zmq-iq (the only PHY with a downlink here), off elsewhere
    tx_power_dbm: float = Field(20.0, ge=-30.0, le=40.0)  # the BS's transmit power
    modulation: Modulation = "qpsk"
    burst_frames: int = Field(32, ge=1, le=64)  # frames per downlink burst (a view is sent as several; 64 of the
    # largest frames at BPSK fit one burst the air takes, proto.air.MAX_DOWNLINK_SAMPLES)


class ReplayConfig(ConfigModel):
    """replay: a recorded run's link trace (its <run dir>/link_trace.jsonl) drives the link (phy/replay.py).
    load_bench resolves a relative path from the bench file's folder; only the BS opens it."""

    trace: str | None = None
    seed: int = Field(0, ge=0)  # the loss draws of frames the trace does not hold


class BenchConfig(ConfigModel):
    name: str = "sim"
    phy: Literal["sim", "gr-loopback", "gr-zmq-iq", "rf", "replay"] = "sim"
    radio: RadioConfig = Field(default_factory=RadioConfig)
    arq: ArqConfig = Field(default_factory=ArqConfig)
    channel: ChannelConfig = Field(default_factory=ChannelConfig)  # sim PHY only
    # PER-vs-SNR calibration file for the sim PHY and the controller; None = built-in curves. load_bench takes a
    # relative path from the bench file's folder, stores it resolved (for the record) and reads the file into
    # per_curve_table, which is what the link and the controller use: an edge never opens the path.
    per_curve: str | None = None
    per_curve_table: PerCurveTable | None = None
    snr_offset_db: float = 0.0  # GNU Radio receivers: calibrated correction added to the SNR estimate
    addresses: AddressConfig = Field(default_factory=AddressConfig)
    air: AirConfig = Field(default_factory=AirConfig)  # gr-zmq-iq only
    rf: RfConfig = Field(default_factory=RfConfig)  # rf only
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)  # replay only
    downlink: DownlinkConfig = Field(default_factory=DownlinkConfig)
    devices: Items[DeviceProfile] = Field(
        tuple(DeviceProfile(distance_m=d) for d in (10.0, 20.0, 35.0, 50.0)), min_length=1
    )

    @property
    def downlink_over_phy(self) -> bool:
        """Does the adapter view go down as OFDM bursts (True) or attached to the plan on the control plane?"""
        return self.phy == "gr-zmq-iq" if self.downlink.over_phy is None else self.downlink.over_phy

    def device(self, device_id: int) -> DeviceProfile:
        """Profile of a device; ids beyond the list reuse it cyclically (a bench of 4 can host 8 devices)."""
        return self.devices[device_id % len(self.devices)]

    @model_validator(mode="after")
    def _per_phy_rules(self) -> BenchConfig:
        if self.per_curve is not None and self.per_curve_table is None:
            raise RuleError("per_curve", self.per_curve, "its table is missing (load_bench reads the file into it)")
        if self.phy == "gr-zmq-iq":
            self._check_air()
        if self.downlink.over_phy and self.phy != "gr-zmq-iq":
            raise RuleError(
                "downlink.over_phy", True, f"only phy gr-zmq-iq has a downlink PHY (this bench's is {self.phy})"
            )
        if self.phy == "replay" and self.replay.trace is None:
            raise RuleError("replay.trace", None, "phy replay needs a recorded link trace (<run dir>/link_trace.jsonl)")
        if self.phy == "rf" and self.rf.sample_rate_hz < self.radio.total_bandwidth_hz:
            raise RuleError(
                "rf.sample_rate_hz",
                self.rf.sample_rate_hz,
                f"must be >= radio.total_bandwidth_hz ({self.radio.total_bandwidth_hz:g})",
            )
        return self

    def _check_air(self) -> None:
        air = self.air
        for key in ("address", "medium"):
            value = getattr(air, key)
            if not value.startswith(ZMQ_SCHEMES):
                raise RuleError(f"air.{key}", value, "expected a zmq address (tcp://host:port, ipc://path)")
        if air.address == air.medium and not air.address.endswith(":0"):
            raise RuleError("air.medium", air.medium, "must differ from air.address")
        max_cfo_hz = self.radio.total_bandwidth_hz / 2000
        if air.max_cfo_hz > max_cfo_hz:
            raise RuleError(
                "air.max_cfo_hz",
                air.max_cfo_hz,
                f"expected within [0, radio.total_bandwidth_hz / 2000] = [0, {max_cfo_hz:g}] Hz "
                "(the subband filters' margin)",
            )

"""Predicted cost of every option a device has in a round: bytes, airtime, delivery, energy, latency.

Vectorised over the option grid (module x modulation x keep fraction x power x bandwidth share), so a policy
can weigh thousands of options for a thousand devices in well under a training step. The formulas are the
ones in docs/controller.md ("Link and cost model").
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from config import BenchConfig, CodecConfig
from fedlora.lora import layer_index
from fedlora.sparsify import BOnlySparsifier, n_keep, sparsifier_from_config
from fedlora.sparsify.base import ComponentSparsifier
from phy.channel import PerCurve
from proto.codec import component_axis, encoded_size
from proto.framing import frame_overhead_bytes
from proto.numerology import MODULATION_NAMES, packet_airtime_s


@dataclass(frozen=True)
class UpdateEncoding:
    """What the experiment's codec config makes an edge send: the value dtype and which parts go on the air."""

    dtype: str  # the values' width on the air ("fp16" / "fp32"), as the sparsifier hands it to the codec
    component_coded: bool  # every LoRA module sends n_keep(keep_fraction, rank) components and a kept mask
    zero_lora_a: bool  # b_only: every lora_A delta is zero and travels as its shape only

    @classmethod
    def from_codec(cls, codec: CodecConfig) -> UpdateEncoding:
        """Ask the sparsifier the edges build from this config (fedlora.sparsify.sparsifier_from_config)."""
        sparsifier = sparsifier_from_config(codec, seed=0, device_id=0)
        return cls(
            sparsifier.dtype, isinstance(sparsifier, ComponentSparsifier), isinstance(sparsifier, BOnlySparsifier)
        )


@dataclass(frozen=True)
class ModelShape:
    """What an update's size depends on: the global adapter's tensors (key, shape at the max rank) and its layers.

    A device's (rank, depth) update holds the LoRA tensors of the top `depth` layers cut to `rank` components,
    plus the head (fedlora.lora.GlobalAdapter.view), encoded by proto.codec: the size comes from the codec."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    num_layers: int

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], num_layers: int) -> ModelShape:
        """From the global adapter's key -> shape (proto.codec.expected_shapes(adapter.state))."""
        for key in shapes:
            layer = layer_index(key)  # ValueError for a LoRA key outside a numbered layer
            if layer is not None and not 0 <= layer < num_layers:
                raise ValueError(f"{key}: layer {layer} outside the model's {num_layers} layers")
        return cls(tuple((k, tuple(int(d) for d in s)) for k, s in shapes.items()), num_layers)

    def view_shapes(self, rank: int, depth: int) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of a (rank, depth) update."""
        first = self.num_layers - depth
        out: dict[str, tuple[int, ...]] = {}
        for key, shape in self.shapes:
            layer = layer_index(key)
            if layer is not None and layer < first:
                continue
            axis = component_axis(key)
            out[key] = shape if axis is None else shape[:axis] + (rank,) + shape[axis + 1 :]
        return out

    def update_bytes(self, rank: int, depth: int, keep_fraction: float, encoding: UpdateEncoding) -> int:
        """Bytes of the encoded update (proto.codec.encoded_size, exact for the uncompressed codec the edges use)."""
        shapes = self.view_shapes(rank, depth)
        kept = n_keep(keep_fraction, rank) if encoding.component_coded else None
        zero = [k for k in shapes if k.endswith(".lora_A")] if encoding.zero_lora_a else []
        return encoded_size(shapes, dtype=encoding.dtype, kept=kept, zero_keys=zero)


@dataclass
class OptionGrid:
    """The options every device has, as flat arrays of length O (same for all devices)."""

    rank: np.ndarray
    depth: np.ndarray
    modulation: np.ndarray  # index into `modulations`
    keep: np.ndarray
    power_dbm: np.ndarray
    share: np.ndarray
    info: np.ndarray  # (1 − λ_d(1 − d/L)) · (1 − λ_r(1 − r/R) − λ_s(1 − s))
    frames: np.ndarray
    frame_airtime_s: np.ndarray
    modulations: tuple[str, ...]
    share_levels: np.ndarray  # the share grid; option o has share level o % len(share_levels)
    link: np.ndarray  # option -> index of its (modulation, power, share) link setting
    link_modulation: np.ndarray
    link_power_dbm: np.ndarray
    link_share: np.ndarray


@dataclass
class Predictions:
    """Per device (rows) and option (columns)."""

    delivery: np.ndarray  # ρ: probability the whole update arrives within the ARQ attempts
    airtime_s: np.ndarray
    energy_j: np.ndarray
    latency_s: np.ndarray


class CostModel:
    def __init__(
        self,
        bench: BenchConfig,
        per_curve: PerCurve,
        shape: ModelShape,
        max_rank: int,
        loss_weights: tuple[float, float, float],
        *,
        codec: CodecConfig,
    ):
        self.bench, self.per_curve, self.shape, self.max_rank = bench, per_curve, shape, max_rank
        self.encoding = UpdateEncoding.from_codec(codec)
        self.view_encoding = UpdateEncoding(codec.downlink_dtype, component_coded=False, zero_lora_a=False)
        self._view_frames_cache: np.ndarray | None = None
        self.loss_weights = loss_weights
        self.frame_payload = bench.radio.frame_payload_bytes
        self.frame_bytes = self.frame_payload + frame_overhead_bytes(bench.security.mode == "sealed")
        ch = bench.channel
        self.noise_psd_dbm_hz = ch.noise_psd_dbm_hz + ch.noise_figure_db
        self._per_tables = {m: np.array(per_curve.points(m)).T for m in per_curve.modulations if m in MODULATION_NAMES}

    def per_table_span_db(self, modulation: str) -> tuple[float, float]:
        """SNR (dB) of the PER table's first and last point: below it `per` is its floor, above it exactly 0."""
        snr, _ = self._per_tables[modulation]
        return float(snr[0]), float(snr[-1])

    def per(self, snr_db: np.ndarray, modulation: str, frame_bytes: int | None = None) -> np.ndarray:
        """PER of a frame of frame_bytes (None: the uplink's frames) at snr_db."""
        snr, per_ref = self._per_tables[modulation]
        p = np.interp(snr_db, snr, per_ref, left=1.0, right=0.0)
        ratio = (frame_bytes or self.frame_bytes) / self.per_curve.ref_frame_bytes
        return -np.expm1(ratio * np.log1p(-np.minimum(p, 1 - 1e-12)))

    @property
    def downlink_frame_bytes(self) -> int:
        return self.frame_payload + frame_overhead_bytes(False)  # downlink frames are not sealed

    @property
    def downlink_frame_s(self) -> float:
        """Airtime of one full downlink frame (padding included) at the BS's modulation over the whole band."""
        return packet_airtime_s(
            self.downlink_frame_bytes, self.bench.downlink.modulation, self.bench.radio.total_bandwidth_hz
        )

    def downlink_wait_s(self, gain_db: np.ndarray, fading_db: np.ndarray, num_layers: int) -> np.ndarray:
        """(K, L + 1): seconds of downlink airtime until device k holds a depth-d view of the largest rank, where the
        bench sends views over the PHY (else 0): the view's frames at the BS's power, modulation and the whole band,
        times the expected transmissions per frame at that device's downlink SNR (averaged over fading_db, (K, J)).
        Depth 0 (not taking part) needs no view. The largest rank bounds every rank's view from above."""
        wait = np.zeros((len(gain_db), num_layers + 1))
        if not self.bench.downlink_over_phy:
            return wait
        dl, band_hz = self.bench.downlink, self.bench.radio.total_bandwidth_hz
        snr = dl.tx_power_dbm + gain_db[:, None] + fading_db - (self.noise_psd_dbm_hz + 10 * np.log10(band_hz))
        per = self.per(snr, dl.modulation, self.downlink_frame_bytes)
        tx_per_frame = (1 / (1 - np.minimum(per, 0.99))).mean(axis=1)  # (K,)
        wait[:, 1:] = self._view_frames(num_layers)[None, :] * self.downlink_frame_s * tx_per_frame[:, None]
        return wait

    def _view_frames(self, num_layers: int) -> np.ndarray:
        """Frames of the largest-rank view at depth 1 .. num_layers (the codec's exact size; computed once: the
        model's shape and the frame size never change)."""
        if self._view_frames_cache is None or len(self._view_frames_cache) != num_layers:
            self._view_frames_cache = np.array(
                [
                    -(-self.shape.update_bytes(self.max_rank, d, 1.0, self.view_encoding) // self.frame_payload)
                    for d in range(1, num_layers + 1)
                ],
                dtype=float,
            )
        return self._view_frames_cache

    def grid(
        self,
        modules: list[tuple[int, int]],
        modulations: list[str],
        keeps: list[float],
        powers_dbm: np.ndarray,
        shares: np.ndarray,
    ) -> OptionGrid:
        lam_r, lam_d, lam_s = self.loss_weights
        mods = tuple(m for m in modulations if m in self._per_tables)
        idx = np.array(
            list(
                itertools.product(
                    range(len(modules)), range(len(mods)), range(len(keeps)), range(len(powers_dbm)), range(len(shares))
                )
            ),
            dtype=np.int64,
        )
        rank = np.array([m[0] for m in modules], dtype=float)[idx[:, 0]]
        depth = np.array([m[1] for m in modules], dtype=float)[idx[:, 0]]
        keep = np.asarray(keeps, dtype=float)[idx[:, 2]]
        share = np.asarray(shares, dtype=float)[idx[:, 4]]
        nbytes = np.array(
            [[self.shape.update_bytes(r, d, k, self.encoding) for k in keeps] for r, d in modules], dtype=float
        )
        frames = np.ceil(nbytes[idx[:, 0], idx[:, 2]] / self.frame_payload)
        per_hz = np.array([packet_airtime_s(self.frame_bytes, m, 1.0) for m in mods])  # padding included
        # depth multiplies: the layers a module does not hold get nothing from this device this round
        info = (1 - lam_d * (1 - depth / self.shape.num_layers)) * (
            1 - lam_r * (1 - rank / self.max_rank) - lam_s * (1 - keep)
        )
        # the link (modulation, power, share) decides SNR and PER; modules and keep fractions only reuse it
        n_p, n_s = len(powers_dbm), len(shares)
        link = (idx[:, 1] * n_p + idx[:, 3]) * n_s + idx[:, 4]
        link_mod, link_power, link_share = np.unravel_index(np.arange(len(mods) * n_p * n_s), (len(mods), n_p, n_s))
        return OptionGrid(
            rank=rank,
            depth=depth,
            modulation=idx[:, 1],
            keep=keep,
            power_dbm=np.asarray(powers_dbm, dtype=float)[idx[:, 3]],
            share=share,
            info=info,
            frames=frames,
            frame_airtime_s=per_hz[idx[:, 1]] / (share * self.bench.radio.total_bandwidth_hz),
            modulations=mods,
            share_levels=np.asarray(shares, dtype=float),
            link=link,
            link_modulation=link_mod,
            link_power_dbm=np.asarray(powers_dbm, dtype=float)[link_power],
            link_share=np.asarray(shares, dtype=float)[link_share],
        )

    def predict(
        self,
        grid: OptionGrid,
        *,
        gain_db: np.ndarray,
        cpu_s: np.ndarray,
        wall_s: np.ndarray,
        watts_per_core: np.ndarray,
        fading_db: np.ndarray | None = None,
    ) -> Predictions:
        """gain_db, watts_per_core: (K,); cpu_s, wall_s: (K, O) compute of each option's module.

        fading_db: (K, J) equally likely offsets of the round's channel around gain_db (block fading: one draw
        for the whole update, so ARQ cannot retry its way out of a fade); delivery and airtime are averaged
        over them. None: the channel is exactly gain_db."""
        radio, arq = self.bench.radio, self.bench.arq
        if fading_db is None:
            fading_db = np.zeros((len(gain_db), 1))
        noise = self.noise_psd_dbm_hz + 10 * np.log10(grid.link_share * radio.total_bandwidth_hz)
        snr = (
            grid.link_power_dbm[None, :, None] + gain_db[:, None, None] + fading_db[:, None, :] - noise[None, :, None]
        )  # (K, links, J)
        link_per = np.empty_like(snr)
        for q, name in enumerate(grid.modulations):
            sel = grid.link_modulation == q
            link_per[:, sel] = self.per(snr[:, sel], name)
        # per node: expected transmissions per frame, and the chance that all n frames get through within A
        # attempts each; averaged over the nodes per link setting and per distinct frame count (never K x O x J)
        tx_per_frame = (1 / (1 - np.minimum(link_per, 0.99))).mean(axis=2)  # (K, links)
        with np.errstate(divide="ignore"):  # a frame that never gets through: log 0 = -inf, exp(-inf) = 0
            log_frame_ok = np.log1p(-(link_per**arq.max_attempts))
        counts, count_of_option = np.unique(grid.frames, return_inverse=True)  # frames >= 1 (the head)
        lossy = (log_frame_ok < 0).any(axis=2)  # (K, links); elsewhere every node delivers for sure
        lossy_log = log_frame_ok[lossy]  # (M, J)
        link_delivery = np.ones((len(counts),) + lossy.shape)  # (counts, K, links)
        for c, n in enumerate(counts):
            link_delivery[c][lossy] = np.exp(n * lossy_log).mean(axis=1)
        airtime = (grid.frames * grid.frame_airtime_s)[None, :] * tx_per_frame[:, grid.link]
        delivery = link_delivery[count_of_option, :, grid.link].T  # (K, O)
        tx_w = 10 ** (grid.power_dbm / 10) / 1000
        energy = watts_per_core[:, None] * cpu_s + (tx_w / radio.pa_efficiency + radio.radio_on_power_w) * airtime
        return Predictions(delivery=delivery, airtime_s=airtime, energy_j=energy, latency_s=wall_s + airtime)

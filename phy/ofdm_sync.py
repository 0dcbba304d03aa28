"""Timing and fine frequency synchronisation of the OFDM receiver: Schmidl & Cox, from stock GNU Radio blocks."""

from __future__ import annotations

from gnuradio import blocks, filter, gr

from phy import ofdm

# Schmidl & Cox timing: plateau threshold and smoothing of the metric (see SchmidlCoxSync). The stock 0.9 is
# above the metric's peak (SNR / (1 + SNR))^2 below ~12 dB, so packets that would decode are never detected;
# 0.55 detects ~88 % of preambles at 7 dB and 97 % at 8 dB (1000-byte BPSK). Lower is not free: every trigger
# retunes the mixer, and a false plateau inside a payload destroys that packet. The highest one seen, in a
# 13 dB BPSK payload (1 in ~16k packets of a calibration sweep), peaked at 0.60 raw and 0.50 after smoothing
# over 17 samples; offline, 50 M payload samples (BPSK/QPSK, 10-30 dB) never exceeded 0.4 after smoothing.
SYNC_THRESHOLD = 0.55
SYNC_SMOOTH_LEN = 17


class SchmidlCoxSync(gr.hier_block2):
    """``digital.ofdm_sync_sc_cfb`` rebuilt from stock blocks, with a longer plateau window and a smoothed metric.

    Outputs: 0 = fine frequency offset (angle of the half-symbol correlation,
    held from the last trigger; the caller mixes with 2/fft_len per unit),
    1 = trigger (1 at the middle of each plateau of the timing metric).

    Why not the stock block: it builds ``plateau_detector_fb(max_len=cp_len)``,
    and that detector only handles plateaus shorter than 2 * max_len (32
    samples) deterministically; a longer one that straddles the end of the
    input buffer is cut and its "middle" lands early, where the correlation
    window is mostly gap, so the held frequency estimate is off by up to ~3 %
    of a subcarrier. After a quiet gap (zero padding, or just noise at high
    SNR) the metric already rises while the correlation window is still partly
    in the gap, so below a threshold of ~0.8 the plateau is longer than 32
    samples (~45 at 0.5): measured as a
    ~23 dB error floor on a third of 16QAM packets at 30 dB, varying from run
    to run with the scheduler's buffer boundaries. max_len = fft_len gives
    128 samples of room at the same cost.

    Third change: the metric is averaged over ``smooth_len`` samples first. At
    10-12 dB the rising edge of a preamble's plateau sometimes crossed the
    threshold briefly before the plateau proper; that fragment triggered ~15
    samples early (header fails), and the detector's hold-off (max_len) then
    hid the real plateau: 0.2 % of QPSK packets missed at 10-12 dB without
    smoothing, 0 of 3000 with it. Smoothing also flattens the rare false
    plateaus inside payloads (see SYNC_THRESHOLD). Triggers come
    ``delay_samples`` later, which the receiver adds to its data delay.

    Every trigger also re-samples the frequency estimate that the mixer applies
    from then on, even one inside a payload the demux is busy with: a false
    plateau in the middle of a packet destroys that packet. BPSK payloads made
    such plateaus (~1 per 2 M samples at threshold 0.5, because OFDM symbols
    with real-valued carriers are conjugate-symmetric in time); phy.ofdm
    rotates every data carrier by a fixed phase to break that symmetry.

    ``buffer_items`` > 0 sets every internal block's output buffer (items). A block writes at most half its output
    buffer per call (GNU Radio's default buffer holds 64 KiB: 4096 complex samples a call), and every call costs
    thread hand-offs, which is where most of a flowgraph's CPU goes here (docs/pitfalls.md §12).
    """

    def __init__(
        self,
        fft_len: int = ofdm.FFT_LEN,
        threshold: float = SYNC_THRESHOLD,
        plateau_max_len: int = ofdm.FFT_LEN,
        smooth_len: int = SYNC_SMOOTH_LEN,
        use_even_carriers: bool = False,
        buffer_items: int = 0,
    ) -> None:
        gr.hier_block2.__init__(
            self,
            "schmidl_cox_sync",
            gr.io_signature(1, 1, gr.sizeof_gr_complex),
            gr.io_signature2(2, 2, gr.sizeof_float, gr.sizeof_char),
        )
        if smooth_len < 1 or smooth_len % 2 == 0:
            raise ValueError("smooth_len must be odd and >= 1")
        # The smoothed metric (and so the trigger) lags the raw one by this much; the receiver delays its data
        # path by as much, and the frequency estimate is taken this much earlier, at the raw plateau's middle.
        self.delay_samples = (smooth_len - 1) // 2
        half = fft_len // 2
        delay = blocks.delay(gr.sizeof_gr_complex, half)
        conjugate = blocks.conjugate_cc()
        correlate = blocks.multiply_cc()
        # FIR sums as in the stock block, not moving_average: a running float32 sum keeps a rounding residue of
        # ~1e-6 of the last packet's energy, which in a quiet gap at > ~55 dB SNR outweighs the noise and makes
        # the metric random there (false triggers that retuned the mixer over a packet's last symbol).
        corr_sum = filter.fir_filter_ccf(1, [1.0 if use_even_carriers else -1.0] * half)  # odd carriers: -1
        corr_power = blocks.complex_to_mag_squared()
        metric = blocks.divide_ff()
        energy = blocks.complex_to_mag_squared()
        energy_sum = filter.fir_filter_fff(1, [0.5] * fft_len)
        energy_square = blocks.multiply_ff()
        no_nan = blocks.add_const_ff(1e-20)  # exact zeros (noise-free gaps) would give 0/0 = NaN, which a
        # moving average's running sum would carry for thousands of samples
        smooth = blocks.moving_average_ff(smooth_len, 1.0 / smooth_len, 4000)
        angle = blocks.complex_to_arg()
        angle_delay = blocks.delay(gr.sizeof_float, self.delay_samples)
        hold = blocks.sample_and_hold_ff()
        self.plateau = blocks.plateau_detector_fb(plateau_max_len, threshold)

        self.blocks = {
            "delay": delay,
            "conjugate": conjugate,
            "correlate": correlate,
            "corr_sum": corr_sum,
            "corr_power": corr_power,
            "metric": metric,
            "energy": energy,
            "energy_sum": energy_sum,
            "energy_square": energy_square,
            "no_nan": no_nan,
            "smooth": smooth,
            "angle": angle,
            "angle_delay": angle_delay,
            "hold": hold,
            "plateau": self.plateau,
        }
        if buffer_items > 0:  # a block processes at most half its output buffer per call: bigger means fewer calls
            for block in self.blocks.values():
                block.set_min_output_buffer(0, buffer_items)
        self.connect(self, delay, conjugate, (correlate, 1))
        self.connect(self, (correlate, 0))
        self.connect(correlate, corr_sum, corr_power, (metric, 0))
        self.connect(self, energy, energy_sum, (energy_square, 0))
        self.connect(energy_sum, (energy_square, 1))
        self.connect(energy_square, no_nan, (metric, 1))
        self.connect(corr_sum, angle, angle_delay, (hold, 0))
        self.connect(metric, smooth, self.plateau, (hold, 1))
        self.connect(hold, (self, 0))
        self.connect(self.plateau, (self, 1))

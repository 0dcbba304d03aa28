"""The options that can still win a round, predicted exactly and only those (docs/controller.md, "How the solver
is made fast").

`CostModel.predict` prices every (device, option), K x 5,400 at the defaults, with an `exp` per fade node, frame
count and link. Most of them can never be chosen: an option is taken only when its price c − λ·v is negative
(sitting out costs 0) and λ never exceeds λ_max = V·|Φ'(0)|, so an option with c ≥ λ_max·v is dead all round.
The live ones are found with bounds that need no transcendental function per option, then predicted with the
same floating-point operations as `CostModel.predict`, so the solver sees the same numbers:

1. per (device, link), the extreme fade nodes tell whether every node is above the PER table (PER exactly 0),
   below it (PER at its floor) or in between; only links in between evaluate the curve per node;
2. per (device, depth, link), the option with the fewest airtime units is the cheapest there (cost grows with
   airtime), and ω·(best info at that depth)·(delivery bound) caps every value there: a link without a live
   depth is dropped before its delivery (the `exp` per frame count) is computed;
3. the live links' options get their exact cost and value; dead ones, and those outside the energy guard or the
   policy's mask, are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bs_node.controllers.costs import CostModel, OptionGrid
from bs_node.controllers.link_table import LinkTable

TIE_BREAK = 1e-3  # ε of the objective: the cheaper of two options the objective cannot tell apart


@dataclass(frozen=True)
class GridIndex:
    """The option grid's layout, worked out once per grid.

    Every link (modulation, power, share) offers the same modules x keep fractions, in the same order: the
    columns. An option is a (link, column) pair; its airtime units are the column's frames times the link's
    packet airtime, the product CostModel.predict forms."""

    options_of_link: np.ndarray  # (links, columns) option index, ascending along a row
    links_by_level: np.ndarray  # links ordered by (share level, link): live options come out grouped by level
    column_frames: np.ndarray  # (columns,)
    column_depth: np.ndarray  # (columns,) module depth
    column_shallowest: np.ndarray  # (columns,) bool: the smallest depth (the probe's module)
    column_count: np.ndarray  # (columns,) index into counts
    column_info: np.ndarray  # (columns,)
    counts: np.ndarray  # distinct frame counts, as CostModel.predict finds them
    link_packet_s: np.ndarray  # (links,) one packet's airtime
    link_tx_factor: np.ndarray  # (links,) tx_w / η + P_on: watts drawn per second on the air
    depth_values: np.ndarray  # distinct module depths, ascending
    units_min_s: np.ndarray  # (depths, links) fewest airtime units of an option at that depth and link
    units_max_s: np.ndarray  # (depths, links) most
    noise_dbm: np.ndarray  # (links,)
    span_lo_db: np.ndarray  # (links,) the PER table's SNR span for the link's modulation
    span_hi_db: np.ndarray


def index_grid(costs: CostModel, grid: OptionGrid) -> GridIndex:
    """Everything the live-option search needs from the grid alone (cache it with the grid)."""
    radio = costs.bench.radio
    n_links = len(grid.link_share)
    options_of_link = np.argsort(grid.link, kind="stable").reshape(n_links, -1)
    column = options_of_link[0]
    for field in (grid.rank, grid.depth, grid.keep):  # the product grid: one column pattern for every link
        assert np.array_equal(field[options_of_link], np.broadcast_to(field[column], options_of_link.shape))
    links = np.arange(n_links)
    depth_values = np.unique(grid.depth)
    counts, count_slot = np.unique(grid.frames, return_inverse=True)
    units = grid.frames * grid.frame_airtime_s  # the same product CostModel.predict forms
    tx_w = 10 ** (grid.power_dbm / 10) / 1000
    tx_factor = tx_w / radio.pa_efficiency + radio.radio_on_power_w
    at_depth = grid.depth[options_of_link][None, :, :] == depth_values[:, None, None]
    link_units = units[options_of_link][None, :, :]
    spans = np.array([costs.per_table_span_db(m) for m in grid.modulations])[grid.link_modulation]
    return GridIndex(
        options_of_link=options_of_link,
        links_by_level=links[np.argsort(links % len(grid.share_levels), kind="stable")],
        column_frames=grid.frames[column],
        column_depth=grid.depth[column].astype(int),
        column_shallowest=grid.depth[column] == depth_values[0],
        column_count=count_slot[column],
        column_info=grid.info[column],
        counts=counts,
        link_packet_s=grid.frame_airtime_s[options_of_link[:, 0]],
        link_tx_factor=tx_factor[options_of_link[:, 0]],
        depth_values=depth_values.astype(int),
        units_min_s=np.where(at_depth, link_units, np.inf).min(axis=2),
        units_max_s=np.where(at_depth, link_units, -np.inf).max(axis=2),
        noise_dbm=costs.noise_psd_dbm_hz + 10 * np.log10(grid.link_share * radio.total_bandwidth_hz),
        span_lo_db=spans[:, 0],
        span_hi_db=spans[:, 1],
    )


@dataclass(frozen=True)
class DeviceInputs:
    """The round's estimates per device (K rows), as the solver weighs them."""

    gain_db: np.ndarray  # planning gain
    fading_db: np.ndarray  # (K, J) equally likely offsets of the round's gain
    cpu_s: np.ndarray  # (K, L + 1) CPU-seconds of a module of each depth
    wall_s: np.ndarray  # (K, L + 1)
    watts_per_core: np.ndarray
    weights: np.ndarray  # data weights, mean 1
    budgets_j: np.ndarray  # inf: no budget
    price: np.ndarray  # energy queue + energy price, per budget spent
    energy_cap_j: np.ndarray  # (1 − margin) × allowance: the energy guard (inf: none)
    probe: np.ndarray  # never measured, with a finite allowance: its cheapest depth is always allowed


@dataclass(frozen=True)
class Candidates:
    """The live options, one row each, grouped by (device, share level) in ascending order of the group."""

    device: np.ndarray  # row of the device in DeviceInputs
    option: np.ndarray  # option index in the grid
    group: np.ndarray  # device × share levels + share level
    cost: np.ndarray  # (Q + κ_E) E/Ē + ε (E/Ē + T/T̄)
    value: np.ndarray  # ω ρ info: the option's expected share of S
    latency_s: np.ndarray
    energy_j: np.ndarray
    delivery: np.ndarray
    t_ref_s: float  # T̄, or the slowest device's quickest option
    fastest_s: np.ndarray  # (K,) each device's quickest option, live or not
    slowest_s: float  # the slowest option of any device (nan unless asked for)


def live_options(
    costs: CostModel,
    grid: OptionGrid,
    gi: GridIndex,
    dev: DeviceInputs,
    *,
    lambda_max: float,
    latency_budget_s: float | None,
    option_mask: Callable[[np.ndarray], np.ndarray] | None = None,
    need_slowest: bool = False,
) -> Candidates:
    """The options some λ ≤ lambda_max could pick, with their exact cost, value, latency, energy and delivery.

    option_mask: the policy's (K, O) mask of allowed options from the (K, O) latency of every option (None:
    every option; only a policy with few options should ask, the table is K x O). The round's reference scales
    (T̄ from every device's quickest option, Ē of a device without a budget from its cheapest) cover all
    options, live or not."""
    links = LinkTable(costs, grid, gi.noise_dbm, (gi.span_lo_db, gi.span_hi_db), gi.counts, dev.gain_db, dev.fading_db)
    K = len(dev.gain_db)
    wall_d = dev.wall_s[:, gi.depth_values]
    # every device's quickest option, and (without a budget) its cheapest: (K, depths, links), fewest units
    air = gi.units_min_s[None, :, :] * links.txpf[:, None, :]
    fastest = (wall_d[:, :, None] + air).reshape(K, -1).min(axis=1)
    t_ref = latency_budget_s or max(float(fastest.max()), 1e-6)
    e_ref = dev.budgets_j.copy()
    free = np.flatnonzero(~np.isfinite(dev.budgets_j))
    if len(free):
        cpu_d = dev.cpu_s[free][:, gi.depth_values]
        energy = (dev.watts_per_core[free, None] * cpu_d)[:, :, None] + gi.link_tx_factor[None, None, :] * air[free]
        e_ref[free] = np.maximum(energy.reshape(len(free), -1).min(axis=1), 1e-6)
    slowest = np.nan
    if need_slowest:
        slowest = float((wall_d[:, :, None] + gi.units_max_s[None, :, :] * links.txpf[:, None, :]).max())
    per_budget = dev.price / e_ref
    # a link lives if its cheapest conceivable option (shallowest depth, fewest units) costs less than λ_max × the
    # most any of its options could be worth (best info, delivery bound)
    fewest = links.txpf * gi.units_min_s.min(axis=0)[None, :]
    low_energy = (dev.watts_per_core * dev.cpu_s[:, gi.depth_values[0]])[:, None] + gi.link_tx_factor * fewest
    low_latency = wall_d[:, :1] + fewest
    low_cost = per_budget[:, None] * low_energy + TIE_BREAK * (low_energy / e_ref[:, None] + low_latency / t_ref)
    cap = links.delivery_cap_at(int(gi.column_count.min()))  # the fewest frames deliver most
    value_cap = (dev.weights[:, None] * cap) * gi.column_info.max()
    pair_k, pair_j = np.nonzero((lambda_max * value_cap >= low_cost)[:, gi.links_by_level])
    pair_l = gi.links_by_level[pair_j]
    # their options, (pairs, columns): exact energy, latency and cost first (no delivery needed)
    airtime = (gi.column_frames[None, :] * gi.link_packet_s[pair_l][:, None]) * links.txpf[pair_k, pair_l][:, None]
    compute_j = (dev.watts_per_core[:, None] * dev.cpu_s[:, gi.column_depth])[pair_k]
    energy_j = compute_j + gi.link_tx_factor[pair_l][:, None] * airtime
    latency_s = dev.wall_s[:, gi.column_depth][pair_k] + airtime
    k_col = pair_k[:, None]
    cost = per_budget[k_col] * energy_j + TIE_BREAK * (energy_j / e_ref[k_col] + latency_s / t_ref)
    keep = (energy_j <= dev.energy_cap_j[k_col]) | (dev.probe[k_col] & gi.column_shallowest[None, :])
    if option_mask is not None:
        every = dev.wall_s[:, grid.depth.astype(int)] + (grid.frames * grid.frame_airtime_s) * links.txpf[:, grid.link]
        keep &= option_mask(every)[k_col, gi.options_of_link[pair_l]]
    # then the delivery bound, and the exact delivery only where the bound leaves the option alive
    info = gi.column_info[None, :]
    cap = links.delivery_cap(pair_k, pair_l, np.arange(len(gi.counts)))[:, gi.column_count]
    keep &= lambda_max * ((dev.weights[k_col] * cap) * info) >= cost
    asked = np.zeros((len(pair_k), len(gi.counts)), dtype=bool)
    kept_pair, kept_column = np.nonzero(keep)
    asked[kept_pair, gi.column_count[kept_column]] = True
    delivery = links.delivery(pair_k, pair_l, asked)[:, gi.column_count]
    value = (dev.weights[k_col] * delivery) * info
    pair, column = np.nonzero(keep & (lambda_max * value >= cost))
    device = pair_k[pair]
    option = gi.options_of_link[pair_l[pair], column]
    return Candidates(
        device=device,
        option=option,
        group=device * len(grid.share_levels) + option % len(grid.share_levels),
        cost=cost[pair, column],
        value=value[pair, column],
        latency_s=latency_s[pair, column],
        energy_j=energy_j[pair, column],
        delivery=delivery[pair, column],
        t_ref_s=t_ref,
        fastest_s=fastest,
        slowest_s=slowest,
    )

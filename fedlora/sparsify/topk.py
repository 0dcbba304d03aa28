"""Magnitude top-k with error feedback, component-granular.

Score of component i: ||v_A[i, :]||^2 + ||v_B[:, i]||^2 with v = delta + residual (the raw magnitude of
what would be sent; no orthogonality, no regulariser).  Keep the top ceil(keep_fraction * r) per module,
carry the rest (rule in ``fedlora.sparsify.base``).

Why whole components and not elements: classic top-k picks single entries, which would need an
index-coded codec (a position per value, ~2-4 extra bytes each) and breaks the A/B pairing, so the
BS could not aggregate per component.  That codec is out of scope.  Choosing whole components lets the
baseline travel in the same codec and aggregation as SOFT, so at equal keep_fraction both send exactly
the same number of bytes and differ only in *which* components they pick: the fair comparison.
"""

from __future__ import annotations

import torch

from fedlora.sparsify.base import Candidate, ComponentSparsifier
from fedlora.sparsify.soft import top_indices


def magnitude_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of squares of row i of A plus column i of B."""
    return a.pow(2).sum(1) + b.pow(2).sum(0)


class TopKSparsifier(ComponentSparsifier):
    name = "topk"

    def choose(self, cand: Candidate, k: int, round_idx: int) -> torch.Tensor:
        return top_indices(magnitude_scores(cand.a, cand.b), k)

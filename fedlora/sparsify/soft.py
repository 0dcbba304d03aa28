"""SOFT: Sparsified Orthogonal Fine-Tuning (Kim & Choi, arXiv 2505.00333), as implemented here.

Regulariser (added to the local loss).  For every live peft LoRA module with A in R^{r x n}, B in R^{m x r},
G_A = A A^T, G_B = B^T B (r x r), offdiag(G) = G - diag(diag(G)):

    normalize=False:  R(model) = lambda * sum_modules ( ||offdiag(G_A)||_F^2 + ||offdiag(G_B)||_F^2 )
    normalize=True :  R(model) = lambda * sum_modules ( ||offdiag(G_A)||_F^2 / ||diag(G_A)||_2^2
                                                       + ||offdiag(G_B)||_F^2 / ||diag(G_B)||_2^2 )   (default)

Only cross-component inner products a_i.a_j and b_i.b_j (i != j) are penalised, never the norms ||a_i||,
||b_i||: the norms carry the importance that the score reads, and a penalty towards unit norm would flatten
every score to 1.  The plain form is quartic in the factor scale, so it hardly acts on B, which starts at 0
and stays small: measured on MiniLM (rank 8, 6 layers, 40 local steps), lambda = 0.1 left B's Gram matrix
with ||offdiag|| / ||diag|| = 0.89 and the score 28 % off the true singular values; the normalised form at
lambda = 0.1 gave 0.03 and 1.3 % (plain needs lambda ~ 10 for 0.05 / 1.9 %).  Normalised is scale-free,
so one lambda fits every width, rank and training stage; it is exactly 0 in the same cases as the plain one.

Score.  With B's columns mutually orthogonal and A's rows mutually orthogonal, B A = sum_i b_i a_i^T is
already an SVD up to normalisation, so sigma_i(B A) = ||b_i|| * ||a_i||.  Keeping the components with the
largest ||b_i|| ||a_i|| is then a truncated SVD of B A obtained from r(m + n) multiply-adds: no B A
product (m x n) and no SVD.

Which factors are scored (``score=``):

* ``"trained"`` (default): the device's *virtual* adapter, trained + residual = view + delta + residual,
  i.e. what its adapter would be had every earlier update been delivered in full.  This is the per-rank
  norm metric of the SOFT abstract applied to the LoRA factors; it keeps the top singular directions of
  the adapter.  The residual is included so that a withheld component is scored by what it would be,
  not by the stale value the BS still holds (otherwise a component never sent stays small in the view
  and can never win).  Consequence: the selection is the top-k of the ideal adapter, so a component
  whose singular value stays below the top k is parked in the residual until keep_fraction rises.
* ``"update"``: the size of the change this round would make to component i's rank-1 term,
  ||b~_i a~_i^T - b_i a_i^T||_F with (b, a) the view and (b~, a~) = view + delta + residual, computed
  from norms and two dot products (still no product, no SVD).  When the rank-1 changes are mutually
  orthogonal in the Frobenius inner product (exactly so with orthogonal factors when the view's B is 0,
  approximately when the factors stay near-orthogonal and rotate little) this choice minimises
  ||dW - dW_sent||_F: classic error-feedback top-k in the space of the effective weight, and every
  component's residual is eventually sent.  On the first round (B of the view is 0) both scores coincide.

Not chosen: ||delta_b_i|| * ||delta_a_i|| (product of the *delta* norms).  The change of a component's
term is db a^T + b da^T + db da^T; the delta-norm product keeps only the second-order term and is ~0
whenever A barely moves (the usual case: B starts at 0 and A is the slow factor).

Selection and error feedback: keep the top ceil(keep_fraction * r) components per module (>= 1 when
keep_fraction > 0; ties go to the lower index), the rest of delta + residual becomes the new residual
(rule across module switches in ``fedlora.sparsify.base``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from fedlora.sparsify.base import Candidate, ComponentSparsifier, Regularizer

Score = Literal["trained", "update"]
SCORES = ("trained", "update")


def component_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||b_i|| * ||a_i|| for A (r, n), B (m, r): the singular values of B A when the factors are orthogonal."""
    return b.norm(dim=0) * a.norm(dim=1)


def update_scores(a_new: torch.Tensor, b_new: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor) -> torch.Tensor:
    """||b'_i a'_i^T - b_i a_i^T||_F for every component i, without forming any m x n matrix.

    ||u v^T - x y^T||^2 = |u|^2 |v|^2 + |x|^2 |y|^2 - 2 (u.x)(v.y)."""
    nb, na = b_new.pow(2).sum(0), a_new.pow(2).sum(1)
    ob, oa = b_old.pow(2).sum(0), a_old.pow(2).sum(1)
    cross = (b_new * b_old).sum(0) * (a_new * a_old).sum(1)
    return (nb * na + ob * oa - 2 * cross).clamp_min(0).sqrt()


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores; equal scores go to the lower index (deterministic)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k]


def lora_factors(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weights of every active peft LoRA layer of ``model`` (adapter "default")."""
    for mod in model.modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if isinstance(la, torch.nn.ModuleDict) and isinstance(lb, torch.nn.ModuleDict) and "default" in la:
            a, b = la["default"].weight, lb["default"].weight
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            yield a, b


_EPS = 1e-12


def _offdiag_sq(gram: torch.Tensor, normalize: bool) -> torch.Tensor:
    diag = torch.diagonal(gram)
    off = (gram - torch.diag_embed(diag)).pow(2).sum()
    return off / (diag.pow(2).sum() + _EPS) if normalize else off


def orthogonality_penalty(model: torch.nn.Module, normalize: bool = False) -> torch.Tensor:
    """sum_modules ||offdiag(A A^T)||_F^2 + ||offdiag(B^T B)||_F^2 over the live LoRA parameters (no lambda).

    ``normalize=True`` divides each term by ||diag(G)||_F^2 (sum of the squared component norms^2), which
    makes it scale-free: the plain form is quartic in the factor scale, so it barely acts on B, which
    starts at 0 and stays small (measured on MiniLM: see docs/soft.md)."""
    total: torch.Tensor | None = None
    for a, b in lora_factors(model):
        term = _offdiag_sq(a @ a.T, normalize) + _offdiag_sq(b.T @ b, normalize)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonality_penalty: the model has no peft LoRA layers (lora_A['default'])")
    return total


class SoftSparsifier(ComponentSparsifier):
    """SOFT: orthogonality regulariser + top components by ||b_i|| ||a_i||, with error feedback."""

    name = "soft"

    def __init__(
        self,
        dtype: str = "fp16",
        lam: float = 0.1,
        score: Score = "trained",
        error_feedback: bool = True,
        normalize: bool = True,
    ):
        super().__init__(dtype, error_feedback)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < float("inf"):
            raise ValueError(f"soft: lam (orthogonality weight) must be a finite number >= 0, got {lam!r}")
        if score not in SCORES:
            raise ValueError(f"soft: score must be one of {list(SCORES)}, got {score!r}")
        self.lam = float(lam)
        self.score = score
        self.normalize = bool(normalize)

    def regularizer(self) -> Regularizer | None:
        if self.lam == 0:
            return None
        lam, normalize = self.lam, self.normalize

        def soft_orthogonality(model: torch.nn.Module) -> torch.Tensor:
            return lam * orthogonality_penalty(model, normalize)

        return soft_orthogonality

    def scores(self, cand: Candidate) -> torch.Tensor:
        new_a, new_b = cand.view_a + cand.a, cand.view_b + cand.b  # trained + residual
        if self.score == "trained":
            return component_scores(new_a, new_b)
        return update_scores(new_a, new_b, cand.view_a, cand.view_b)

    def choose(self, cand: Candidate, k: int, round_idx: int) -> torch.Tensor:
        return top_indices(self.scores(cand), k)

    def __repr__(self) -> str:
        return (
            f"SoftSparsifier(dtype={self.dtype!r}, lam={self.lam}, score={self.score!r}, "
            f"normalize={self.normalize}, error_feedback={self.error_feedback})"
        )

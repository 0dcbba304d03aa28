"""Random-k components with error feedback: the 'no information' control for SOFT and top-k.

The k components of each module are a uniform random subset drawn from a generator seeded by
(seed, device_id, round, module path) -- reproducible, different per device, round and module, and
independent of the order in which modules are visited.  ``round`` is the ``round_idx`` passed to
``sparsify`` or, if none is given, the number of earlier ``sparsify`` calls.  No rescaling by r/k:
with error feedback the unsent part is delivered later instead of being estimated now.
"""

from __future__ import annotations

import hashlib

import torch

from fedlora.sparsify.base import Candidate, ComponentSparsifier


class RandomKSparsifier(ComponentSparsifier):
    name = "randomk"

    def __init__(self, dtype: str = "fp16", seed: int = 0, device_id: int = 0, error_feedback: bool = True):
        super().__init__(dtype, error_feedback)
        self.seed = int(seed)
        self.device_id = int(device_id)

    def _generator(self, path: str, round_idx: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}/{self.device_id}/{round_idx}/{path}".encode(), digest_size=8)
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "big") >> 1)

    def choose(self, cand: Candidate, k: int, round_idx: int) -> torch.Tensor:
        r = cand.a.shape[0]
        return torch.randperm(r, generator=self._generator(cand.path, round_idx))[:k]

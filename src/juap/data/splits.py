"""The paper's split protocol: seeded random, disjoint subsets (e.g. 20% train and 20% test)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import torch

from ..errors import ConfigError
from ..runtime.io import write_json


def split_indices(n: int, *, fractions: Sequence[float], seed: int) -> List[List[int]]:
    """Disjoint random subsets of ``range(n)``, one per fraction, from one seeded permutation.

    Args:
        n: number of samples.
        fractions: e.g. ``(0.2, 0.2)`` for the paper's train and test subsets; their sum must be <= 1.
        seed: the permutation's seed; the same (n, fractions, seed) always gives the same subsets.

    Returns:
        One sorted index list per fraction.
    """
    if any(f <= 0 or f > 1 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ConfigError(
            f"split fractions must each be in (0, 1] and sum to at most 1, got {list(fractions)}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for f in fractions:
        k = min(max(1, int(round(f * n))), n - start)  # rounding up never takes more than there is
        if k < 1:
            raise ConfigError(f"{n} samples are too few for split fractions {list(fractions)}")
        out.append(sorted(perm[start : start + k]))
        start += k
    return out


def save_split(path: str | os.PathLike, split: Dict[str, object]) -> None:
    """Write the chosen indices (and how they were chosen) so a run can be repeated exactly."""
    write_json(path, split)


def load_split(path: str | os.PathLike) -> Dict[str, object]:
    with open(path) as f:
        return json.load(f)

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


def split_groups(groups: Sequence[str], *, fractions: Sequence[float], seed: int) -> List[List[int]]:
    """Disjoint subsets of ``range(len(groups))`` that keep each group whole (the crops of one photo), one
    per fraction and a last one with the rest: the groups, in a seeded random order, fill each part as close
    to its fraction of the images as whole groups allow.

    Args:
        groups: the group of every sample.
        fractions: the shares of the first parts; their sum must be < 1 (the last part takes the rest).
        seed: the order's seed.

    Returns:
        ``len(fractions) + 1`` sorted index lists. A ConfigError when there are too few groups to give
        every part one.
    """
    names = sorted(set(groups))
    if len(names) < len(fractions) + 1:
        raise ConfigError(
            f"{len(names)} groups of images (e.g. source photos) are too few for {len(fractions) + 1} parts "
            "that keep each group whole: add images from more sources"
        )
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
    members: Dict[str, List[int]] = {name: [] for name in names}
    for i, g in enumerate(groups):
        members[g].append(i)
    n_parts = len(fractions) + 1
    chosen: List[List[str]] = [[] for _ in range(n_parts)]
    sizes, k = [0] * n_parts, 0
    for j, name in enumerate(order):
        left = len(order) - j  # groups not placed yet, this one included
        # the next part once this group would take this one further past its share than it is short of
        # it, or once every later part needs one of the groups left
        while k < n_parts - 1 and sizes[k]:
            full = sizes[k] + len(members[name]) / 2 > fractions[k] * len(groups)
            if not (full or left <= n_parts - 1 - k):
                break
            k += 1
        chosen[k].append(name)
        sizes[k] += len(members[name])
    return [sorted(i for name in part for i in members[name]) for part in chosen]

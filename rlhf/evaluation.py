"""Pairwise evaluation of any reward provider on preference pairs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from rewards.base import RewardProvider
from rlhf.core import pairwise_accuracy, preference_ece
from rlhf.data import PreferencePair


def score_pairs(provider: RewardProvider, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected, valid), each (N,): both sides scored through the provider."""
    prompts = [p.prompt for p in pairs]
    chosen = provider.score(prompts, [p.chosen for p in pairs])
    rejected = provider.score(prompts, [p.rejected for p in pairs])
    return chosen.rewards, rejected.rewards, chosen.valid & rejected.valid


def pair_metrics(margins: torch.Tensor) -> dict[str, float]:
    """accuracy (ties half), mean margin r_c − r_r, and ECE of σ(r_c − r_r)."""
    return {
        "pairs": int(margins.numel()),
        "accuracy": float(pairwise_accuracy(margins)),
        "mean_margin": float(margins.mean()),
        "ece": float(preference_ece(margins)),
    }


def evaluate_pairs(provider: RewardProvider, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Metrics over all pairs and per subset. Pairs the provider could not judge on either side
    are left out of the metrics and counted as `invalid`."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    r_c, r_r, valid = score_pairs(provider, pairs)
    margins = r_c - r_r
    overall = pair_metrics(margins[valid]) if valid.any() else {"pairs": 0}
    result: dict[str, Any] = {"all": {**overall, "invalid": int((~valid).sum())}}
    by_subset: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        if p.subset is not None and valid[i]:
            by_subset[p.subset].append(i)
    for subset, idx in sorted(by_subset.items()):
        result[subset] = pair_metrics(margins[idx])
    return result

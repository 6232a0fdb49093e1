"""Evaluation statistics of reward scores. Pure torch."""

from __future__ import annotations

import torch


def pairwise_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly, ties counting half.

    margins: (N,) r(x, y_c) − r(x, y_r). Returns a scalar: mean(1[m > 0] + ½·1[m = 0]).
    """
    if margins.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    m = margins.float()
    return ((m > 0).float() + 0.5 * (m == 0).float()).mean()

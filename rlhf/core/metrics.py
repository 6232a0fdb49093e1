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


def preference_ece(margins: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """Expected calibration error of the BT preference probability p = σ(r_c − r_r).

    Read as a binary classifier that predicts "chosen ≻ rejected" when p > ½: its confidence is
    c = max(p, 1 − p) ∈ [½, 1] and it is right when p > ½ (a tie, p = ½, counts half, as in
    `pairwise_accuracy`). With equal-width bins B_k over [½, 1]:

        ECE = Σ_k (|B_k| / N) · | mean_{i∈B_k} correct_i − mean_{i∈B_k} c_i |

    (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3). margins: (N,).
    Returns a scalar in [0, ½].
    """
    if margins.numel() == 0:
        raise ValueError("preference_ece needs at least one pair")
    p = torch.sigmoid(margins.float())
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float() + 0.5 * (p == 0.5).float()
    # Bin index over [0.5, 1]; confidence exactly 1 goes to the last bin.
    idx = ((conf - 0.5) * 2 * n_bins).long().clamp(0, n_bins - 1)
    ece = torch.zeros((), dtype=torch.float32)
    for k in range(n_bins):
        in_bin = idx == k
        if in_bin.any():
            ece = ece + in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return ece

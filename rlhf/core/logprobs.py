"""Token log-probabilities from logits. Pure torch: no models, no I/O."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(a_t | s_t) of the given tokens.

    logits: (B, T, V) scores for the token at each position; labels: (B, T) token ids.
    Returns (B, T) float32: log_softmax(logits / temperature)[b, t, labels[b, t]].

    The temperature must be the one used for sampling: the sampling distribution is
    softmax(logits / τ), so log-probs of the sampled tokens must be computed from the same
    scaled logits (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", detail 4).
    Computed as gather(logits) − logsumexp(logits) in float32, which avoids materialising the
    (B, T, V) log-softmax tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Σ_t values·mask along `dim`. values, mask: same shape; mask is bool or {0,1}."""
    return (values * mask.to(values.dtype)).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set (over all elements when dim is None)."""
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return (values * m).sum(dim) / m.sum(dim).clamp_min(1.0)

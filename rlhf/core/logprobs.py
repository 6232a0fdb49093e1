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
    Computed as gather(logits) − logsumexp(logits) in float32, a block of rows at a time
    (`token_logprobs_and_entropy`).
    """
    return token_logprobs_and_entropy(logits, labels, temperature, with_entropy=False)[0]


# Bytes per float32 block of rows. On the CPU, 8 MiB stays under glibc's 32 MiB mmap threshold,
# so the block's buffer comes back from the heap instead of as fresh pages that fault in on
# every operation, and stays in cache across the block's operations (docs/performance.md). On a
# GPU, small blocks only add kernel launches: a block there holds up to 256 MiB.
BLOCK_BYTES = {"cpu": 8 * 1024 * 1024}
GPU_BLOCK_BYTES = 256 * 1024 * 1024


def _block_rows(V: int, device: torch.device) -> int:
    return max(1, BLOCK_BYTES.get(device.type, GPU_BLOCK_BYTES) // (4 * V))


def _scaled(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """block / τ in float32 (float64 stays float64), as a new tensor, never a view of the logits."""
    z = block.to(torch.promote_types(block.dtype, torch.float32), copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


class _TokenLogprobs(torch.autograd.Function):
    """gather − logsumexp of logits / τ, and optionally the entropy (no gradient), block by block.
    Saves only the logits (already alive as the LM head's output) and the per-row logsumexp;
    the backward recomputes softmax block by block: d logits = (onehot − softmax(z)) · g / τ."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy):
        V = logits.shape[-1]
        flat, lab = logits.reshape(-1, V), labels.reshape(-1, 1)
        n = flat.shape[0]
        logp = torch.empty(n, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        rows = _block_rows(V, logits.device)
        for s in range(0, n, rows):
            z = _scaled(flat[s : s + rows], temperature)
            torch.logsumexp(z, dim=-1, out=lse[s : s + rows])
            logp[s : s + rows] = z.gather(-1, lab[s : s + rows]).squeeze(-1) - lse[s : s + rows]
            if with_entropy:  # H = −Σ p·log p with log p = z − lse
                z.sub_(lse[s : s + rows, None])
                ent[s : s + rows] = -torch.linalg.vecdot(z.exp(), z)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        if ent is None:
            return logp.view(labels.shape), None
        ent = ent.view(labels.shape)
        ctx.mark_non_differentiable(ent)
        return logp.view(labels.shape), ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        logits, labels, lse = ctx.saved_tensors
        tau = ctx.temperature
        V = logits.shape[-1]
        flat, lab, g = logits.reshape(-1, V), labels.reshape(-1, 1), grad_logp.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(flat)
        rows = _block_rows(V, logits.device)
        for s in range(0, flat.shape[0], rows):
            z = _scaled(flat[s : s + rows], tau)
            z.sub_(lse[s : s + rows, None]).exp_().mul_(g[s : s + rows].neg())  # −softmax · g
            z.scatter_add_(-1, lab[s : s + rows], g[s : s + rows])  # + onehot · g
            if tau != 1.0:
                z.div_(tau)
            grad[s : s + rows] = z
        return grad.view_as(logits), None, None, None


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` and, with `with_entropy`, the entropy H = −Σ_a p(a) log p(a) of
    softmax(logits / τ) at each position, a metric without gradient: each (B, T) float32.

    One pass over the (B, T, V) logits a block of rows at a time. No float32 copy of the
    whole logits tensor is made, forward or backward: the backward recomputes the softmax of
    each block from the logits and the saved logsumexp."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    if logits.requires_grad and torch.is_grad_enabled():
        return _TokenLogprobs.apply(logits, labels, float(temperature), with_entropy)
    with torch.no_grad():
        return _TokenLogprobs.forward(_NoCtx(), logits, labels, float(temperature), with_entropy)


class _NoCtx:
    """Stands in for autograd's ctx when no gradient is needed."""

    def save_for_backward(self, *_: torch.Tensor) -> None:
        pass

    def mark_non_differentiable(self, *_: torch.Tensor) -> None:
        pass


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Σ_t values·mask along `dim`. values, mask: same shape; mask is bool or {0,1}."""
    return (values * mask.to(values.dtype)).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set (over all elements when dim is None)."""
    m = mask.to(values.dtype)
    if dim is None:
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return (values * m).sum(dim) / m.sum(dim).clamp_min(1.0)

"""PPO for language models: KL penalty, advantages, clipped losses. Pure torch.

Shapes: B sequences, T completion tokens. `mask` (B, T) is 1 on real completion tokens (up to
and including the first EOS) and 0 on padding; every reduction is over masked tokens only.
Nothing here mutates its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhf.core.logprobs import masked_mean

KLEstimator = Literal["k1", "k2", "k3"]


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked elements (Bessel-corrected when `unbiased`)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1.0)
    var = (((x - mean) ** 2) * m).sum() / n.clamp_min(1.0)
    if unbiased:
        if n < 2:
            raise ValueError("an unbiased variance needs at least two masked elements")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over masked elements; with shift_mean=False the mean is added
    back (scale only), as done for rewards in Ziegler et al. 2019. Masked-out entries are 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    out = (x - mean) * torch.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020,
    "Approximating KL Divergence"). With r = log π(a|s) − log π_ref(a|s):

        k1 = r                      unbiased, can be negative per token
        k2 = ½ r²                   biased, ≥ 0, low variance
        k3 = (e^{−r} − 1) + r       unbiased, ≥ 0, low variance

    logp, ref_logp: (B, T). Returns (B, T).
    """
    r = logp - ref_logp
    if kind == "k1":
        return r
    if kind == "k2":
        return 0.5 * r.pow(2)
    if kind == "k3":
        return torch.expm1(-r) + r
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The RLHF reward per token (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):

        r_t = −β · kl_t            for every completion token t
        r_T += score               at the last real token T

    score: (B,) the reward model's scalar; kl: (B, T) a per-token KL estimate; mask: (B, T).
    Returns (B, T), zero on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & (m > 0)  # one-hot at the last real token
    return rewards + last.to(kl.dtype) * score.unsqueeze(-1).to(kl.dtype)


def _check_right_padded(mask: torch.Tensor) -> None:
    """Raise ValueError unless every row of `mask` (B, T) is 1s then 0s: a completion mask has no
    hole (a 0 followed later by a 1), which GAE would treat as the end of the episode."""
    rises = mask[:, 1:] > mask[:, :-1]  # a 0 → 1 step: a row with a hole has one
    if bool(rises.any()):
        row, t = (int(i) for i in rises.nonzero()[0])
        raise ValueError(
            f"mask row {row} has a hole: {mask[row, t].item():g} at position {t}, then "
            f"{mask[row, t + 1].item():g} at {t + 1}; a completion mask must be 1s then 0s (right-padded)"
        )


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), the plain backward loop:

        δ_t = r_t + γ V_{t+1} − V_t        (V past the last real token is 0)
        A_t = δ_t + γλ A_{t+1}
        R_t = A_t + V_t                    (the value target)

    rewards, values, mask: (B, T), completions right-padded: each row of the mask is 1s then 0s
    (a row with a hole, a 0 before a 1, raises ValueError). Returns (advantages, returns), each
    (B, T) and zero on padding. Kept as the reference for `gae`.
    """
    _check_right_padded(mask)
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as `gae_loop`, vectorised: A = δ · Dᵀ with D[t, k] = (γλ)^{k−t} for k ≥ t, else 0.
    O(T²) memory in the (T, T) discount matrix, which is small for completion lengths. The sum
    runs to the end of the row, so it equals the loop only on right-padded masks (1s then 0s);
    a mask with a hole raises ValueError, as in `gae_loop`."""
    _check_right_padded(mask)
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    next_v = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = (rewards + gamma * next_v - values) * m  # (B, T)
    T = rewards.shape[1]
    t = torch.arange(T, device=rewards.device, dtype=values.dtype)
    exponent = t.unsqueeze(0) - t.unsqueeze(1)  # [t, k] = k − t
    discount = torch.where(exponent >= 0, (gamma * lam) ** exponent.clamp_min(0), torch.zeros_like(exponent))
    adv = (delta @ discount.T) * m
    return adv, (adv + values) * m


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # scalar: share of tokens whose ratio was clipped
    approx_kl: torch.Tensor  # scalar: k3 estimate of KL(π_old ‖ π) on these tokens


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ρ_t = exp(log π(a_t|s_t) − log π_old(a_t|s_t))
        L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    All inputs (B, T); advantages are treated as constants. Mean over masked tokens.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (as in OpenAI baselines' ppo2; Huang et al. 2024, detail on
    value clipping):

        V_clip = V_old + clip(V − V_old, −ε, ε)
        L_V = ½ · mean_t max((V − R)², (V_clip − R)²)

    Returns (loss, clip_fraction)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clip_fraction


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over masked tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse."""
    var_r = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_r.clamp_min(1e-12)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_a p(a) log p(a) per position: (…, V) → (…)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: move β towards a target KL.

        e = clip(KL_observed / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    n_steps is the number of samples (episodes) since the last update. The only state is β, so a
    checkpoint stores `value`."""

    value: float
    target: float
    horizon: int

    def update(self, observed_kl: float, n_steps: int) -> float:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def ppo_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    value_clip: float,
    vf_coef: float,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective of one (micro-)batch and its statistics.

    L = L^CLIP_π + c_V · L^CLIP_V   (Schulman et al. 2017, eq. 9, without an entropy bonus, as
    in Ouyang et al. 2022): `ppo_policy_loss` plus `vf_coef` times `clipped_value_loss`. The two
    terms touch disjoint parameters (policy vs critic), so a caller may backpropagate them
    apart; given detached `values`, the loss's gradient is the policy term's alone.

    logprobs, values: (B, T) log π_θ(a_t|s_t) and V_φ(s_t); old_*: the same under θ_old, φ_old;
    advantages, returns: (B, T) Â_t (whitened) and R_t; mask: (B, T) completion tokens;
    entropy: (B, T) H(π_θ(·|s_t)), a statistic only. Returns (loss, stats), the stats as
    detached scalars: `loss/policy`, `loss/value`, `policy/clip_fraction`, `policy/approx_kl`,
    `value/clip_fraction`, `value/explained_variance` (of V_old against R) and, with `entropy`,
    `policy/entropy`."""
    pg = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip)
    vf, vf_clipped = clipped_value_loss(values, old_values, returns, mask, value_clip)
    stats = {
        "loss/policy": pg.loss.detach(),
        "loss/value": vf.detach(),
        "policy/clip_fraction": pg.clip_fraction.detach(),
        "policy/approx_kl": pg.approx_kl.detach(),
        "value/clip_fraction": vf_clipped.detach(),
        "value/explained_variance": explained_variance(old_values, returns, mask).detach(),
    }
    if entropy is not None:
        stats["policy/entropy"] = masked_mean(entropy.detach().float(), mask)
    return pg.loss + vf_coef * vf, stats

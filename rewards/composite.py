"""Providers made of providers: a weighted sum, and an ensemble with a conservative aggregate.

Composites take providers that are already built; building members from config is the
registry's job (`rewards.registry` holds their configs, and `build_provider` recurses), so this
module never imports a concrete provider and a composite can hold any provider, including
another composite.

Both composites report every member's reward in `extras["{i}:{name}/reward"]` and pass each
member's own extras through as `extras["{i}:{name}/{key}"]`; the index prefix keeps two
members of the same kind (say two `bt` models) apart.

A sample is valid only where every member is valid: a member that could not judge leaves
the combination undefined, and silently treating it as 0 would bias the sum (or the min).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch

from rewards.base import RewardProvider, RewardResult
from rlhf.data import Prompt

Aggregate = Literal["mean", "min", "mean_minus_std"]


def check_ensemble(n: int, aggregate: str, k: float, error: type[Exception]) -> None:
    if n < 1:
        raise error("ensemble reward needs at least one member")
    if aggregate not in _AGGREGATES:
        raise error(f"ensemble aggregate must be one of {', '.join(_AGGREGATES)}, got {aggregate!r}")
    if aggregate == "mean_minus_std" and n < 2:
        raise error(f"ensemble aggregate 'mean_minus_std' needs at least 2 members (the std of one is 0), got {n}")
    if not k >= 0:  # also rejects NaN
        raise error(f"ensemble k must be >= 0, got {k}")


# ---------------------------------------------------------------------------- providers


def _member_names(members: Sequence[RewardProvider]) -> list[str]:
    """'{i}:{name}': unique even when two members share a name, and stable across runs."""
    return [f"{i}:{m.name}" for i, m in enumerate(members)]


def _score_members(
    names: list[str], members: Sequence[RewardProvider], prompts: Sequence[Prompt], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[Any]]]:
    """Score with every member → rewards (M, B), valid (M, B), and the prefixed extras."""
    results = [m.score(prompts, completions) for m in members]
    extras: dict[str, list[Any]] = {}
    for name, res in zip(names, results):
        if len(res.rewards) != len(completions):
            raise ValueError(f"member '{name}' returned {len(res.rewards)} rewards for {len(completions)} completions")
        extras[f"{name}/reward"] = [r if v else None for r, v in zip(res.rewards.tolist(), res.valid.tolist())]
        for key, values in res.extras.items():
            extras[f"{name}/{key}"] = values
    rewards = torch.stack([r.rewards for r in results])  # (M, B)
    valid = torch.stack([r.valid for r in results])  # (M, B)
    return rewards, valid, extras


class SumReward(RewardProvider):
    """r(x, y) = Σ_i w_i r_i(x, y); valid where every member is valid.

    Use it to add shaping terms to a learned reward, e.g. a BT model plus a length penalty:
    `SumReward([(1.0, bt), (-0.01, FunctionReward(length))])`.
    """

    name = "sum"

    def __init__(self, terms: Sequence[tuple[float, RewardProvider]]):
        if not terms:
            raise ValueError("SumReward needs at least one (weight, provider) term")
        self.weights = torch.tensor([float(w) for w, _ in terms], dtype=torch.float32)  # (M,)
        if not torch.isfinite(self.weights).all():
            raise ValueError(f"SumReward weights must be finite, got {self.weights.tolist()}")
        self.members = [p for _, p in terms]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        rewards, valid, extras = _score_members(_member_names(self.members), self.members, prompts, completions)
        total = (self.weights[:, None] * rewards).sum(0)  # (B,); invalid members carry 0, never NaN
        return RewardResult(total, valid.all(0), extras)

    def close(self) -> None:
        for m in self.members:
            m.close()


def _mean(r: torch.Tensor, k: float) -> torch.Tensor:
    return r.mean(0)


def _min(r: torch.Tensor, k: float) -> torch.Tensor:
    return r.min(0).values


def _mean_minus_std(r: torch.Tensor, k: float) -> torch.Tensor:
    # Population std (correction=0, i.e. unbiased=False): with the 2-5 members an ensemble
    # usually has, the unbiased estimate would inflate the penalty by sqrt(M/(M-1)).
    return r.mean(0) - k * r.std(0, correction=0)


# The Literal is validated once (config or constructor) and mapped to its function here.
_AGGREGATES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "mean": _mean,
    "min": _min,
    "mean_minus_std": _mean_minus_std,
}


class EnsembleReward(RewardProvider):
    """One reward from M providers r_1..r_M, to make over-optimization of any one of them harder.

    aggregate (over members, per sample; R is the (M, B) matrix of member rewards):
      - "mean":            r = (1/M) Σ_i r_i
      - "min":             r = min_i r_i  (worst-case optimization, WCO)
      - "mean_minus_std":  r = mean_i r_i − k · std_i r_i, std the population std
                           sqrt((1/M) Σ_i (r_i − mean)²) (unbiased=False)

    Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743),
    show WCO and uncertainty-weighted optimization (UWO) curb overoptimization; note their UWO
    penalizes the intra-ensemble *variance*, r = mean − λ·var. We follow the issue and Eisenstein
    et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking" (arXiv:2312.09244), which aggregate with mean − k·std, so k is in reward units.

    Members should be on a common scale (e.g. normalized reward models): mixing scales makes
    min and std meaningless. Valid where every member is valid.
    """

    name = "ensemble"

    def __init__(self, members: Sequence[RewardProvider], aggregate: Aggregate = "mean", k: float = 1.0):
        check_ensemble(len(members), aggregate, k, ValueError)
        self.members = list(members)
        self.aggregate = aggregate
        self.k = float(k)
        self._aggregate_fn = _AGGREGATES[aggregate]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        rewards, valid, extras = _score_members(_member_names(self.members), self.members, prompts, completions)
        return RewardResult(self._aggregate_fn(rewards, self.k), valid.all(0), extras)

    def close(self) -> None:
        for m in self.members:
            m.close()

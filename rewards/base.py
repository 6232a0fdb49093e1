"""The one reward interface (DESIGN.md, "The one reward interface").

A provider scores a batch of (prompt, completion) texts and returns a `RewardResult`. Loops,
evaluation and the studies talk to providers only through `score`; they never look inside.
Providers take text, not token ids, so a reward model may use a tokenizer other than the
policy's.

A pairwise judge (GenRM) compares two completions of one prompt and returns a
`PreferenceResult`; `JudgeReward` turns it into a provider by comparing each completion with a
reference completion of the same prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhf.data import Prompt


def _checked_batch(name: str, values: torch.Tensor, valid: torch.Tensor, extras: dict[str, list[Any]], unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A provider's or judge's per-row output checked and normalised: `values` (B,) as float32 on
    the CPU, `valid` (B,) as bool, and every extra of length B."""
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(values.shape)}")
    values = values.detach().to(torch.float32).cpu()
    valid = valid.detach().to(torch.bool).cpu()
    if valid.shape != values.shape:
        raise ValueError(f"valid {tuple(valid.shape)} does not match {name} {tuple(values.shape)}")
    for key, entries in extras.items():
        if len(entries) != len(values):
            raise ValueError(f"extras['{key}'] has {len(entries)} entries for {len(values)} {unit}")
    return values, valid


@dataclass
class RewardResult:
    rewards: torch.Tensor  # (B,) float32 r(x, y); 0 where not valid
    valid: torch.Tensor  # (B,) bool: False where the provider could not judge
    extras: dict[str, list[Any]] = field(default_factory=dict)  # per-sample diagnostics, each of length B

    def __post_init__(self) -> None:
        self.rewards, self.valid = _checked_batch("rewards", self.rewards, self.valid, self.extras, "samples")
        # Invalid entries carry 0, never NaN, so that a masked sum can't be poisoned.
        self.rewards = torch.where(self.valid, self.rewards, torch.zeros_like(self.rewards))

    @property
    def invalid_fraction(self) -> float:
        return float((~self.valid).float().mean()) if len(self.valid) else 0.0

    @classmethod
    def from_values(cls, values: Sequence[float | None], extras: dict[str, list[Any]] | None = None) -> RewardResult:
        """From a list where None (or NaN/inf) marks a sample the provider could not judge."""
        raw = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
        valid = torch.isfinite(raw)
        return cls(torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0), valid, extras or {})


class RewardProvider(ABC):
    """Scores (prompt, completion) pairs. Subclasses implement `score`.

    Every provider is also a callable in TRL's `reward_funcs` form, so it can be handed to
    `GRPOTrainer` / `RLOOTrainer` unchanged: `provider(prompts=..., completions=..., **kw)`
    returns a list of floats with None where the sample could not be judged.
    """

    name: str = "reward"

    @abstractmethod
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        """prompts: B prompts (text or chat messages); completions: B completion texts."""

    def close(self) -> None:
        """Release resources (models, connections). Optional."""

    def shared_adapter(self) -> str | None:
        """The name of the frozen adapter this provider runs on the policy's shared base (given
        as `host` when it was built), or None where it runs models of its own."""
        return None

    # TRL integration -------------------------------------------------------------------
    @property
    def __name__(self) -> str:  # TRL logs each reward function under its __name__
        return self.name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        texts = [_completion_text(c) for c in completions]
        result = self.score([_as_prompt(p) for p in prompts], texts)
        return [float(r) if v else None for r, v in zip(result.rewards.tolist(), result.valid.tolist())]


def _completion_text(completion: Any) -> str:
    """TRL passes plain text, or (conversational data) a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(m["content"] for m in completion)
    raise TypeError(f"a completion must be text or a list of messages, got {type(completion).__name__}")


def _as_prompt(prompt: Any) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise TypeError(f"a prompt must be text or a list of messages, got {type(prompt).__name__}")


# ----------------------------------------------------------------------------------------------
# Pairwise judges
# ----------------------------------------------------------------------------------------------


@dataclass
class PreferenceResult:
    prob_first: torch.Tensor  # (B,) float32 P(first ≻ second); 0.5 where not valid
    valid: torch.Tensor  # (B,) bool: False where the judge could not answer
    extras: dict[str, list[Any]] = field(default_factory=dict)  # per-sample diagnostics (rationales, each order's P, verdict mass), each of length B

    def __post_init__(self) -> None:
        self.prob_first, self.valid = _checked_batch("prob_first", self.prob_first, self.valid, self.extras, "comparisons")
        bad = self.valid & ~((self.prob_first >= 0) & (self.prob_first <= 1))
        if bad.any():
            raise ValueError(f"prob_first must lie in [0, 1] where valid, got {self.prob_first[bad].tolist()[:3]}")
        # Invalid entries carry 0.5 (no preference), never NaN.
        self.prob_first = torch.where(self.valid, self.prob_first, torch.full_like(self.prob_first, 0.5))


class PairwiseJudge(ABC):
    """Compares two completions of the same prompt: P(first ≻ second) per row."""

    name: str = "judge"

    @abstractmethod
    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> PreferenceResult:
        """prompts: B prompts; first, second: B completions each. Returns P(first ≻ second)."""

    def close(self) -> None:
        """Release resources. Optional."""

    def shared_adapter(self) -> str | None:
        """As `RewardProvider.shared_adapter`: the frozen adapter this judge runs on a host's base."""
        return None


def log_odds(p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """r = log p − log(1 − p) with p clipped to [ε, 1 − ε], so that |r| ≤ log((1 − ε)/ε)
    (≈ 9.21 at ε = 1e-4): a judge's certainty can't become an unbounded reward. In float64, so
    that p near 1 keeps its resolution. p: (B,) → (B,) float32."""
    if not 0 < epsilon < 0.5:
        raise ValueError(f"epsilon must lie in (0, 0.5), got {epsilon}")
    q = p.double().clamp(epsilon, 1 - epsilon)
    return (torch.log(q) - torch.log1p(-q)).float()


class JudgeReward(RewardProvider):
    """A pairwise judge as a pointwise reward: r(x, y) = log p/(1 − p), p = P(y ≻ y_ref(x)), p
    clipped to [ε, 1 − ε] (`log_odds`). This is the reward a GenRM gives in RL against a fixed
    reference (Mahan et al. 2024; DESIGN.md "The one reward interface"): 0 when the judge can't
    tell y from the reference, positive when it prefers y.

    reference: maps B prompts to B reference completions (`rewards.references`: a field of the
    prompt data, or samples of the starting policy cached in the run directory). The loops
    never see it. A comparison the judge could not answer is an invalid sample."""

    def __init__(self, judge: PairwiseJudge, reference: Callable[[Sequence[Prompt]], list[str]], *, epsilon: float = 1e-4, name: str = "judge_reward") -> None:
        log_odds(torch.tensor([0.5]), epsilon)  # validates epsilon
        self.judge = judge
        self.reference = reference
        self.epsilon = epsilon
        self.name = name

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        refs = self.reference(prompts)
        if len(refs) != len(prompts):
            raise ValueError(f"the reference source gave {len(refs)} references for {len(prompts)} prompts")
        pref = self.judge.prefer(prompts, completions, refs)
        extras = dict(pref.extras) | {"prob_vs_reference": pref.prob_first.tolist()}
        return RewardResult(log_odds(pref.prob_first, self.epsilon), pref.valid, extras)

    def close(self) -> None:
        self.judge.close()

    def shared_adapter(self) -> str | None:
        return self.judge.shared_adapter()

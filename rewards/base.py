"""The one reward interface (DESIGN.md, "The one reward interface").

A provider scores a batch of (prompt, completion) texts and returns a `RewardResult`. Loops,
evaluation and the studies talk to providers only through `score`; they never look inside.
Providers take text, not token ids, so a reward model may use a tokenizer other than the
policy's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf.data import Prompt


@dataclass
class RewardResult:
    rewards: torch.Tensor  # (B,) float32 r(x, y); 0 where not valid
    valid: torch.Tensor  # (B,) bool: False where the provider could not judge
    extras: dict[str, list[Any]] = field(default_factory=dict)  # per-sample diagnostics, each of length B

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1:
            raise ValueError(f"rewards must have shape (B,), got {tuple(self.rewards.shape)}")
        self.rewards = self.rewards.detach().to(torch.float32).cpu()
        self.valid = self.valid.detach().to(torch.bool).cpu()
        if self.valid.shape != self.rewards.shape:
            raise ValueError(f"valid {tuple(self.valid.shape)} does not match rewards {tuple(self.rewards.shape)}")
        for key, values in self.extras.items():
            if len(values) != len(self.rewards):
                raise ValueError(f"extras['{key}'] has {len(values)} entries for {len(self.rewards)} samples")
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

"""Pure torch RL math: no I/O, no models. Every function documents its equation and shapes
and never mutates its inputs."""

from rlhf.core.logprobs import masked_mean, masked_sum, token_logprobs, token_logprobs_and_entropy
from rlhf.core.losses import bt_loss, grm_loss, grm_regularizer
from rlhf.core.metrics import pairwise_accuracy, preference_ece
from rlhf.core.ppo import (
    AdaptiveKLController,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    gae_loop,
    kl_penalty,
    masked_var,
    per_token_rewards,
    ppo_loss,
    ppo_policy_loss,
    whiten,
)
from rlhf.core.sequence import last_token_index, position_ids, truncate_after_eos

__all__ = [
    "AdaptiveKLController",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "gae_loop",
    "kl_penalty",
    "masked_var",
    "per_token_rewards",
    "ppo_loss",
    "ppo_policy_loss",
    "whiten",
    "bt_loss",
    "grm_loss",
    "grm_regularizer",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "pairwise_accuracy",
    "position_ids",
    "preference_ece",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "truncate_after_eos",
]

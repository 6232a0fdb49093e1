"""Pure torch RL math: no I/O, no models. Every function documents its equation and shapes
and never mutates its inputs."""

from rlhf.core.logprobs import masked_mean, masked_sum, token_logprobs
from rlhf.core.metrics import pairwise_accuracy
from rlhf.core.sequence import position_ids, truncate_after_eos

__all__ = ["masked_mean", "masked_sum", "pairwise_accuracy", "position_ids", "token_logprobs", "truncate_after_eos"]

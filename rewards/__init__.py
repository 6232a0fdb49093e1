"""Reward providers behind one interface (`RewardProvider.score -> RewardResult`).

Importing this package loads no model: providers that need one load it in their constructor,
reached through `build_provider`.
"""

from rewards.base import RewardProvider, RewardResult
from rewards.composite import EnsembleReward, SumReward
from rewards.function import FunctionReward
from rewards.registry import RewardConfig, build_provider

__all__ = [
    "RewardProvider",
    "RewardResult",
    "build_provider",
    "RewardConfig",
    "FunctionReward",
    "SumReward",
    "EnsembleReward",
]

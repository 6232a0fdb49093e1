"""The one place reward providers are built from config (DESIGN.md, "Providers are built from
config by name ... in one registry").

A reward spec is a mapping with a `type` key; `rlhf.config` parses the tagged union
`RewardConfig` by that key, strictly (unknown type → error suggesting the nearest one), and
`build_provider` looks the type up in `PROVIDERS`. Adding a provider kind is two lines: one
member of `RewardConfig`, one row of `PROVIDERS`. The import-time check below fails loudly if
the two disagree, rather than at the first run that uses the missing kind.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

from rewards.base import RewardProvider
from rewards.composite import Aggregate, EnsembleReward, SumReward, check_ensemble
from rewards.function import FunctionReward, FunctionRewardConfig
from rewards.reward_model import RewardModelProviderConfig, load_reward_model_provider
from rlhf.config import ConfigError, doc, from_dict, required

# The composites' configs hold reward specs of any kind, so they live beside the union that
# names every kind (`typing.get_type_hints`, and so rlhf.config, resolves "RewardConfig" here).


@dataclass(frozen=True)
class WeightedTerm:
    provider: RewardConfig = required("a reward spec: a mapping with a 'type' key (bt, grm, function, sum, ensemble)")
    weight: float = doc(1.0, "w_i in r = Σ_i w_i r_i")

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ConfigError(f"sum reward weight must be finite, got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class SumRewardConfig:
    type: Literal["sum"] = doc("sum", "weighted sum r = Σ_i w_i r_i of other providers")
    terms: tuple[WeightedTerm, ...] = required("the terms: a list of {provider: <spec>, weight: w}")
    name: str | None = doc(None, "name in logs; default 'sum'")

    def __post_init__(self) -> None:
        if not self.terms:
            raise ConfigError("sum reward needs at least one term")


@dataclass(frozen=True, kw_only=True)
class EnsembleRewardConfig:
    type: Literal["ensemble"] = doc("ensemble", "ensemble of providers scored with one aggregate")
    members: tuple[RewardConfig, ...] = required("the member specs (usually reward models trained with different seeds)")
    aggregate: Aggregate = doc("mean", "mean; min (worst case); mean_minus_std: mean − k·std (population std)")
    k: float = doc(1.0, "k in mean − k·std (only used by mean_minus_std)")
    name: str | None = doc(None, "name in logs; default 'ensemble'")

    def __post_init__(self) -> None:
        check_ensemble(len(self.members), self.aggregate, self.k, ConfigError)




RewardConfig = Union[RewardModelProviderConfig, FunctionRewardConfig, SumRewardConfig, EnsembleRewardConfig]
"""Any reward spec; the mapping's `type` key picks the member."""


def _build_sum(cfg: SumRewardConfig, host: Any = None) -> SumReward:
    return SumReward([(term.weight, build_provider(term.provider)) for term in cfg.terms])


def _build_ensemble(cfg: EnsembleRewardConfig, host: Any = None) -> EnsembleReward:
    return EnsembleReward([build_provider(m) for m in cfg.members], cfg.aggregate, cfg.k)


def _build_function(cfg: FunctionRewardConfig, host: Any = None) -> FunctionReward:
    return FunctionReward.from_config(cfg)


# Each builder takes the config and an optional host: a model whose shared base a provider may
# run on instead of loading its own (`ActorCritic`; only reward models use it).
PROVIDERS: dict[str, Callable[[Any, Any], RewardProvider]] = {
    "bt": load_reward_model_provider,
    "grm": load_reward_model_provider,
    "function": _build_function,
    "sum": _build_sum,
    "ensemble": _build_ensemble,
}


def _union_tags(union: Any) -> list[str]:
    """Every `type` tag of the union's members, duplicates kept (so they can be reported)."""
    tags: list[str] = []
    for member in typing.get_args(union):
        tag_tp = typing.get_type_hints(member)["type"]
        assert typing.get_origin(tag_tp) is Literal, f"{member.__name__}.type must be a Literal"
        tags.extend(typing.get_args(tag_tp))
    return tags


def _check_table() -> None:
    tags = _union_tags(RewardConfig)
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates or set(tags) != set(PROVIDERS):
        raise TypeError(
            f"rewards.registry is inconsistent: RewardConfig tags {sorted(tags)} vs PROVIDERS keys "
            f"{sorted(PROVIDERS)}" + (f"; tags claimed twice: {duplicates}" if duplicates else "")
        )


_check_table()


def build_provider(spec: RewardConfig | Mapping[str, Any] | RewardProvider, where: str = "reward spec", host: Any = None) -> RewardProvider:
    """Build the provider a spec describes; members of composites are built recursively.

    spec: a `RewardConfig` instance, a plain mapping (validated strictly against `RewardConfig`;
    errors name `where`), or an already built provider (returned as is, so Python callers can
    pass either). The provider's `name` (what TRL and our logs show) is the config's `name` if it
    has one, else the name the provider chose for itself (a function's __name__), else the type.
    host: a model that offers its shared base (`policies.actor_critic.ActorCritic`): a LoRA
    reward model trained on that base then runs as a frozen adapter on it, with no second copy
    (`RewardProvider.shared_adapter` says when that happened).
    """
    if isinstance(spec, RewardProvider):
        return spec
    if isinstance(spec, Mapping):
        cfg = from_dict(RewardConfig, dict(spec), where=where)
    elif isinstance(spec, typing.get_args(RewardConfig)):
        cfg = spec
    else:
        raise TypeError(f"{where}: expected a reward config, a mapping with a 'type' key, or a provider; got {type(spec).__name__}")
    provider = PROVIDERS[cfg.type](cfg, host)
    if getattr(cfg, "name", None):
        provider.name = cfg.name
    elif "name" not in vars(provider):
        provider.name = cfg.type
    return provider

"""The one place reward providers are built from config (DESIGN.md, "Providers are built from
config by name ... in one registry").

A reward spec is a mapping with a `type` key; `rlhf.config` parses the tagged union
`RewardConfig` by that key, strictly (unknown type → error suggesting the nearest one), and
`build_provider` looks the type up in `PROVIDERS`. Adding a provider kind is two lines: one
member of `RewardConfig`, one row of `PROVIDERS`. The import-time check below fails loudly if
the two disagree, rather than at the first run that uses the missing kind.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Callable, Literal, Union

from rewards import composite
from rewards.base import RewardProvider
from rewards.composite import EnsembleReward, EnsembleRewardConfig, SumReward, SumRewardConfig
from rewards.function import FunctionReward, FunctionRewardConfig
from rewards.reward_model import RewardModelProviderConfig, load_reward_model_provider
from rlhf.config import from_dict

RewardConfig = Union[RewardModelProviderConfig, FunctionRewardConfig, SumRewardConfig, EnsembleRewardConfig]
"""Any reward spec; the mapping's `type` key picks the member."""

# The composite configs contain RewardConfig and RewardConfig contains them: bind the name in
# composite.py's globals, where typing.get_type_hints (and so rlhf.config) looks it up.
composite.RewardConfig = RewardConfig  # type: ignore[attr-defined]


def _build_sum(cfg: SumRewardConfig) -> SumReward:
    return SumReward([(term.weight, build_provider(term.provider)) for term in cfg.terms])


def _build_ensemble(cfg: EnsembleRewardConfig) -> EnsembleReward:
    return EnsembleReward([build_provider(m) for m in cfg.members], cfg.aggregate, cfg.k)


PROVIDERS: dict[str, Callable[[Any], RewardProvider]] = {
    "bt": load_reward_model_provider,
    "grm": load_reward_model_provider,
    "function": FunctionReward.from_config,
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


def build_provider(spec: RewardConfig | Mapping[str, Any] | RewardProvider, where: str = "reward spec") -> RewardProvider:
    """Build the provider a spec describes; members of composites are built recursively.

    spec: a `RewardConfig` instance, a plain mapping (validated strictly against `RewardConfig`;
    errors name `where`), or an already built provider (returned as is, so Python callers can
    pass either). The provider's `name` (what TRL and our logs show) is the config's `name` if it
    has one, else the name the provider chose for itself (a function's __name__), else the type.
    """
    if isinstance(spec, RewardProvider):
        return spec
    if isinstance(spec, Mapping):
        cfg = from_dict(RewardConfig, dict(spec), where=where)
    elif isinstance(spec, typing.get_args(RewardConfig)):
        cfg = spec
    else:
        raise TypeError(f"{where}: expected a reward config, a mapping with a 'type' key, or a provider; got {type(spec).__name__}")
    provider = PROVIDERS[cfg.type](cfg)
    if getattr(cfg, "name", None):
        provider.name = cfg.name
    elif "name" not in vars(provider):
        provider.name = cfg.type
    return provider

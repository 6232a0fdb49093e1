"""The one place reward providers are built from config (DESIGN.md, "Providers are built from
config by name ... in one registry").

A reward spec is a mapping with a `type` key; `rlhf.config` parses the tagged union
`RewardConfig` by that key, strictly (unknown type → error suggesting the nearest one), and
`build_provider` looks the type up in `PROVIDERS`. Adding a provider kind is two lines: one
member of `RewardConfig`, one row of `PROVIDERS`. The import-time check below fails loudly if
the two disagree, rather than at the first run that uses the missing kind.

Known types: `bt`, `grm` (trained reward models), `genrm` (a judge LM comparing with a reference
completion), `drlaif` (a judge LM rating 1-10), `judge_reward` (a pairwise judge against
reference completions, every setting open), `function`, `sum`, `ensemble`. Pairwise judges
themselves (for best-of-N tournaments, say) are built by `build_judge`.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

from rewards.base import JudgeReward, PairwiseJudge, RewardProvider
from rewards.composite import Aggregate, EnsembleReward, SumReward, check_ensemble
from rewards.drlaif import DRLAIFConfig, build_drlaif
from rewards.function import FunctionReward, FunctionRewardConfig
from rewards.genrm import GenRMConfig, build_genrm
from rewards.references import FieldReferences, PolicyReferences
from rewards.reward_model import RewardModelProviderConfig, load_reward_model_provider
from rlhf.config import ConfigError, DataConfig, SamplingConfig, doc, from_dict, required

KNOWN_TYPES = "bt, grm, genrm, drlaif, judge_reward, function, sum, ensemble"

# The composites' configs hold reward specs of any kind, so they live beside the union that
# names every kind (`typing.get_type_hints`, and so rlhf.config, resolves "RewardConfig" here).


@dataclass(frozen=True)
class WeightedTerm:
    provider: RewardConfig = required(f"a reward spec: a mapping with a 'type' key ({KNOWN_TYPES})")
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


@dataclass(frozen=True, kw_only=True)
class JudgeRewardConfig:
    type: Literal["judge_reward"] = doc("judge_reward", "a pairwise judge as a reward: r = log p/(1 − p), p = P(completion ≻ a reference completion of its prompt), p clipped to [ε, 1 − ε]")
    judge: GenRMConfig = doc(GenRMConfig(), "the pairwise judge: a genrm spec (its `type` may be left out)")
    reference: Literal["policy", "field"] = doc("policy", "'policy': one completion per prompt sampled from the starting policy, cached in the run directory; 'field': a field of the rows of `reference_data`")
    reference_field: str = doc("chosen", "reference: field: 'chosen' (or 'rejected') of preference pairs, or any text field of the rows")
    reference_data: DataConfig | None = doc(None, "reference: field: the data file (give split: all to cover both training and evaluation prompts)")
    reference_sampling: SamplingConfig = doc(SamplingConfig(), "reference: policy: how the references are sampled (usually the PPO sampling settings)")
    reference_max_prompt_tokens: int | None = doc(None, "reference: policy: prompts keep their last this many tokens for sampling (usually PPO's max_prompt_tokens); null: whole prompts")
    epsilon: float = doc(1e-4, "ε: p is clipped to [ε, 1 − ε], so |r| ≤ log((1 − ε)/ε) (≈ 9.2 at 1e-4)")
    name: str | None = doc(None, "name in logs; default 'judge_reward'")

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < 0.5:
            raise ConfigError(f"judge_reward epsilon must lie in (0, 0.5), got {self.epsilon}")
        if self.reference == "field" and self.reference_data is None:
            raise ConfigError("judge_reward reference: field needs reference_data (the data file whose rows hold the references)")
        if not self.reference_field.strip():
            raise ConfigError("judge_reward reference_field must name a field of the rows")
        if self.reference_max_prompt_tokens is not None and self.reference_max_prompt_tokens < 1:
            raise ConfigError(f"judge_reward reference_max_prompt_tokens must be positive, got {self.reference_max_prompt_tokens}")


RewardConfig = Union[RewardModelProviderConfig, GenRMConfig, DRLAIFConfig, JudgeRewardConfig, FunctionRewardConfig, SumRewardConfig, EnsembleRewardConfig]
"""Any reward spec; the mapping's `type` key picks the member."""


def _build_sum(cfg: SumRewardConfig, host: Any = None, *, state_dir: str | Path | None = None) -> SumReward:
    return SumReward([(term.weight, build_provider(term.provider, state_dir=state_dir)) for term in cfg.terms])


def _build_ensemble(cfg: EnsembleRewardConfig, host: Any = None, *, state_dir: str | Path | None = None) -> EnsembleReward:
    return EnsembleReward([build_provider(m, state_dir=state_dir) for m in cfg.members], cfg.aggregate, cfg.k)


def _build_function(cfg: FunctionRewardConfig, host: Any = None) -> FunctionReward:
    return FunctionReward.from_config(cfg)


def _build_judge_reward(cfg: JudgeRewardConfig, host: Any = None, *, state_dir: str | Path | None = None) -> JudgeReward:
    if cfg.reference == "field":
        assert cfg.reference_data is not None  # JudgeRewardConfig checked it
        reference: Callable[..., list[str]] = FieldReferences(cfg.reference_data, cfg.reference_field)  # errors before any model loads
    elif host is None:
        raise ValueError("judge_reward (or genrm) with reference: policy: sampling references needs the policy: "
                         "use it in PPO, or give reference: field (with reference_data)")
    else:
        reference = PolicyReferences(host, cfg.reference_sampling, _references_file(state_dir, cfg), max_prompt_tokens=cfg.reference_max_prompt_tokens)
    return JudgeReward(build_genrm(cfg.judge, host), reference, epsilon=cfg.epsilon, name=cfg.name or "judge_reward")


def _references_file(state_dir: str | Path | None, cfg: JudgeRewardConfig) -> Path | None:
    """Where sampled references are kept: one file per way of sampling them, so that two judges
    sampling alike share their references and a changed setting never reuses old ones."""
    if state_dir is None:
        return None  # kept for this process only
    how = {"sampling": asdict(cfg.reference_sampling), "max_prompt_tokens": cfg.reference_max_prompt_tokens}
    digest = hashlib.sha256(json.dumps(how, sort_keys=True).encode()).hexdigest()[:10]
    return Path(state_dir) / f"judge_references-{digest}.jsonl"


def _build_genrm(cfg: GenRMConfig, host: Any = None, *, state_dir: str | Path | None = None) -> JudgeReward:
    # As a reward, a genrm spec is judge_reward with this judge and every other key at its default.
    return _build_judge_reward(JudgeRewardConfig(judge=cfg, name=cfg.name or "genrm"), host, state_dir=state_dir)


# Each builder takes the config and an optional host: a model whose shared base a provider may
# run on instead of loading its own (`ActorCritic`; reward models and judges use it). Those that
# keep state a resumed run must see again (sampled references), or build members that may, also
# take the keyword `state_dir` (`build_provider`).
PROVIDERS: dict[str, Callable[..., RewardProvider]] = {
    "bt": load_reward_model_provider,
    "grm": load_reward_model_provider,
    "genrm": _build_genrm,
    "drlaif": build_drlaif,
    "judge_reward": _build_judge_reward,
    "function": _build_function,
    "sum": _build_sum,
    "ensemble": _build_ensemble,
}
WANTS_STATE_DIR = frozenset({"genrm", "judge_reward", "sum", "ensemble"})


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


def build_provider(spec: RewardConfig | Mapping[str, Any] | RewardProvider, where: str = "reward spec", host: Any = None, *, state_dir: str | Path | None = None) -> RewardProvider:
    """Build the provider a spec describes; members of composites are built recursively.

    spec: a `RewardConfig` instance, a plain mapping (validated strictly against `RewardConfig`;
    errors name `where`), or an already built provider (returned as is, so Python callers can
    pass either). The provider's `name` (what TRL and our logs show) is the config's `name` if it
    has one, else the name the provider chose for itself (a function's __name__), else the type.
    host: a model that offers its shared base (`policies.actor_critic.ActorCritic`): a LoRA
    reward model trained on that base then runs as a frozen adapter on it, with no second copy
    (`RewardProvider.shared_adapter` says when that happened), a judge LM whose base it is runs
    there, and references are sampled from its starting policy.
    state_dir: a directory where a provider keeps state a resumed run must see again (e.g. the
    PPO run directory: a `judge_reward` keeps the references it sampled there); the caller passes
    it without knowing what is kept. None: such state lives as long as the provider.
    """
    if isinstance(spec, RewardProvider):
        return spec
    if isinstance(spec, Mapping):
        cfg = from_dict(RewardConfig, dict(spec), where=where)
    elif isinstance(spec, typing.get_args(RewardConfig)):
        cfg = spec
    else:
        raise TypeError(f"{where}: expected a reward config, a mapping with a 'type' key ({KNOWN_TYPES}), or a provider; got {type(spec).__name__}")
    kwargs = {"state_dir": state_dir} if cfg.type in WANTS_STATE_DIR else {}
    provider = PROVIDERS[cfg.type](cfg, host, **kwargs)
    if getattr(cfg, "name", None):
        provider.name = cfg.name
    elif "name" not in vars(provider):
        provider.name = cfg.type
    return provider


def build_judge(spec: GenRMConfig | Mapping[str, Any] | PairwiseJudge, where: str = "judge spec", host: Any = None) -> PairwiseJudge:
    """Build a pairwise judge (P(first ≻ second), for best-of-N tournaments or `JudgeReward`).

    spec: a `GenRMConfig`, a plain mapping (validated strictly as one; its `type` may be left
    out; errors name `where`), or an already built judge (returned as is). host: as in
    `build_provider` (a judge whose base is the host's runs on it)."""
    if isinstance(spec, PairwiseJudge):
        return spec
    if isinstance(spec, Mapping):
        spec = from_dict(GenRMConfig, dict(spec), where=where)
    elif not isinstance(spec, GenRMConfig):
        raise TypeError(f"{where}: expected a genrm config, a mapping of one, or a pairwise judge; got {type(spec).__name__}")
    return build_genrm(spec, host)

"""Pairwise evaluation on preference pairs of any reward provider or pairwise judge, and the one
place a scorer (provider or judge) is built from a command-line argument.

Two kinds of scorer, told apart by the interface they implement (DESIGN.md, "The one reward
interface"): a `RewardProvider` scores each side, and its metrics are about the margin
r_c − r_r; a `PairwiseJudge` gives P(chosen ≻ rejected) directly, and its metrics are about that
probability. `prefer_pairs` turns either into P(chosen ≻ rejected), σ(r_c − r_r) for a provider,
which is what `rlhf label-pairs` writes.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch

from rewards.base import PairwiseJudge, PreferenceResult, RewardProvider, RewardResult
from rlhf.config import ConfigError
from rlhf.core import pairwise_accuracy, preference_ece
from rlhf.data import PreferencePair

Scorer = Union[RewardProvider, PairwiseJudge]

JUDGE_TYPES = frozenset({"genrm"})
"""Spec types built as a pairwise judge (`rewards.registry.build_judge`) rather than a provider."""

DEFAULT_RM_BATCH_SIZE = 16


# ----------------------------------------------------------------------------------------------
# Building a scorer from an argument
# ----------------------------------------------------------------------------------------------


def scorer_spec(arg: str | os.PathLike[str], batch_size: int | None = None) -> dict[str, Any]:
    """The spec a command-line JUDGE_SPEC names:

    - a directory written by `rlhf train-judge` (holds `judge.json`): `{type: genrm, path: DIR}`;
    - a directory written by `rlhf train-rm` (holds `reward_model.json`): `{type: bt, path: DIR}`;
    - a YAML (or JSON) file holding one reward or judge spec: a mapping with a `type` key.

    batch_size (rows per forward pass) goes into the spec of a directory (16 for a reward model
    when None, the judge's default otherwise); a YAML spec sets its own.
    """
    path = Path(arg)
    if path.is_dir():
        if (path / "judge.json").is_file():
            return {"type": "genrm", "path": str(arg)} | ({"batch_size": batch_size} if batch_size else {})
        if (path / "reward_model.json").is_file():
            return {"type": "bt", "path": str(arg), "batch_size": batch_size or DEFAULT_RM_BATCH_SIZE}
        hint = next((f"; did you mean {path / sub}?" for sub in ("model", "judge") if (path / sub).is_dir()), "")
        raise FileNotFoundError(
            f"{arg}: neither a reward model directory (no reward_model.json; train one with `rlhf train-rm`) "
            f"nor a judge directory (no judge.json; train one with `rlhf train-judge`){hint}"
        )
    if path.is_file():
        import yaml

        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{arg}: invalid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{arg}: not a text file ({err}); expected a YAML reward or judge spec") from None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
            raise ConfigError(f"{arg}: expected a reward or judge spec: a YAML mapping with a 'type' key (e.g. 'type: genrm')")
        return dict(spec)
    raise FileNotFoundError(f"{arg}: no such file or directory (expected a reward model or judge directory, or a YAML spec)")


def build_scorer(spec: Scorer | Mapping[str, Any] | str | os.PathLike[str], where: str = "judge spec", batch_size: int | None = None) -> Scorer:
    """A provider or judge from a spec mapping, a JUDGE_SPEC path (`scorer_spec`), or an already
    built provider or judge (returned as is, so Python callers and tests need no model). Types in
    `JUDGE_TYPES` are built by `rewards.registry.build_judge`, every other type by `build_provider`."""
    if isinstance(spec, (RewardProvider, PairwiseJudge)):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        where = str(spec)
        spec = scorer_spec(spec, batch_size)
    from rewards.registry import build_judge, build_provider

    if spec.get("type") in JUDGE_TYPES:
        return build_judge(spec, where=where)
    return build_provider(spec, where=where)


# ----------------------------------------------------------------------------------------------
# P(chosen ≻ rejected) from either kind of scorer
# ----------------------------------------------------------------------------------------------


def _score_both(provider: RewardProvider, pairs: Sequence[PreferencePair]) -> tuple[RewardResult, RewardResult]:
    prompts = [p.prompt for p in pairs]
    return provider.score(prompts, [p.chosen for p in pairs]), provider.score(prompts, [p.rejected for p in pairs])


def score_pairs(provider: RewardProvider, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected, valid), each (N,): both sides scored through the provider."""
    chosen, rejected = _score_both(provider, pairs)
    return chosen.rewards, rejected.rewards, chosen.valid & rejected.valid


def prefer_pairs(scorer: Scorer, pairs: Sequence[PreferencePair]) -> PreferenceResult:
    """P(chosen ≻ rejected) for every pair, (N,), with its validity and per-pair extras.

    A judge answers `prefer(prompts, chosen, rejected)` (GenRM averages both presentation orders
    itself). A provider's answer is the Bradley-Terry probability σ(r_c − r_r) (computed in
    float64), valid where both sides are; its extras are `reward_chosen`, `reward_rejected` and
    its own extras of each side as `chosen_<key>` / `rejected_<key>`."""
    if isinstance(scorer, PairwiseJudge):
        return scorer.prefer([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    chosen, rejected = _score_both(scorer, pairs)
    valid = chosen.valid & rejected.valid
    prob = torch.sigmoid(chosen.rewards.double() - rejected.rewards.double())
    extras: dict[str, list[Any]] = {"reward_chosen": chosen.rewards.tolist(), "reward_rejected": rejected.rewards.tolist()}
    extras |= {f"chosen_{k}": list(v) for k, v in chosen.extras.items()}
    extras |= {f"rejected_{k}": list(v) for k, v in rejected.extras.items()}
    return PreferenceResult(prob, valid, extras)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def pair_metrics(margins: torch.Tensor) -> dict[str, float]:
    """accuracy (ties half), mean margin r_c − r_r, and ECE of σ(r_c − r_r)."""
    return {
        "pairs": int(margins.numel()),
        "accuracy": float(pairwise_accuracy(margins)),
        "mean_margin": float(margins.mean()),
        "ece": float(preference_ece(margins)),
    }


def judge_metrics(prob: torch.Tensor, order_disagrees: torch.Tensor | None = None) -> dict[str, float]:
    """A judge's P = P(chosen ≻ rejected), (N,): accuracy (P > ½ right, P = ½ half), mean P, ECE
    of P, and, given `order_disagrees` ((N,) float, 1/0, NaN where unknown), the fraction of pairs
    whose two presentation orders picked different winners."""
    # P − ½ is a margin with the same sign and the same ties; logit(P) (float64, ±inf at 0 and 1)
    # is the margin whose σ is P, so `preference_ece` bins P itself.
    out = {
        "pairs": int(prob.numel()),
        "accuracy": float(pairwise_accuracy(prob.double() - 0.5)),
        "mean_prob": float(prob.double().mean()),
        "ece": float(preference_ece(torch.logit(prob.double()))),
    }
    if order_disagrees is not None:
        known = order_disagrees[~torch.isnan(order_disagrees)]
        if known.numel():
            out["order_disagreement"] = float(known.mean())
    return out


def label_metrics(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Agreement of the pairs' AI labels p = P(chosen ≻ rejected) with the file's orientation
    (a human chose `chosen`): the fraction with p > ½, p = ½ counting half; and the mean label.
    Empty when no pair has a label."""
    labels = [p.label for p in pairs if p.label is not None]
    if not labels:
        return {}
    t = torch.tensor(labels, dtype=torch.float64)
    return {"labelled": len(labels), "label_agreement": float(pairwise_accuracy(t - 0.5)), "mean_label": float(t.mean())}


def _groups(pairs: Sequence[PreferencePair]) -> dict[str, list[int]]:
    """Indices of "all" pairs, then of each subset (sorted by name)."""
    by_subset: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        if p.subset is not None:
            by_subset[p.subset].append(i)
    return {"all": list(range(len(pairs))), **dict(sorted(by_subset.items()))}


def evaluate_pairs(provider: RewardProvider, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """A provider's metrics over all pairs and per subset. Pairs the provider could not judge on
    either side are left out of the metrics and counted as `invalid`; labelled pairs add their AI
    labels' agreement with the file (`label_metrics`)."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    r_c, r_r, valid = score_pairs(provider, pairs)
    margins = r_c - r_r
    result: dict[str, Any] = {}
    for name, idx in _groups(pairs).items():
        ok = [i for i in idx if valid[i]]
        labels = label_metrics([pairs[i] for i in idx])
        if not ok and name != "all" and not labels:
            continue
        metrics = pair_metrics(margins[ok]) if ok else {"pairs": 0}
        result[name] = {**metrics, "invalid": len(idx) - len(ok), **labels}
    return result


def evaluate_judge(judge: PairwiseJudge, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """A pairwise judge's metrics (`judge_metrics`) over all pairs and per subset, from
    P = P(chosen ≻ rejected) as the judge gives it. Pairs it could not judge are left out and
    counted as `invalid`; the order-disagreement rate comes from the judge's `order_disagrees`
    extra where it gives one; labelled pairs add `label_metrics`."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    pref = prefer_pairs(judge, pairs)
    disagrees = None
    if "order_disagrees" in pref.extras:
        disagrees = torch.tensor([math.nan if d is None else float(bool(d)) for d in pref.extras["order_disagrees"]], dtype=torch.float64)
    result: dict[str, Any] = {}
    for name, idx in _groups(pairs).items():
        ok = [i for i in idx if pref.valid[i]]
        labels = label_metrics([pairs[i] for i in idx])
        if not ok and name != "all" and not labels:
            continue
        metrics = judge_metrics(pref.prob_first[ok], None if disagrees is None else disagrees[ok]) if ok else {"pairs": 0}
        result[name] = {**metrics, "invalid": len(idx) - len(ok), **labels}
    return result


def evaluate(scorer: Scorer, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """`evaluate_judge` for a pairwise judge, `evaluate_pairs` (margin metrics) for a provider."""
    return evaluate_judge(scorer, pairs) if isinstance(scorer, PairwiseJudge) else evaluate_pairs(scorer, pairs)


"""`rlhf label-pairs`: an AI labeller gives every preference pair a soft label P(chosen ≻ rejected).

The pairs are either a preference file's (a human chose one side) or pairs of fresh samples: two
completions per prompt drawn from a policy (`sample_pairs`, `--policy`), as RLAIF labels samples
of the SFT policy (Lee et al. 2023, section 2.1).

This is the labelling step of RLAIF (Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from
Human Feedback with AI Feedback", section 2.1): the labeller's preference probability, averaged
over both presentation orders against position bias, becomes the target of the reward model's
cross-entropy (`rlhf.core.bt_loss` with `label`), which `rlhf train-rm` uses for every pair that
carries a `label`.

The labeller is any scorer `rlhf.evaluation.build_scorer` builds: a pairwise judge (GenRM swaps
the order itself) gives P directly; a pointwise provider (a BT reward model, d-RLAIF) gives
P = σ(r_chosen − r_rejected).

One JSONL row per pair, in the file's orientation (`chosen` is the side a human preferred):
`prompt`, `chosen`, `rejected`, `label` (P, or null where the labeller could not judge),
`human_label` (1.0: the file's orientation), `valid`, `id`/`subset`/`margin` when the pair has
them, `source` (file:line of the pair), and `extras` (the labeller's per-pair diagnostics that JSON
can hold). Sampled pairs have no human label (`human_label` null) and are written with the sample
the labeller prefers as `chosen`, so that whatever reads `chosen` as the better side (eval-rm's
accuracy, a DPO trainer, hard-label BT) reads the labeller's preference, and `label` ≥ ½ is
P(chosen ≻ rejected); `first` says which of the two was sampled first (the judge's extras are in
sampling order: first, second). A pair the labeller could not judge keeps the sampling order.
`rlhf.data.load_pairs` reads the file back; a row whose label is null is a row error
there, so that it is never trained on as if a human had labelled it: `data.skip_invalid: true`
skips those rows and reports how many.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.config import ModelConfig, SamplingConfig
from rlhf.core import pairwise_accuracy
from rlhf.data import DataError, PreferencePair, PromptRecord
from rlhf.evaluation import Scorer, prefer_pairs
from rlhf.io import atomic_write_jsonl

CHUNK_SIZE = 256
"""Pairs per call to the labeller: a progress step. The labeller batches its own forward passes."""


@dataclass
class Labelled:
    """What `label_pairs` returns: the rows to write, and the extras keys left out somewhere
    because JSON could not hold their value."""

    rows: list[dict[str, Any]]
    dropped_extras: set[str] = field(default_factory=set)


def label_pairs(scorer: Scorer, pairs: Sequence[PreferencePair], *, chunk_size: int = CHUNK_SIZE, progress: bool = False, sampled: bool = False) -> Labelled:
    """One labelled row per pair, in order (see the module docstring for the fields). `sampled`:
    the pairs are policy samples (first, second) in the `chosen`/`rejected` slots, with no human
    label: each row is oriented by the labeller's preference (`labelled_row`)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out = Labelled(rows=[])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="label-pairs", unit="pair")
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        pref = prefer_pairs(scorer, chunk)
        if len(pref.prob_first) != len(chunk):
            raise ValueError(f"the labeller answered {len(pref.prob_first)} of {len(chunk)} pairs")
        for i, pair in enumerate(chunk):
            extras = {}
            for key, values in pref.extras.items():
                ok, value = jsonable(values[i])
                if ok:
                    extras[key] = value
                else:
                    out.dropped_extras.add(key)
            out.rows.append(labelled_row(pair, float(pref.prob_first[i]), bool(pref.valid[i]), extras, sampled=sampled))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def labelled_row(pair: PreferencePair, prob: float, valid: bool, extras: dict[str, Any] | None = None, *, sampled: bool = False) -> dict[str, Any]:
    """The JSONL row of one labelled pair; `prob` = P(pair.chosen ≻ pair.rejected) is ignored
    (label null) where not `valid`. `sampled`: pair.chosen / pair.rejected are the first and
    second policy sample; the row puts the preferred one first (P < ½: swapped, label 1 − P) and
    has no human label."""
    first = "chosen"
    if sampled and valid and prob < 0.5:
        pair = dataclasses.replace(pair, chosen=pair.rejected, rejected=pair.chosen)
        prob, first = 1.0 - prob, "rejected"
    row = pair_fields(pair)
    row |= {"label": prob if valid else None, "human_label": None if sampled else 1.0, "valid": valid}
    if sampled:
        row["first"] = first
    for key in ("id", "subset", "margin"):
        if getattr(pair, key) is not None:
            row[key] = getattr(pair, key)
    if pair.source:
        row["source"] = pair.source
    if extras:
        row["extras"] = extras
    return row


def pair_fields(pair: PreferencePair) -> dict[str, Any]:
    """`{prompt, chosen, rejected}` as `rlhf.data.parse_pair` reads them back.

    A pair with an empty reply is the exception: only HH transcripts may have one (an explicit
    `prompt` row may not: `rlhf.data._parse_completion`; 4 harmless-base test pairs prefer the
    assistant saying nothing, and a policy may sample EOS first), so such a pair is written back
    as a pair of HH transcripts, which parse to the same prompt messages and replies (a plain-text
    prompt as one user turn, which a chat template renders the same)."""
    if pair.chosen.strip() and pair.rejected.strip():
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    names = {"user": "Human", "assistant": "Assistant"}
    if isinstance(pair.prompt, str):  # one user turn: the same text under a chat template (`policies.text.render_prompt`)
        pair = dataclasses.replace(pair, prompt=[{"role": "user", "content": pair.prompt}])
    if any(m["role"] not in names for m in pair.prompt):
        raise DataError(pair.source or "<pair>", "an empty reply can only be written as an HH transcript, and this prompt is not one", "chosen" if not pair.chosen.strip() else "rejected")
    transcript = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in pair.prompt)

    def reply(text: str) -> str:
        return "\n\nAssistant:" + (f" {text}" if text.strip() else "")

    return {"chosen": transcript + reply(pair.chosen), "rejected": transcript + reply(pair.rejected)}


def jsonable(value: Any) -> tuple[bool, Any]:
    """(True, a JSON-safe copy) where JSON can hold the value (a one-element tensor becomes a
    number, a non-finite float null), else (False, None)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return False, None
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return True, None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False, None
    return True, value


def write_labels(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write the rows as JSONL, atomically (`rlhf.io`): an interrupted run leaves no half file."""
    if not str(path).lower().endswith(".jsonl"):
        raise ValueError(f"{path}: the labelled pairs are written as JSONL; give a name ending in .jsonl")
    return atomic_write_jsonl(path, rows)


def summarize_labels(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """rows; invalid (label null); `mean_label` over the labelled rows; `agreement` of the AI
    label with the human label over the rows that have both (the label is on the human's side
    of ½; exactly ½ counts half); None where there are none. Policy samples add `identical`:
    pairs whose two samples are the same text (nothing to prefer; P should be ½)."""
    labels = [r["label"] for r in rows if r["label"] is not None]
    both = [(r["label"], r["human_label"]) for r in rows if r["label"] is not None and r.get("human_label") is not None]
    summary: dict[str, Any] = {"rows": len(rows), "invalid": len(rows) - len(labels), "agreement": None, "mean_label": None}
    if labels:
        summary["mean_label"] = float(torch.tensor(labels, dtype=torch.float64).mean())
    if both:
        ai, human = torch.tensor(both, dtype=torch.float64).T
        # Signed distance from ½ toward the human's choice: > 0 agrees, = 0 a tie.
        summary["agreement"] = float(pairwise_accuracy((ai - 0.5) * torch.sign(human - 0.5)))
    if any("first" in r for r in rows):
        summary["identical"] = sum(r.get("chosen") == r.get("rejected") for r in rows)
    return summary


def format_label_summary(summary: dict[str, Any], out: str | Path, dropped_extras: set[str] = frozenset()) -> str:
    """The lines `rlhf label-pairs` prints."""
    lines = [f"wrote {summary['rows']:,} labelled pairs to {out}"]
    if summary["agreement"] is not None:
        lines.append(f"  agreement of the AI labels with the human labels: {summary['agreement']:.3f} "
                     f"(label > 0.5; 0.5 counts half); mean label {summary['mean_label']:.3f}")
    elif summary["mean_label"] is not None:
        lines.append(f"  no human labels (policy samples, each written with the preferred one as chosen); "
                     f"mean label P(chosen ≻ rejected) {summary['mean_label']:.3f}")
    if summary.get("identical"):
        lines.append(f"  pairs whose two samples are the same text: {summary['identical']:,}")
    lines.append(f"  invalid (label null, the labeller could not judge): {summary['invalid']:,}")
    if summary["invalid"]:
        lines.append("  train-rm stops at a null label; data.skip_invalid=true skips those rows and counts them")
    if dropped_extras:
        lines.append(f"  extras left out where JSON could not hold them: {', '.join(sorted(dropped_extras))}")
    return "\n".join(lines)


def sample_pairs(policy: ModelConfig, prompts: Sequence[PromptRecord], sampling: SamplingConfig, *, batch_size: int = 16,
                 max_prompt_tokens: int | None = None, seed: int = 0, autocast_mode: str = "auto", progress: bool = False) -> list[PreferencePair]:
    """Two completions per prompt from `policy`, as pairs (first sample in `chosen`, second in
    `rejected`: no preference yet) carrying the prompt's id, subset and source.

    The prompt is rendered as PPO renders it (`policies.text.render_prompt`), cut to its last
    `max_prompt_tokens` tokens, and sampled twice in the same batch with the engine's sampler;
    `seed` fixes the samples (for a given batch size and engine)."""
    from policies.engine_choice import build_engine
    from policies.models import autocast, autocast_dtype, load_model
    from policies.text import generate, render_prompt

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loaded = load_model(policy)
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    engine = build_engine(policy.engine, model, loaded.device)
    engine.prepare_frozen(model)
    amp = autocast_dtype(autocast_mode, loaded.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="sample pairs", unit="prompt")
    pairs: list[PreferencePair] = []
    with torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [render_prompt(tok, r.prompt) for r in chunk for _ in range(2)]  # rows 2i, 2i+1: prompt i
            with torch.no_grad(), autocast(loaded.device, amp):
                decoded = generate(engine, model, tok, texts, sampling, max_prompt_tokens=max_prompt_tokens).texts
            for i, r in enumerate(chunk):
                pairs.append(PreferencePair(r.prompt, decoded[2 * i], decoded[2 * i + 1], id=r.id, subset=r.subset, source=r.source))
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return pairs

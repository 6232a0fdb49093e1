"""`rlhf reward-ablation`: train several reward-model variants on the same data, seed and
budget, evaluate each on in- and out-of-distribution preference sets, and write a Markdown
table and a PNG bar chart. Generative judges (`judges:`) sit beside them as rows: zero-shot
(d-RLAIF, GenRM) or trained first by `rlhf train-judge` on the same train side.

The run resumes: a variant or judge whose `eval.json` exists is not trained or scored again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rewards.function import FunctionReward
from rewards.registry import RewardConfig, build_judge, build_provider
from rewards.reward_model import RewardModelProvider, load_reward_model
from rlhf import train_judge, train_rm
from rlhf.config import DataConfig, doc, doc_factory, required, to_dict
from rlhf.evaluation import JUDGE_TYPES, evaluate, evaluate_pairs
from rlhf.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from rlhf.runs import prepare_run_dir


@dataclass(frozen=True)
class Variant:
    name: str = required("label in the table and chart; also the variant's run sub-directory")
    objective: Literal["bt", "grm"] = doc("bt", "Bradley-Terry alone, or BT plus GRM's regularizer")
    regularizer: Literal["sft", "dpo", "dpo_noref"] = doc("sft", "GRM regularizer (objective grm only)")


@dataclass(frozen=True)
class JudgeVariant:
    name: str = required("label in the table and chart; also the judge's run sub-directory")
    spec: RewardConfig = required("the judge: a genrm spec (pairwise: P(chosen ≻ rejected), both orders) or a drlaif spec (pointwise: both sides scored)")
    train: train_judge.TrainJudgeConfig | None = doc(None, "train the judge first (`rlhf train-judge` settings; its output_dir is set to the judge's sub-directory) and evaluate the result: spec.path is set to it")


@dataclass(frozen=True)
class EvalSet:
    name: str = required("column label in the table and chart")
    data: DataConfig = doc(DataConfig(split="all"), "the preference pairs")


def _default_variants() -> tuple[Variant, ...]:
    return (
        Variant("BT"),
        Variant("GRM-sft", "grm", "sft"),
        Variant("GRM-dpo", "grm", "dpo"),
        Variant("GRM-dpo_noref", "grm", "dpo_noref"),
    )


def _default_eval_sets() -> tuple[EvalSet, ...]:
    return (
        EvalSet("HH test", DataConfig(path="../shared/data/hh-rlhf/harmless-base/test.jsonl.gz", split="test")),
        EvalSet("HHH", DataConfig(path="../shared/data/hhh-alignment/hhh_alignment_pairs.jsonl", split="all")),
    )


@dataclass(frozen=True)
class AblationConfig:
    train: train_rm.TrainRMConfig = doc(
        train_rm.TrainRMConfig(eval_data=None),
        "shared training settings (model, data, budget, seed); each variant sets objective and grm.regularizer",
    )
    variants: tuple[Variant, ...] = doc_factory(_default_variants, "reward-model variants to train and compare")
    eval_sets: tuple[EvalSet, ...] = doc_factory(_default_eval_sets, "evaluation sets (subsets get their own columns)")
    output_dir: str = doc("runs/reward_ablation", "run directory: one sub-directory per variant, plus the table and chart")
    judges: tuple[JudgeVariant, ...] = doc((), "generative judges evaluated on the same sets, after the reward models")
    length_baseline: bool = doc(True, "add a row for the heuristic 'the shorter completion is preferred' (no training)")
    eval_batch_size: int = doc(16, "rows scored per forward pass during evaluation")


def variant_config(cfg: AblationConfig, v: Variant) -> train_rm.TrainRMConfig:
    """The shared training config with this variant's objective: same data, seed and budget."""
    return dataclasses.replace(
        cfg.train,
        objective=v.objective,
        grm=dataclasses.replace(cfg.train.grm, regularizer=v.regularizer),
        output_dir=str(Path(cfg.output_dir) / v.name),
        eval_data=None,
    )


def run(cfg: AblationConfig) -> dict:
    t0 = time.time()
    names = [v.name for v in cfg.variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    out = prepare_run_dir(cfg.output_dir, to_dict(cfg))
    eval_pairs = {e.name: train_rm.load_split_pairs(e.data) for e in cfg.eval_sets}
    results: dict[str, dict] = {}
    for v in cfg.variants:
        vdir = out / v.name
        if (vdir / "summary.json").is_file() and (vdir / "eval.json").is_file():
            print(f"[{v.name}] already done, reusing {vdir}")
        else:
            print(f"[{v.name}] training ({v.objective}{'/' + v.regularizer if v.objective == 'grm' else ''})")
            summary = train_rm.run(variant_config(cfg, v))
            provider = RewardModelProvider(
                load_reward_model(summary["model_dir"]), batch_size=cfg.eval_batch_size, autocast_mode=cfg.train.autocast, name=v.name
            )
            evals = {name: evaluate_pairs(provider, pairs) for name, pairs in eval_pairs.items()}
            atomic_write_json(vdir / "eval.json", evals)
        results[v.name] = {
            "train": json.loads((vdir / "summary.json").read_text()),
            "eval": json.loads((vdir / "eval.json").read_text()),
        }
    for j in cfg.judges:
        results[j.name] = judge_row(cfg, j, eval_pairs, out)
    if cfg.length_baseline:
        # A reward model that only learned a length preference scores like this row: it shows how
        # much of a variant's accuracy a length heuristic alone explains, in and out of distribution.
        shorter = FunctionReward(shorter_is_better, name=SHORTER)
        results[SHORTER] = {"train": {"train_pairs": 0, "train_seconds": 0.0},
                            "eval": {name: evaluate_pairs(shorter, pairs) for name, pairs in eval_pairs.items()}}
    columns = result_columns(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results, columns) + judge_disagreement_table(results))
    atomic_write_bytes(out / "results.png", bar_chart_png(results, columns))
    print(markdown_table(results, columns) + judge_disagreement_table(results))
    print(f"wrote {out / 'results.md'} and {out / 'results.png'} ({time.time() - t0:.0f}s)")
    return results


def judge_row(cfg: AblationConfig, j: JudgeVariant, eval_pairs: dict, out: Path) -> dict:
    """Train the judge if asked (resumable), score every eval set, keep the result in
    OUT/NAME/eval.json; a judge with that file is not trained or scored again."""
    jdir = out / j.name
    if (jdir / "eval.json").is_file():
        print(f"[{j.name}] already done, reusing {jdir}")
    else:
        spec, train = j.spec, {"train_pairs": 0, "train_seconds": 0.0}
        if j.train is not None:
            print(f"[{j.name}] training the judge ({j.train.method})")
            summary = train_judge.run(dataclasses.replace(j.train, output_dir=str(jdir / "train")))
            spec = dataclasses.replace(spec, path=str(jdir / "train" / "judge"), model=None)
            train = {"train_pairs": summary.get("train_pairs", 0), "train_seconds": summary.get("wall_seconds", 0.0)}
        print(f"[{j.name}] scoring the eval sets")
        t0 = time.time()
        scorer = build_judge(spec) if spec.type in JUDGE_TYPES else build_provider(spec)
        evals = {name: evaluate(scorer, pairs) for name, pairs in eval_pairs.items()}
        scorer.close()
        jdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(jdir / "train.json", train | {"eval_seconds": round(time.time() - t0, 1)})
        atomic_write_json(jdir / "eval.json", evals)
    return {"train": json.loads((jdir / "train.json").read_text()), "eval": json.loads((jdir / "eval.json").read_text()), "judge": True}


SHORTER = "(heuristic) shorter wins"


def shorter_is_better(prompts: list, completions: list[str], **_: object) -> list[float]:
    """r = −(characters in the completion)."""
    return [-float(len(c)) for c in completions]


def result_columns(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(eval set, subset) columns in a stable order: each set's 'all' first, then its subsets."""
    first = next(iter(results.values()))["eval"]
    return [(name, subset) for name, per in first.items() for subset in per if per[subset].get("pairs")]


def _label(name: str, subset: str) -> str:
    return name if subset == "all" else f"{name} {subset}"


def markdown_table(results: dict[str, dict], columns: list[tuple[str, str]]) -> str:
    head = "| variant | " + " | ".join(f"{_label(n, s)} ({next(iter(results.values()))['eval'][n][s]['pairs']})" for n, s in columns) + " |"
    lines = ["Pairwise accuracy (ties count half) ± its standard error √(a(1 − a)/n); pairs per column in brackets.", "", head, "|---" + "|---:" * len(columns) + "|"]
    for variant, r in results.items():
        lines.append(f"| {variant} | " + " | ".join(_accuracy_cell(r['eval'][n][s]) for n, s in columns) + " |")
    overall = [(n, s) for n, s in columns if s == "all"]
    lines += ["", "Mean margin r_c − r_r and expected calibration error of σ(r_c − r_r) on each whole set (for a pairwise judge: "
              "mean P(chosen ≻ rejected) in place of the margin, and the ECE of P); training time.", ""]
    lines.append("| variant | " + " | ".join(f"{n} margin | {n} ECE" for n, _ in overall) + " | train pairs | train s |")
    lines.append("|---" + "|---:|---:" * len(overall) + "|---:|---:|")
    for variant, r in results.items():
        trained = r["train"]["train_pairs"] > 0
        cells = " | ".join(_margin_cells(r, n) for n, _ in overall)
        pairs_cell, secs_cell = (r["train"]["train_pairs"], f"{r['train']['train_seconds']:.0f}") if trained else ("–", "–")
        lines.append(f"| {variant} | {cells} | {pairs_cell} | {secs_cell} |")
    return "\n".join(lines) + "\n"


def _accuracy_cell(m: dict) -> str:
    if not m.get("pairs"):
        return f"– ({m.get('invalid', 0)} invalid)"  # the judge could not answer on any pair
    a, n = m["accuracy"], m["pairs"]
    return f"{a:.3f} ± {(a * (1 - a) / n) ** 0.5:.3f}"


def _margin_cells(r: dict, name: str) -> str:
    m = r["eval"][name]["all"]
    if not m.get("pairs"):
        return "– | –"
    if "mean_prob" in m:
        return f"P {m['mean_prob']:.3f} | {m['ece']:.3f}"
    if r["train"]["train_pairs"] == 0 and not r.get("judge"):
        return "– | –"  # a heuristic's scores (characters) have no reward scale: its margin and ECE mean nothing
    return f"{m['mean_margin']:.3f} | {m['ece']:.3f}"


def judge_disagreement_table(results: dict[str, dict]) -> str:
    """For pairwise judges: how often the two presentation orders picked different winners."""
    rows = [(v, r) for v, r in results.items() if any("order_disagreement" in per.get("all", {}) for per in r["eval"].values())]
    if not rows:
        return ""
    sets = list(next(iter(results.values()))["eval"])
    lines = ["", "Pairwise judges: fraction of pairs whose two presentation orders picked different winners; invalid comparisons.", "",
             "| judge | " + " | ".join(f"{s} order disagreement | {s} invalid" for s in sets) + " |", "|---" + "|---:|---:" * len(sets) + "|"]
    for v, r in rows:
        lines.append(f"| {v} | " + " | ".join(f"{r['eval'][s]['all'].get('order_disagreement', float('nan')):.3f} | {r['eval'][s]['all'].get('invalid', 0)}" for s in sets) + " |")
    return "\n".join(lines) + "\n"


def bar_chart_png(results: dict[str, dict], columns: list[tuple[str, str]]) -> bytes:
    """Grouped bars: one group per (set, subset), one bar per variant; chance at 0.5."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(columns) + 2), 4))
    for i, v in enumerate(variants):
        xs = [c + (i - (len(variants) - 1) / 2) * width for c in range(len(columns))]
        style = {"color": "lightgrey", "hatch": "//", "edgecolor": "grey"} if v == SHORTER else {}
        ax.bar(xs, [results[v]["eval"][n][s].get("accuracy", float("nan")) for n, s in columns], width, label=v, **style)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(columns)), [_label(n, s) for n, s in columns], rotation=20, ha="right")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Reward-model ablation: in-distribution vs out-of-distribution")
    ax.legend(fontsize=8, ncols=min(len(variants) + 1, 5), loc="upper center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()

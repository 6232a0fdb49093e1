"""The `rlhf` command. It parses arguments and a recipe, then calls a job; nothing else.

Recipe-driven commands share one shape: `rlhf COMMAND RECIPE [key.sub=value ...]`, and
`rlhf COMMAND --help` lists every recipe key with its doc. Jobs are imported lazily so that
`rlhf --help` and `rlhf data check` start without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class RecipeCommand:
    help: str
    target: str  # "module:ConfigClass:run_function"

    def resolve(self) -> tuple[type, Callable]:
        module, cls, fn = self.target.split(":")
        mod = importlib.import_module(module)
        return getattr(mod, cls), getattr(mod, fn)


RECIPE_COMMANDS: dict[str, RecipeCommand] = {
    "likelihood-demo": RecipeCommand(
        "load the default model, answer held-out HH prompts, score HH pairs by likelihood",
        "rlhf.likelihood_demo:LikelihoodDemoConfig:run",
    ),
    "train-rm": RecipeCommand(
        "train a Bradley-Terry or GRM reward model on preference pairs",
        "rlhf.train_rm:TrainRMConfig:run",
    ),
    "train-judge": RecipeCommand(
        "train a GenRM judge on preference pairs: SFT on verdicts, or STaR / STaR-DPO on its own rationales",
        "rlhf.train_judge:TrainJudgeConfig:run",
    ),
    "ppo": RecipeCommand(
        "train a policy with PPO against any reward provider",
        "rlhf.ppo:PPOConfig:run",
    ),
    "pipeline": RecipeCommand(
        "train a reward model, then PPO against it (the quickstart: recipes/quickstart.yaml)",
        "rlhf.pipeline:PipelineConfig:run",
    ),
    "reward-ablation": RecipeCommand(
        "train BT and GRM variants on the same budget; compare them in- and out-of-distribution",
        "rlhf.ablation:AblationConfig:run",
    ),
}

def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: printed as one clear line, without a traceback."""
    from policies.hub import ModelNotFoundError
    from rlhf.config import ConfigError
    from rlhf.data import DataError
    from rlhf.ppo import TooManyInvalidError

    return (ConfigError, DataError, ModelNotFoundError, FileNotFoundError, TooManyInvalidError)


def build_parser() -> argparse.ArgumentParser:
    from rlhf.config import Dtype

    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="pluggable-rlhf: PPO/RLHF training with pluggable reward providers.",
        epilog="Run `rlhf COMMAND --help` for a command's options and recipe keys.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, cmd in RECIPE_COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, add_help=False)
        p.add_argument("recipe", nargs="?", help="YAML recipe (defaults apply to keys it leaves out)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a recipe key")
        p.add_argument("-h", "--help", action="store_true", help="show this help and the recipe keys")
        if name == "ppo":
            p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
        p.set_defaults(handler=_run_recipe, recipe_command=name, subparser=p)

    p = sub.add_parser("models", help="list known model aliases; convert the embedded default")
    p.add_argument("--convert", metavar="ALIAS", help="convert an embedded model into the cache now")
    p.set_defaults(handler=_models)

    p = sub.add_parser("eval-rm", help="evaluate a reward model or judge on preference data: accuracy, margin or P, calibration")
    p.add_argument("model", metavar="MODEL_OR_JUDGE", help=JUDGE_SPEC_HELP)
    p.add_argument("data", nargs="+", metavar="DATA[@SPLIT]",
                   help="preference data file; '@test' or '@train' picks a side of the prompt-hash split (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test fraction of the prompt-hash split")
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (and rows whose label is null) and report them")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.set_defaults(handler=_eval_rm)

    p = sub.add_parser("label-pairs", help="label preference pairs, or pairs of policy samples, with a judge's P(first ≻ second): soft labels for train-rm (RLAIF)",
                       description="Label every pair of DATA with P(chosen ≻ rejected) from a judge or reward model and write "
                                   "OUT.jsonl (prompt, chosen, rejected, label, human_label, valid, extras), which train-rm "
                                   "trains on as soft labels. With --policy, DATA gives prompts instead: the policy samples two "
                                   "completions per prompt, the judge labels them, and each row is written with the preferred "
                                   "sample as chosen (label = P(chosen ≻ rejected) ≥ 0.5, human_label null).")
    p.add_argument("judge", metavar="JUDGE_SPEC", help=JUDGE_SPEC_HELP)
    p.add_argument("data", metavar="DATA[@SPLIT]",
                   help="preference data file (with --policy: any prompt or pair file); '@test' or '@train' picks a side of the prompt-hash split (default: all)")
    p.add_argument("out", metavar="OUT.jsonl", help="labelled pairs, written atomically")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test fraction of the prompt-hash split")
    p.add_argument("--max-items", type=int, default=None, help="label at most this many pairs or prompts (after the split), in file order")
    p.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows of DATA and report them")
    g = p.add_argument_group("pairs of policy samples")
    g.add_argument("--policy", metavar="MODEL", default=None, help="sample the pairs from this model (alias, local directory or hub id) instead of reading them from DATA")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per sample")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1: the policy's own distribution)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus filter (1: off)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="the policy sees each prompt's last this many tokens (default: all)")
    g.add_argument("--policy-dtype", default="float32", choices=typing.get_args(Dtype), help="the policy's weight dtype")
    g.add_argument("--sample-batch-size", type=int, default=16, help="prompts per sampling batch (two samples each)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(handler=_label_pairs)

    data = sub.add_parser("data", help="data file tools")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = dsub.add_parser("check", help="validate a data file and print counts")
    p.add_argument("file", help="JSONL, JSON, .gz, or a `datasets` directory")
    p.add_argument("--kind", choices=["auto", "pairs", "prompts"], default="auto",
                   help="what the file holds (auto: pairs if the first row has 'chosen')")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows and report them")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of prompts in the test split")
    p.set_defaults(handler=_data_check)
    return parser


def _run_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf.config import help_text, load_config

    cfg_cls, run = RECIPE_COMMANDS[args.recipe_command].resolve()
    if args.help:
        args.subparser.print_help()
        print()
        print(help_text(cfg_cls))
        return 0
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # no recipe, only overrides
        recipe, overrides = None, [recipe, *overrides]
    if getattr(args, "resume", None):
        overrides += [f"output_dir={args.resume}", "resume=true"]
    cfg = load_config(cfg_cls, recipe, overrides)
    run(cfg)
    return 0


def _models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from policies.hub import KNOWN_MODELS, cache_dir, embedded_model_dir, ensure_converted, is_converted

    if args.convert:
        if args.convert not in KNOWN_MODELS:
            raise SystemExit(f"error: unknown alias '{args.convert}'; known: {', '.join(KNOWN_MODELS)}")
        print(f"{args.convert}: {ensure_converted(args.convert)}")
        return 0
    print(f"model cache: {cache_dir()} (set RLHF_CACHE_DIR to move it)")
    for alias, m in KNOWN_MODELS.items():
        state = f"converted at {embedded_model_dir(alias)}" if is_converted(alias) else "not converted yet (first use converts it, ~30 s)"
        print(f"  {alias}: {m.description}; {state}")
    print("Any local model directory or hub id also works as model.name.")
    return 0


JUDGE_SPEC_HELP = ("a reward model directory (`rlhf train-rm`), a judge directory (`rlhf train-judge`), "
                   "or a YAML file holding one reward or judge spec (a mapping with 'type', e.g. genrm, drlaif, bt)")
BATCH_SIZE_HELP = "rows per forward pass of a reward model (default 16) or judge directory; a YAML spec sets its own"


def _data_config(spec: str, test_fraction: float, max_items: int | None = None, skip_invalid: bool = False):
    """DATA[@SPLIT] → DataConfig; a path that itself contains '@' works when it exists."""
    from rlhf.config import ConfigError, DataConfig

    path, split = spec, "all"
    if "@" in spec:
        head, _, tail = spec.rpartition("@")
        if tail in ("all", "train", "test"):
            path, split = head, tail
        else:
            from pathlib import Path

            if not Path(spec).exists():
                raise ConfigError(f"{spec}: the split after '@' must be all, train or test, got {tail!r}")
    return DataConfig(path=path, split=split, test_fraction=test_fraction, max_items=max_items, skip_invalid=skip_invalid)  # type: ignore[arg-type]


def _eval_rm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf.evaluation import build_scorer, evaluate
    from rlhf.io import atomic_write_json
    from rlhf.train_rm import load_split_pairs

    # The data first: a bad file fails before a model loads.
    data = {spec: load_split_pairs(_data_config(spec, args.test_fraction, skip_invalid=args.skip_invalid)) for spec in args.data}
    scorer = build_scorer(args.model, batch_size=args.batch_size)
    try:
        results = {spec: evaluate(scorer, pairs) for spec, pairs in data.items()}
    finally:
        scorer.close()
    print(format_eval_table(results))
    for spec, per_subset in results.items():
        if per_subset["all"].get("invalid"):
            print(f"{spec}: {per_subset['all']['invalid']} pairs the {scorer.name} could not judge are left out")
    if args.out:
        atomic_write_json(args.out, results)
    return 0


_COLUMNS = (  # (header, key, shown only when some row has the key)
    ("pairs", "pairs", False),
    ("accuracy", "accuracy", False),
    ("mean margin", "mean_margin", True),
    ("mean P(chosen)", "mean_prob", True),
    ("ECE", "ece", False),
    ("order disagreement", "order_disagreement", True),
    ("AI-label agreement", "label_agreement", True),
)


def format_eval_table(results: dict) -> str:
    """A Markdown table: one row per (data set, subset). A reward model's rows have a mean margin;
    a judge's have mean P(chosen ≻ rejected) and, where the judge reports it, how often its two
    presentation orders disagree; a labelled file adds its AI labels' agreement with the file."""
    rows = [(name, subset, m) for name, per_subset in results.items() for subset, m in per_subset.items() if m.get("pairs")]
    cols = [(header, key) for header, key, optional in _COLUMNS if not optional or any(key in m for _, _, m in rows)]
    lines = ["| data | subset | " + " | ".join(h for h, _ in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, subset, m in rows:
        cells = [str(m[key]) if key == "pairs" else (f"{m[key]:.3f}" if m.get(key) is not None else "–") for _, key in cols]
        lines.append(f"| {name} | {subset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf.config import ConfigError
    from rlhf.evaluation import build_scorer
    from rlhf.labels import format_label_summary, label_pairs, summarize_labels, write_labels
    from rlhf.train_rm import load_split_pairs

    if not args.out.lower().endswith(".jsonl"):
        raise ConfigError(f"{args.out}: the labelled pairs are written as JSONL; give a name ending in .jsonl")
    if args.max_items is not None and args.max_items <= 0:
        raise ConfigError(f"--max-items must be positive, got {args.max_items}")
    data = _data_config(args.data, args.test_fraction, args.max_items, args.skip_invalid)
    if args.policy is None:
        pairs = load_split_pairs(data)
    else:
        pairs = _sample_policy_pairs(args, data)
    scorer = build_scorer(args.judge, batch_size=args.batch_size)
    try:
        labelled = label_pairs(scorer, pairs, progress=True, sampled=args.policy is not None)
    finally:
        scorer.close()
    write_labels(args.out, labelled.rows)
    print(format_label_summary(summarize_labels(labelled.rows), args.out, labelled.dropped_extras))
    return 0


def _sample_policy_pairs(args: argparse.Namespace, data: Any) -> list:
    """`label-pairs --policy`: two samples per prompt of DATA (`rlhf.labels.sample_pairs`)."""
    import dataclasses

    from rlhf.config import ConfigError, ModelConfig, SamplingConfig
    from rlhf.data import load_split
    from rlhf.labels import sample_pairs

    for key in ("max_new_tokens", "sample_batch_size", "max_prompt_tokens"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    prompts = load_split(kind="prompts", **dataclasses.asdict(data))
    print(f"sampling 2 completions for each of {len(prompts):,} prompts from {args.policy}")
    return sample_pairs(ModelConfig(name=args.policy, dtype=args.policy_dtype), prompts, sampling, batch_size=args.sample_batch_size,
                        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, progress=True)


def _data_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rlhf import data

    kind = args.kind
    if kind == "auto":
        first = next(iter(data.iter_rows(args.file)), (None, {}))[1]
        kind = "pairs" if isinstance(first, dict) and "chosen" in first else "prompts"
    if kind == "pairs":
        loaded = data.load_pairs(args.file, skip_invalid=args.skip_invalid)
        summary = data.summarize_pairs(loaded, test_fraction=args.test_fraction)
        print(f"{args.file}: {summary['pairs']:,} preference pairs")
        print(f"  distinct prompts: {summary['distinct_prompts']:,}")
        if summary.get("subsets"):
            print("  subsets: " + ", ".join(f"{k} {v:,}" for k, v in summary["subsets"].items()))
        print(f"  chosen identical to rejected: {summary['identical_chosen_rejected']:,}")
        print(f"  with an empty chosen or rejected reply: {summary['empty_completions']:,}")
        n_train, n_test = summary["train"], summary["test"]
    else:
        loaded = data.load_prompts(args.file, skip_invalid=args.skip_invalid)
        train, test = data.split_by_prompt(loaded.items, args.test_fraction)
        n_train, n_test = len(train), len(test)
        print(f"{args.file}: {len(loaded.items):,} prompts")
    print(f"  split by prompt hash (test fraction {args.test_fraction}): train {n_train:,}, test {n_test:,}")
    print(f"  skipped invalid rows: {len(loaded.skipped):,}")
    for msg in loaded.skipped[:10]:
        print(f"    {msg}")
    if len(loaded.skipped) > 10:
        print(f"    ... and {len(loaded.skipped) - 10} more")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, parser)
    except _user_errors() as err:
        from rlhf.config import one_line

        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

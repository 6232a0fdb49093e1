"""`rlhf likelihood-demo`: the smallest real run on the embedded default model (issue 2's
first main job; the quickstart is now the PPO pipeline, recipes/quickstart.yaml).

It loads SmolLM2-135M-Instruct (converting the embedded GGUF on first use), answers a few
held-out HH prompts, and scores held-out HH preference pairs by the policy's own likelihood,
log π(chosen|x) vs log π(rejected|x), summed and per token. That likelihood comparison is a
zero-training baseline that any trained reward model should beat. Everything lands in a run
directory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from policies.engine_choice import build_engine
from policies.models import load_model
from policies.text import encode_completions, generate, render_prompt, sequence_logprob
from rlhf.core import pairwise_accuracy
from rlhf.config import DataConfig, ModelConfig, SamplingConfig, doc, to_dict
from rlhf.data import load_split
from rlhf.io import atomic_write_json, atomic_write_jsonl
from rlhf.runs import prepare_run_dir, seed_everything


@dataclass(frozen=True)
class LikelihoodDemoConfig:
    model: ModelConfig = doc(ModelConfig(), "the policy model")
    data: DataConfig = doc(DataConfig(split="test"), "preference pairs; prompts and pairs are taken from it")
    sampling: SamplingConfig = doc(SamplingConfig(), "how completions are sampled")
    num_prompts: int = doc(4, "prompts to answer (sample completions are printed and saved)")
    num_pairs: int = doc(32, "preference pairs to score by the policy's likelihood")
    batch_size: int = doc(8, "rows per forward pass")
    max_prompt_tokens: int = doc(384, "prompts keep their last this many tokens")
    max_completion_tokens: int = doc(128, "scored completions keep their first this many tokens")
    seed: int = doc(0, "random seed")
    run_dir: str = doc("runs/likelihood_demo", "where the run writes its files")


def run(cfg: LikelihoodDemoConfig) -> dict:
    t0 = time.time()
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg.run_dir, to_dict(cfg))
    loaded = load_model(cfg.model)
    engine = build_engine(cfg.model.engine, loaded.model, loaded.device)
    model, tok = loaded.model, loaded.tokenizer
    print(f"model: {cfg.model.name} from {loaded.path} on {loaded.device} ({time.time() - t0:.1f}s)")

    pairs = load_split(kind="pairs", **dataclasses.asdict(cfg.data))
    print(f"data: {len(pairs)} pairs in the '{cfg.data.split}' split of {cfg.data.path}")

    # 1. Answer a few prompts.
    prompts = [render_prompt(tok, p.prompt) for p in pairs[: cfg.num_prompts]]
    samples = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="generate", unit="batch"):
        gen = generate(engine, model, tok, prompts[i : i + cfg.batch_size], cfg.sampling)
        for j, text in enumerate(gen.texts):
            samples.append(
                {
                    "prompt": pairs[i + j].prompt,
                    "completion": text,
                    "finished": bool(gen.finished[j]),
                    "tokens": int(gen.completion_mask[j].sum()),
                }
            )

    # 2. Score preference pairs by likelihood.
    scored = pairs[: cfg.num_pairs]
    rows = []
    for i in tqdm(range(0, len(scored), cfg.batch_size), desc="score pairs", unit="batch"):
        batch = scored[i : i + cfg.batch_size]
        texts = [render_prompt(tok, p.prompt) for p in batch]
        lp, n = {}, {}
        for side in ("chosen", "rejected"):
            enc = encode_completions(
                tok,
                texts,
                [getattr(p, side) for p in batch],
                max_prompt_tokens=cfg.max_prompt_tokens,
                max_completion_tokens=cfg.max_completion_tokens,
            )
            lp[side] = sequence_logprob(engine, model, enc)
            n[side] = enc.completion_mask.sum(-1).clamp_min(1)
        for j, p in enumerate(batch):
            rows.append(
                {
                    "source": p.source,
                    "logp_chosen": float(lp["chosen"][j]),
                    "logp_rejected": float(lp["rejected"][j]),
                    "mean_logp_chosen": float(lp["chosen"][j] / n["chosen"][j]),
                    "mean_logp_rejected": float(lp["rejected"][j] / n["rejected"][j]),
                }
            )

    summary = {
        "model": cfg.model.name,
        "pairs_scored": len(rows),
        "accuracy_sum_logp": _accuracy(rows, "logp"),
        "accuracy_mean_logp": _accuracy(rows, "mean_logp"),
        "samples_finished": sum(s["finished"] for s in samples) / max(len(samples), 1),
        "wall_seconds": round(time.time() - t0, 1),
    }
    atomic_write_jsonl(run_dir / "samples.jsonl", samples)
    atomic_write_jsonl(run_dir / "pair_scores.jsonl", rows)
    atomic_write_json(run_dir / "summary.json", summary)
    _print_report(samples, summary, run_dir)
    return summary


def _accuracy(rows: list[dict], key: str) -> float:
    """Fraction of pairs where the chosen side scores higher; ties count half."""
    margins = torch.tensor([r[f"{key}_chosen"] - r[f"{key}_rejected"] for r in rows])
    return float(pairwise_accuracy(margins))


def _print_report(samples: list[dict], summary: dict, run_dir) -> None:
    print()
    for s in samples:
        last = s["prompt"][-1]["content"] if isinstance(s["prompt"], list) else s["prompt"]
        print(f"PROMPT:     {last[:200]}")
        print(f"COMPLETION: {s['completion'][:300]}{'' if s['finished'] else ' [no EOS]'}")
        print()
    print(
        f"likelihood as a reward on {summary['pairs_scored']} held-out HH pairs: "
        f"accuracy {summary['accuracy_sum_logp']:.3f} (summed log-prob), "
        f"{summary['accuracy_mean_logp']:.3f} (per-token mean)"
    )
    print(f"run directory: {run_dir} ({summary['wall_seconds']}s)")

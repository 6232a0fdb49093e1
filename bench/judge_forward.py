"""A generative judge's verdict forward against a BT reward model's scoring pass, on the same
batch shape (rows × tokens), side by side in one run (issue 19's target: at most 1.2×).

Both run the same base model through the same engine call: `Engine.hidden_states(read=...,
frozen=True)` (merged, prepacked weights on the CPU). The BT pass reads one column per row and
applies its head; the judge reads the last two columns (d-RLAIF's "1" then "0" for a score of
10; GenRM direct needs one) and projects them through the LM head to log-probabilities over the
vocabulary. Each side is a LoRA model on SmolLM2-135M-Instruct: the BT reward model as `rlhf
train-rm` builds it and a judge as `rlhf train-judge` saves it (adapters on the top 10 layers,
B ≠ 0 so nothing is skipped). The token ids are the same random ids for both.

    .venv/bin/python bench/judge_forward.py --rows 16 --tokens 384 --repeats 5

Prints one Markdown row per side (median seconds per pass, tokens/s) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import envinfo  # noqa: E402  (bench/)

from policies.models import autocast, load_model  # noqa: E402
from policies.text import Encoded  # noqa: E402
from rewards.judge_format import JudgeMeta, write_judge_meta  # noqa: E402
from rewards.judge_lm import JudgeLM  # noqa: E402
from rewards.reward_model import load_reward_model, new_reward_model  # noqa: E402
from rlhf.config import LoraConfig, ModelConfig  # noqa: E402


def _perturb_lora(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    lora = LoraConfig(enabled=True, r=16, alpha=32, last_layers=10)
    with tempfile.TemporaryDirectory() as tmp:
        rm = new_reward_model(ModelConfig(name=args.model, lora=lora, device="cpu"), "linear")
        _perturb_lora(rm.lm)
        with torch.no_grad():
            rm.head.net[-1].weight.normal_(0, 0.01)
        rm.save(Path(tmp) / "rm")
        judge_model = load_model(ModelConfig(name=args.model, lora=lora, device="cpu"))
        _perturb_lora(judge_model.model)
        judge_model.model.save_pretrained(Path(tmp) / "judge" / "adapter")
        write_judge_meta(Path(tmp) / "judge", JudgeMeta(base_model=str(rm.meta.base_model)))
        del rm, judge_model

        bt = load_reward_model(Path(tmp) / "rm", device="cpu")
        judge = JudgeLM.load(path=str(Path(tmp) / "judge"), device="cpu")
        vocab = judge.tokenizer.vocab_size
        ids = torch.randint(100, vocab - 1, (args.rows, args.tokens))
        attn = torch.ones_like(ids)
        enc = Encoded(ids, attn, torch.zeros_like(ids), args.tokens - 1)
        amp = judge.amp

        def bt_pass() -> None:
            with torch.no_grad(), autocast(bt.device, amp):
                bt(enc, frozen=True)

        def judge_pass() -> None:
            judge.last_logprobs(ids, attn, k=2)

        times: dict[str, list[float]] = {"bt": [], "judge": []}
        for fn in (bt_pass, judge_pass):  # warm-up: prepacking, oneDNN primitives
            fn()
        for r in range(args.repeats):  # alternate which side runs first
            order = [("bt", bt_pass), ("judge", judge_pass)] if r % 2 == 0 else [("judge", judge_pass), ("bt", bt_pass)]
            for name, fn in order:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = args.rows * args.tokens
    print(f"| pass ({args.rows} rows × {args.tokens} tokens, median of {args.repeats}) | seconds | tokens/s |")
    print("|---|---:|---:|")
    print(f"| BT reward model scoring (`RewardModel(frozen=True)`) | {med['bt']:.3f} | {n_tokens / med['bt']:,.0f} |")
    print(f"| judge verdict read-out (`JudgeLM.last_logprobs(k=2)`) | {med['judge']:.3f} | {n_tokens / med['judge']:,.0f} |")
    print(f"\njudge / BT = {med['judge'] / med['bt']:.3f}  (target ≤ 1.2); autocast {amp}")
    env = envinfo.environment()
    print(f"CPU: {envinfo.describe_cpu(env['cpu'])}; torch {env['packages'].get('torch')}")


if __name__ == "__main__":
    main()

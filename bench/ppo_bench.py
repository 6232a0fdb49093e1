"""Our PPO loop on the same work as bench/trl_ppo_baseline.py: seconds per update, peak memory,
and model-FLOPs utilisation (MFU).

    .venv/bin/python bench/ppo_bench.py --mode full --updates 5 --out runs/bench/ours_full.json
    .venv/bin/python bench/ppo_bench.py --mode lora --updates 5 --out runs/bench/ours_lora.json

Work per update: 8 HH prompts (last 128 tokens), 32 sampled new tokens (temperature 0.7,
top-k 0, top-p 1), one PPO epoch over one minibatch of 8. SmolLM2-135M-Instruct is policy,
reference, reward and value model; the reward model has a randomly initialised (seeded) head.

Modes:
  full  layout `separate`: full fp32 policy, frozen full reference, full critic + value head,
        full reward model; no autocast. The same four models TRL trains/keeps.
  lora  the default layout `shared_lora`: policy and critic LoRA adapters (r=16, α=32, all
        linear layers) on one base, reference = adapters disabled, LoRA reward model;
        bf16 autocast where the CPU has native bf16 (`autocast: auto`).

MFU = achieved FLOP/s ÷ this machine's matmul peak in the same dtype, measured by a GEMM probe
at start-up (torch's matmul or oneDNN's prepacked linear, whichever is faster: `gemm_peak`).
FLOPs are counted as 2·N per token for a forward pass and 4·N (LoRA: no weight gradients for
the frozen base) or 6·N (full) for forward + backward, where N is the number of parameters in
matrix multiplies (all linear layers, LM head included; embeddings excluded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def gemm_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n×n matmul in `dtype` on this machine: the faster of torch's matmul
    and, where torch has it, oneDNN's linear on a weight reordered once into its blocked layout
    (what `policies.packed` runs). On an AMD CPU torch's fp32 matmul goes through MKL, whose
    kernels there are far slower than oneDNN's (0.20 against 0.46 TFLOP/s on the 2026-12-07
    machine), so a matmul-only probe understated the peak and gave fp32 MFUs over 100%."""
    from policies.packed import _can_prepack, _packed

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    candidates = [lambda: a @ b]
    w = b.t().contiguous()  # a linear's (out, in) weight: x·wᵀ = a·b
    if _can_prepack(w):
        packed = _packed(w, n)
        candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    return max(_flops_per_s(fn, 2 * n**3, seconds) for fn in candidates)


def _flops_per_s(fn, flops: int, seconds: float) -> float:
    for _ in range(3):
        fn()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return flops * count / (time.perf_counter() - t0)


def matmul_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def make_reward_model(path: Path, *, lora: bool) -> dict:
    from rewards.reward_model import new_reward_model
    from rlhf.config import LoraConfig, ModelConfig

    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(lora=LoraConfig(enabled=lora)), "linear", max_prompt_tokens=128, max_completion_tokens=64)
    rm.save(path)
    (path / "matmul_params.json").write_text(json.dumps(matmul_params(rm.causal_lm)))  # the LM head is a Linear
    return {}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="lora")
    p.add_argument("--updates", type=int, default=5, help="measured updates (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra PPOConfig override (repeatable)")
    p.add_argument("--make-reward-model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_reward_model:
        return make_reward_model(args.make_reward_model, lora=args.mode == "lora")

    from rlhf.config import load_config
    from rlhf.ppo import PPOConfig, run

    lora = args.mode == "lora"
    dtype = torch.bfloat16 if lora else torch.float32
    peak = gemm_peak(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        # The reward model is built (random head, seeded) and saved by a child process, as
        # `rlhf train-rm` would in real use, so this process's peak memory is the PPO run's own.
        subprocess.run([sys.executable, __file__, "--make-reward-model", f"{tmp}/rm", "--mode", args.mode], check=True)
        n_matmul = json.loads((Path(tmp) / "rm" / "matmul_params.json").read_text())
        overrides = [
            f"layout={'shared_lora' if lora else 'separate'}", f"model.lora.enabled={str(lora).lower()}",
            f"reward={{type: bt, path: {tmp}/rm, batch_size: 8}}", f"prompts.path={HH}", "prompts.split=all",
            "eval_prompts=null", f"updates={args.warmup + args.updates}", "batch_size=8", "num_minibatches=1",
            "ppo_epochs=1", "sampling.max_new_tokens=32", "sampling.temperature=0.7", "max_prompt_tokens=128",
            f"autocast={'auto' if lora else 'none'}", f"output_dir={tmp}/run", "sample_every=0", *args.set,
        ]
        cfg = load_config(PPOConfig, None, overrides)
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = rows[args.warmup :]
    sec = [r["seconds_per_update"] for r in measured]
    B, C = 8, 32
    P = sum(r["response/prompt_tokens"] for r in measured) / len(measured)
    resp = sum(r["response/length"] for r in measured) / len(measured)
    tokens = B * (P + resp)
    # Rollout: generation (≈ one forward over prompt + completion), reward and reference
    # forwards (one minibatch: π_old and V_old come from the training forward, rlhf.ppo.
    # fuse_old_forward); training: policy and critic forward + backward.
    gen_flops = 2 * n_matmul * tokens
    rollout_flops = gen_flops + 2 * 2 * n_matmul * tokens
    train_flops = 2 * (4 if lora else 6) * n_matmul * tokens
    # With the kept prompt pass (rlhf.ppo keep_prompt_pass), the policy's forward over the
    # prompts runs in the rollout, where it replaces the sampler's prefill: not in the step.
    kept = sum(r.get("rollout/prompt_pass_kept", 0.0) for r in measured) / len(measured)
    train_flops -= kept * 2 * n_matmul * B * P
    t_roll = sum(r["time/rollout_s"] for r in measured) / len(measured)
    t_train = sum(r["time/train_s"] for r in measured) / len(measured)
    result = {
        "impl": "pluggable-rlhf",
        "mode": args.mode,
        "overrides": args.set,
        "updates_per_s": len(sec) / sum(sec),
        "sec_per_update": sec,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "batch": B,
        "response_length": C,
        "mean_prompt_tokens": P,
        "mean_response_tokens": resp,
        "gemm_peak_tflops": peak / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "mfu_rollout": rollout_flops / t_roll / peak,
        "mfu_train_step": train_flops / t_train / peak,
        "prompt_pass_kept": kept,
        "wall_s": wall,
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

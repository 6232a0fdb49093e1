"""Our PPO loop on the same work as bench/trl_ppo_baseline.py: seconds per update, peak memory,
and model-FLOPs utilisation (MFU).

    .venv/bin/python bench/ppo_bench.py --mode full --updates 5 --out runs/bench/ours_full.json
    .venv/bin/python bench/ppo_bench.py --mode lora --updates 5 --out runs/bench/ours_lora.json
    .venv/bin/python bench/ppo_bench.py --mode lora --set ppo_epochs=4 --set num_minibatches=4

Work per update: 8 prompts, 32 sampled new tokens (temperature 0.7, top-k 0, top-p 1), by
default one PPO epoch over one minibatch of 8 (`--set ppo_epochs=4 --set num_minibatches=4`
for four epochs of four minibatches of 2, where π_old and V_old need their own forward).
SmolLM2-135M-Instruct is policy, reference, reward and value model; the reward model has a
randomly initialised (seeded) head.

Prompts: the token ids in bench/prompts.py's file (--prompts; built with its defaults when
missing), the same ids TRL's side takes, update u taking rows 8u … 8u+7. Our loop takes prompts
only as a data file of text or chat messages (`prompts.path`), which it renders with the chat
template and tokenizes itself; so the rows' messages are written to a JSONL laid out so that the
loop's fixed shuffle (rlhf.ppo._batch_for) walks them in the file's order, the batches the
rollout receives are recorded, and after the run each is tokenized as the rollout tokenizes it
(one left-padded batch, last max_prompt_tokens columns) and asserted equal, row for row, to the
file's ids: the run fails rather than report numbers for other prompts.

Modes:
  full  layout `separate`: full fp32 policy, frozen full reference, full critic + value head,
        full reward model; no autocast. The same four models TRL trains/keeps.
  lora  the default layout `shared_lora`: policy and critic LoRA adapters (r=16, α=32, all
        linear layers) on one base, reference = adapters disabled, LoRA reward model;
        bf16 autocast where the CPU has native bf16 (`autocast: auto`).

The output JSON records the PPOConfig overrides, the prompts' sha256, and the package versions,
Python and CPU (bench/envinfo.py).

MFU = achieved FLOP/s ÷ this machine's matmul peak in the same dtype, measured by a GEMM probe
at start-up (torch's matmul or oneDNN's prepacked linear, whichever is faster: `gemm_peak`).
FLOPs are counted as 2·N per token for a forward pass and 4·N (LoRA: no weight gradients for
the frozen base) or 6·N (full) for forward + backward, where N is the number of parameters in
matrix multiplies (all linear layers, LM head included; embeddings excluded); the training step
counts ppo_epochs passes, and the rollout counts the π_old and V_old forwards where they are not
fused into the first training forward (more than one minibatch, or accumulation).
"""

from __future__ import annotations

import argparse
import inspect
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
sys.path.insert(0, str(REPO / "bench"))

import envinfo  # noqa: E402  (bench/)
import prompts as bench_prompts  # noqa: E402  (bench/)

BATCH = 8


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


def write_prompt_file(rows: list[dict], path: Path, batch: int) -> None:
    """Our loop's prompt file for `rows`: their messages, placed so that the loop's fixed walk
    through the file (rlhf.ppo._batch_for) takes rows[k] as the k-th prompt."""
    from rlhf.ppo import _batch_for

    n = len(rows)
    walk = [i for u in range(n // batch) for i in _batch_for(list(range(n)), u, batch, 0, 1)]
    if sorted(walk) != list(range(n)):
        raise RuntimeError(f"rlhf.ppo._batch_for does not walk a {n}-row file once over: {walk}")
    placed: list[dict | None] = [None] * n
    for k, i in enumerate(walk):
        placed[i] = {"messages": rows[k]["messages"], "id": rows[k]["source"]}
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in placed))


def record_rollout_prompts():
    """Wraps rlhf.ppo.collect_rollout to keep (tokenizer, rendered prompt texts) of each batch."""
    import rlhf.ppo as ppo

    seen: list[tuple[object, list[str]]] = []
    inner = ppo.collect_rollout

    def collect_rollout(ac, provider, b_prompts, *args, **kwargs):
        seen.append((ac.tokenizer, [t for _, t in b_prompts]))
        return inner(ac, provider, b_prompts, *args, **kwargs)

    ppo.collect_rollout = collect_rollout
    return seen, inner


def check_prompt_ids(seen: list, rows: list[dict], max_prompt_tokens: int, batch: int) -> None:
    """Each recorded batch, tokenized as the rollout tokenizes it (one left-padded batch, then
    the last max_prompt_tokens columns), must give exactly the file's ids for its rows."""
    if len(seen) * batch != len(rows):
        raise RuntimeError(f"recorded {len(seen)} rollout batches for {len(rows)} prompts (has rlhf.ppo.collect_rollout moved?)")
    for u, (tok, texts) in enumerate(seen):
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"][:, -max_prompt_tokens:], enc["attention_mask"][:, -max_prompt_tokens:]
        if tok.padding_side != "left":
            raise RuntimeError(f"our tokenizer pads on the {tok.padding_side}")
        for j, (row_ids, row_mask) in enumerate(zip(ids, mask)):
            got = row_ids[row_mask.bool()].tolist()
            want = rows[u * batch + j]["input_ids"]
            if got != want:
                raise RuntimeError(f"update {u} row {j}: our rollout's prompt ids differ from the shared file's "
                                   f"({len(got)} against {len(want)} tokens; first difference at "
                                   f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="lora")
    p.add_argument("--updates", type=int, default=5, help="measured updates (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=Path, default=bench_prompts.DEFAULT_PATH, help="bench/prompts.py's file (built if missing)")
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra PPOConfig override (repeatable)")
    p.add_argument("--make-reward-model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_reward_model:
        return make_reward_model(args.make_reward_model, lora=args.mode == "lora")

    from rlhf.config import load_config
    from rlhf.ppo import PPOConfig, fuse_old_forward, run

    n_updates = args.warmup + args.updates
    rows, header = bench_prompts.read(bench_prompts.ensure(args.prompts, BATCH * n_updates), BATCH * n_updates)
    lora = args.mode == "lora"
    dtype = torch.bfloat16 if lora else torch.float32
    # A run's packed CPU engine applies its process settings (oneDNN's primitive cache cap, glibc's
    # allocator) when it is built, before the run's first matmul; the GEMM probe's matmuls come
    # first here, so apply them now, as the run itself would.
    from policies.packed import configure_cpu_process

    configure_cpu_process()
    peak = gemm_peak(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        # The reward model is built (random head, seeded) and saved by a child process, as
        # `rlhf train-rm` would in real use, so this process's peak memory is the PPO run's own.
        subprocess.run([sys.executable, __file__, "--make-reward-model", f"{tmp}/rm", "--mode", args.mode], check=True)
        n_matmul = json.loads((Path(tmp) / "rm" / "matmul_params.json").read_text())
        write_prompt_file(rows, Path(tmp) / "prompts.jsonl", BATCH)
        overrides = [
            f"layout={'shared_lora' if lora else 'separate'}", f"model.lora.enabled={str(lora).lower()}",
            f"reward={{type: bt, path: {tmp}/rm, batch_size: {BATCH}}}", f"prompts.path={tmp}/prompts.jsonl", "prompts.split=all",
            "eval_prompts=null", f"updates={n_updates}", f"batch_size={BATCH}", "num_minibatches=1",
            "ppo_epochs=1", "sampling.max_new_tokens=32", "sampling.temperature=0.7", f"max_prompt_tokens={header['max_prompt_tokens']}",
            f"autocast={'auto' if lora else 'none'}", f"output_dir={tmp}/run", "sample_every=0", *args.set,
        ]
        cfg = load_config(PPOConfig, None, overrides)
        if cfg.batch_size != BATCH or cfg.max_prompt_tokens != header["max_prompt_tokens"]:
            raise SystemExit("batch_size and max_prompt_tokens are fixed by the benchmark's prompt file")
        seen, inner_collect_rollout = record_rollout_prompts()
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        check_prompt_ids(seen, rows, cfg.max_prompt_tokens, BATCH)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = metrics[args.warmup :]
    sec = [r["seconds_per_update"] for r in measured]
    B, C = BATCH, 32
    P = sum(r["response/prompt_tokens"] for r in measured) / len(measured)
    resp = sum(r["response/length"] for r in measured) / len(measured)
    tokens = B * (P + resp)
    fused = fuse_old_forward(cfg)
    # Rollout: generation (≈ one forward over prompt + completion), reward and reference
    # forwards; training: policy and critic forward + backward, once per epoch. Unless fused
    # (one minibatch: π_old and V_old come from the first training forward, rlhf.ppo.
    # fuse_old_forward), the policy and critic also run a no-grad forward each: timed with the
    # rollout where collect_rollout computes them (its `with_old`), else with the training step.
    gen_flops = 2 * n_matmul * tokens
    rollout_flops = gen_flops + 2 * 2 * n_matmul * tokens
    train_flops = cfg.ppo_epochs * 2 * (4 if lora else 6) * n_matmul * tokens
    old_flops = 0 if fused else 2 * 2 * n_matmul * tokens
    if "with_old" in inspect.signature(inner_collect_rollout).parameters:
        rollout_flops += old_flops
    else:
        train_flops += old_flops
    # With the kept prompt pass, the policy's forward over the prompts runs in the rollout,
    # where it replaces the sampler's prefill: not in the step. (The metric's name changed.)
    kept = sum(r.get("rollout/prompt_pass_kept", r.get("engine/prompt_pass_reused", 0.0)) for r in measured) / len(measured)
    train_flops -= kept * 2 * n_matmul * B * P
    t_roll = sum(r["time/rollout_s"] for r in measured) / len(measured)
    t_train = sum(r["time/train_s"] for r in measured) / len(measured)
    result = {
        "impl": "pluggable-rlhf",
        "mode": args.mode,
        "overrides": args.set,
        "updates_per_s": len(sec) / sum(sec),
        "sec_per_update": sec,
        "warmup_sec": [r["seconds_per_update"] for r in metrics[: args.warmup]],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "batch": B,
        "response_length": C,
        "ppo_epochs": cfg.ppo_epochs,
        "num_minibatches": cfg.num_minibatches,
        "fused_old_forward": fused,
        "attn_implementation": cfg.model.attn_implementation,
        "prompts": {**bench_prompts.summary(rows, header), "ids_checked": True},
        "mean_prompt_tokens": P,
        "mean_response_tokens": resp,
        "gemm_peak_tflops": peak / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "mfu_rollout": rollout_flops / t_roll / peak,
        "mfu_train_step": train_flops / t_train / peak,
        "mfu_update": (rollout_flops + train_flops) / (t_roll + t_train) / peak,
        "prompt_pass_kept": kept,
        "wall_s": wall,
        "environment": envinfo.environment(),
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

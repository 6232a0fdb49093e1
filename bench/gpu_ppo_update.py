"""Time PPO updates in-process and read the GPU's peak memory: `rlhf.ppo.run` on overrides, then
`seconds_per_update` from the run's metrics.jsonl and torch.cuda.max_memory_allocated(), which
the run's own metrics don't record. Used by bench/gpu_check.sh for the 4-bit QLoRA update of a
~1B Llama-shaped model, once per engine.

    python bench/gpu_ppo_update.py --model DIR --engine hf --out /tmp/run --result hf.json [--set key=value ...]

The base settings are the PPO stage of recipes/hh_qlora_7b.yaml (bf16 compute, NF4 base with
double quantization, LoRA r 16 on all linear layers, shared_lora layout, activation
checkpointing, batch 16, 128 new tokens, 256 prompt tokens, 2 epochs × 2 minibatches × 2
accumulation steps) with a cheap function reward instead of a reward model; `--set` overrides
any of them (later wins). `--engine none` leaves `model.engine` unset (for a tree without it).

Peak memory is read per phase: `load` is everything before the first rollout (building the
4-bit model and adapters), `update_k` the k-th update (rollout + PPO epochs; the last one also
holds the final checkpoint save). The peak counter is reset at each phase start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):  # rlhf/policies/rewards, and gpu_reward_fns for the reward
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def base_overrides(model: str, engine: str, out: Path, prompts: Path, updates: int) -> list[str]:
    o = [
        f"model.name={model}",
        "model.dtype=bfloat16",
        "model.quantization=4bit",
        "model.gradient_checkpointing=true",
        "model.lora={enabled: true, r: 16, alpha: 32}",
        "layout=shared_lora",
        "reward={type: function, path: 'gpu_reward_fns:length_reward'}",
        f"prompts={{path: '{prompts}', split: train}}",
        "eval_prompts=null",
        "sampling={max_new_tokens: 128, temperature: 0.7}",
        "max_prompt_tokens=256",
        "kl={estimator: k1, coef: 0.05}",
        "batch_size=16",
        "ppo_epochs=2",
        "num_minibatches=2",
        "grad_accum_steps=2",
        f"updates={updates}",
        "lr=2.0e-5",
        "seed=0",
        "checkpoint_every=0",
        "sample_every=0",
        f"output_dir={out}",
    ]
    if engine != "none":
        o.append(f"model.engine={engine}")
    return o


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (safetensors + tokenizer)")
    ap.add_argument("--engine", default="hf", help="model.engine: hf, packed, auto, or none (leave unset)")
    ap.add_argument("--out", type=Path, required=True, help="the run's output_dir")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--updates", type=int, default=2, help="the first includes CUDA/bitsandbytes warm-up; the later ones are steady")
    ap.add_argument("--result", type=Path, help="write the result JSON here")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="more overrides (later wins)")
    args = ap.parse_args()

    t_start = time.time()
    result: dict = {"engine": args.engine, "model": args.model, "ok": False}
    model_info = Path(args.model) / "gpu_check_model.json"
    if model_info.is_file():
        result["model_info"] = json.loads(model_info.read_text())
    overrides = base_overrides(args.model, args.engine, args.out, args.prompts, args.updates) + args.extra
    result["overrides"] = overrides
    try:
        import torch

        from rlhf.config import load_config
        import rlhf.ppo as ppo

        cuda = torch.cuda.is_available()
        result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
        result["torch"] = torch.__version__
        cfg = load_config(ppo.PPOConfig, None, overrides)

        phases: list[tuple[str, int]] = []  # (phase, peak bytes allocated in it)
        real_collect = ppo.collect_rollout

        def close_phase() -> None:
            if cuda:
                torch.cuda.synchronize()
                name = "load" if not phases else f"update_{len(phases)}"
                phases.append((name, torch.cuda.max_memory_allocated()))
                torch.cuda.reset_peak_memory_stats()

        def timed_collect(*a, **kw):  # each update starts with its rollout
            close_phase()
            return real_collect(*a, **kw)

        ppo.collect_rollout = timed_collect
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            summary = ppo.run(cfg)
        finally:
            ppo.collect_rollout = real_collect
        close_phase()
        result["summary"] = summary
        rows = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        secs = [r["seconds_per_update"] for r in rows if "seconds_per_update" in r]
        result["seconds_per_update"] = secs
        result["first_update_s"] = secs[0] if secs else None
        result["steady_update_s"] = (sum(secs[1:]) / len(secs[1:])) if len(secs) > 1 else None
        for key in ("time/rollout_s", "time/train_s", "tokens_per_s", "response/length"):
            result[key] = [r.get(key) for r in rows]
        if cuda and len(phases) == 1:  # collect_rollout was never reached through the module (renamed?)
            phases = [("whole_run", phases[0][1])]
        if cuda:
            result["peak_gib_by_phase"] = {n: round(b / 2**30, 3) for n, b in phases}
            result["peak_gpu_gib"] = round(max(b for _, b in phases) / 2**30, 3)
            result["peak_update_gib"] = round(max([b for n, b in phases if n != "load"] or [0]) / 2**30, 3)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        result["ok"] = len(secs) == args.updates
        if not result["ok"]:
            result["error"] = f"metrics.jsonl has {len(secs)} updates, expected {args.updates}"
    except BaseException as err:  # report, then fail the stage
        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    result["wall_s"] = round(time.time() - t_start, 1)
    if args.result:
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
    secs = result.get("seconds_per_update") or []
    print(f"RESULT engine={args.engine} ok={result['ok']} seconds_per_update={[round(s, 2) for s in secs]} "
          f"peak_gpu_gib={result.get('peak_gpu_gib')} (updates: {result.get('peak_update_gib')}, by phase: {result.get('peak_gib_by_phase')}) "
          f"max_rss_gib={result.get('max_rss_gib')} wall_s={result['wall_s']}"
          + (f" error={result['error']}" if result.get("error") else ""), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

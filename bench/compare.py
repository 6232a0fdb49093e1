"""Side by side, in one run: our PPO loop against TRL 1.9.2's `trl.experimental.ppo` on the same
work (bench/ppo_bench.py and bench/trl_ppo_baseline.py; their docstrings define the work), on an
otherwise idle machine. Prints the Markdown table docs/benchmarks.md keeps, with the package
versions and CPU of both sides under it.

    bash bench/setup_trl_baseline.sh          # once: TRL 1.9.2 in .venv-trl192
    .venv/bin/python bench/compare.py --warmup 2 --updates 4 --out runs/bench
    .venv/bin/python bench/compare.py --rows full,lora --warmup 0 --updates 1   # a smoke run

Same work, checked: the prompt token ids are built once (bench/prompts.py, written to
OUT/prompts.json) and both sides read them, each checking that its updates took exactly those
rows in order; both record the ids' sha256 and compare.py refuses rows where they differ.

Rows (ROWS below): both sides in fp32 (four full models); TRL with eager attention; our default
LoRA layout (bf16 autocast) against TRL's `peft_config` in fp32 and with bf16 (TRL's PPOConfig
default, which the fp32 rows switch off); activation checkpointing; and 4 PPO epochs of 4
minibatches on both sides (where our fused π_old/V_old forward does not apply) in fp32 and LoRA.
Runs alternate: each row runs both sides back to back, ours first in even rows and TRL first in
odd ones, so a drift in the machine's speed does not always favour one side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import envinfo  # noqa: E402  (bench/)
import prompts as bench_prompts  # noqa: E402  (bench/)

OURS = REPO / ".venv" / "bin" / "python"
TRL = REPO / ".venv-trl192" / "bin" / "python"

EPOCHS_4X4_TRL = ["--ppo-epochs", "4", "--num-mini-batches", "4"]
EPOCHS_4X4_OURS = ["ppo_epochs=4", "num_minibatches=4"]

# (key, row label, TRL arguments, our mode, our PPOConfig overrides, speed-up target, memory-ratio target)
ROWS = [
    ("full", "four full fp32 models (ours: `layout: separate`, no autocast); TRL fp32, sdpa attention",
     ["--mode", "full"], "full", [], 1.5, None),
    ("full-eager", "four full fp32 models; TRL with eager attention",
     ["--mode", "full", "--attn-implementation", "eager"], "full", [], None, None),
    ("lora", "default layout (ours: shared LoRA + bf16) vs TRL with its `peft_config`, fp32",
     ["--mode", "lora"], "lora", [], 3.0, 1 / 3),
    ("lora-bf16", "default layout vs TRL `peft_config` with bf16 (TRL's default `bf16=True`)",
     ["--mode", "lora", "--bf16"], "lora", [], None, None),
    ("lora-ckpt", "default layout + activation checkpointing vs TRL with its `peft_config`, fp32",
     ["--mode", "lora"], "lora", ["model.gradient_checkpointing=true"], 3.0, 1 / 3),
    ("full-4x4", "four full fp32 models, 4 PPO epochs × 4 minibatches on both sides",
     ["--mode", "full", *EPOCHS_4X4_TRL], "full", EPOCHS_4X4_OURS, None, None),
    ("lora-4x4", "default layout vs TRL `peft_config` fp32, 4 PPO epochs × 4 minibatches on both sides",
     ["--mode", "lora", *EPOCHS_4X4_TRL], "lora", EPOCHS_4X4_OURS, None, None),
]


def run_side(cmd: list[str], out: Path) -> dict:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    result = json.loads(out.read_text())
    result["_wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help=f"comma-separated subset of: {', '.join(r[0] for r in ROWS)}")
    args = p.parse_args()
    keys = args.rows.split(",")
    unknown = set(keys) - {r[0] for r in ROWS}
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    n_prompts = 8 * (args.warmup + args.updates)
    prompt_file = args.out / "prompts.json"
    bench_prompts.build(prompt_file, max(n_prompts, bench_prompts.DEFAULT_NUM))  # fresh: from the current code and tokenizer
    common = ["--warmup", str(args.warmup), "--updates", str(args.updates), "--prompts", str(prompt_file)]

    lines = ["| work | TRL 1.9.2 s/update | ours s/update | speed-up | TRL peak RSS | ours peak RSS | memory ratio | targets |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    notes, results = [], []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = [r for r in ROWS if r[0] in keys]
    for i, (key, label, trl_args, mode, extra, speed_target, mem_target) in enumerate(rows):
        trl_out, ours_out = args.out / f"trl_{key}.json", args.out / f"ours_{key}.json"
        trl_cmd = [str(TRL), str(REPO / "bench" / "trl_ppo_baseline.py"), *trl_args, *common, "--out", str(trl_out)]
        ours_cmd = [str(OURS), str(REPO / "bench" / "ppo_bench.py"), "--mode", mode, *common, "--out", str(ours_out)]
        for override in extra:
            ours_cmd += ["--set", override]
        if i % 2 == 0:
            ours = run_side(ours_cmd, ours_out)
            trl = run_side(trl_cmd, trl_out)
        else:
            trl = run_side(trl_cmd, trl_out)
            ours = run_side(ours_cmd, ours_out)
        if trl["prompts"]["sha256"] != ours["prompts"]["sha256"]:
            raise SystemExit(f"{key}: the two sides took different prompts ({trl['prompts']['sha256'][:12]} / {ours['prompts']['sha256'][:12]})")
        results.append((key, trl, ours))
        t_trl, t_ours = 1 / trl["updates_per_s"], 1 / ours["updates_per_s"]
        m_trl, m_ours = trl["peak_rss_mib"] / 1024, ours["peak_rss_mib"] / 1024
        speed, mem = t_trl / t_ours, m_ours / m_trl
        verdict = []
        if speed_target:
            verdict.append(f"≥ {speed_target}x: {'met' if speed >= speed_target else '**not met**'}")
        if mem_target:
            verdict.append(f"≤ {mem_target:.2f}: {'met' if mem <= mem_target else '**not met**'}")
        lines.append(f"| {label} | {t_trl:.1f} | {t_ours:.1f} | {speed:.2f}x | {m_trl:.1f} GiB | {m_ours:.1f} GiB | {mem:.2f} | {'; '.join(verdict) or '—'} |")
        first = "ours" if i % 2 == 0 else "TRL"
        notes.append(f"- {key}: {first} first; TRL mixed precision {trl['accelerate_mixed_precision']}, {trl['attn_implementation']} attention, "
                     f"{trl['num_ppo_epochs']}×{trl['num_mini_batches']} epochs×minibatches; ours {ours['dtype']}, "
                     f"{ours['ppo_epochs']}×{ours['num_minibatches']}{', fused π_old' if ours['fused_old_forward'] else ''}; "
                     f"ours MFU rollout {ours['mfu_rollout']:.0%}, training step {ours['mfu_train_step']:.0%} "
                     f"(GEMM peak {ours['gemm_peak_tflops']:.3f} TFLOP/s {ours['dtype']}); "
                     f"wall TRL {trl['_wall_s']:.0f} s, ours {ours['_wall_s']:.0f} s")
        print(lines[-1], flush=True)

    prompts = results[0][2]["prompts"]
    env_trl, env_ours = results[0][1]["environment"], results[0][2]["environment"]
    versions = ["| package | TRL side (.venv-trl192) | our side (.venv) |", "|---|---|---|",
                f"| python | {env_trl['python']} | {env_ours['python']} |"]
    for name in envinfo.PACKAGES:
        versions.append(f"| {name} | {env_trl['packages'].get(name) or '—'} | {env_ours['packages'].get(name) or '—'} |")
    text = "\n".join([
        f"`bench/compare.py --warmup {args.warmup} --updates {args.updates}`, started {started}, "
        f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        *lines,
        "",
        f"Prompts: the same {prompts['count']} prompt token-id rows on both sides (sha256 {prompts['sha256'][:16]}, "
        f"mean {prompts['mean_tokens']} tokens, max {prompts['max_tokens']}), 8 per update, checked by both.",
        "",
        *notes,
        "",
        f"CPU: {envinfo.describe_cpu(env_ours['cpu'])}.",
        "",
        *versions,
    ])
    print(text)
    (args.out / "compare.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

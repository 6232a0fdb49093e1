"""Side by side, in one run: our PPO loop against TRL 1.9.2's `trl.experimental.ppo` on the same
work (bench/ppo_bench.py and bench/trl_ppo_baseline.py; their docstrings define the work), one
after the other on an otherwise idle machine. Prints the Markdown table docs/benchmarks.md keeps.

    bash bench/setup_trl_baseline.sh          # once: TRL 1.9.2 in .venv-trl192
    .venv/bin/python bench/compare.py --updates 4 --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / ".venv" / "bin" / "python"
TRL = REPO / ".venv-trl192" / "bin" / "python"

# (row label, TRL mode, our mode, our extra overrides, speed-up target, memory-ratio target)
ROWS = [
    ("four full fp32 models (ours: `layout: separate`, no autocast)", "full", "full", [], 1.5, None),
    ("default layout (ours: shared LoRA + bf16) vs TRL with its `peft_config`", "lora", "lora", [], 3.0, 1 / 3),
    ("default layout + activation checkpointing vs TRL with its `peft_config`", "lora", "lora", ["model.gradient_checkpointing=true"], 3.0, 1 / 3),
]


def bench(python: Path, script: str, mode: str, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    cmd = [str(python), str(REPO / "bench" / script), "--mode", mode, "--warmup", str(args.warmup), "--updates", str(args.updates), "--out", str(out)]
    for override in extra:
        cmd += ["--set", override]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trl = {mode: bench(TRL, "trl_ppo_baseline.py", mode, args, args.out / f"trl_{mode}.json", []) for mode in ("full", "lora")}
    lines = ["| work | TRL 1.9.2 s/update | ours s/update | speed-up | TRL peak RSS | ours peak RSS | memory ratio | targets |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, (label, trl_mode, mode, extra, speed_target, mem_target) in enumerate(ROWS):
        ours = bench(OURS, "ppo_bench.py", mode, args, args.out / f"ours_{i}.json", extra)
        t_trl, t_ours = 1 / trl[trl_mode]["updates_per_s"], 1 / ours["updates_per_s"]
        m_trl, m_ours = trl[trl_mode]["peak_rss_mib"] / 1024, ours["peak_rss_mib"] / 1024
        speed, mem = t_trl / t_ours, m_ours / m_trl
        verdict = [f"≥ {speed_target}x: {'met' if speed >= speed_target else '**not met**'}"]
        if mem_target:
            verdict.append(f"≤ {mem_target:.2f}: {'met' if mem <= mem_target else '**not met**'}")
        lines.append(f"| {label} | {t_trl:.1f} | {t_ours:.1f} | {speed:.2f}x | {m_trl:.1f} GiB | {m_ours:.1f} GiB | {mem:.2f} | {'; '.join(verdict)} |")
        print(f"{label}: MFU rollout {ours['mfu_rollout']:.0%}, training step {ours['mfu_train_step']:.0%} "
              f"(GEMM peak {ours['gemm_peak_tflops']:.3f} TFLOP/s {ours['dtype']})")
    table = "\n".join(lines)
    print(table)
    (args.out / "compare.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

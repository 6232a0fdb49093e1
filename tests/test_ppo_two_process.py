"""The same PPO loop under `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import HH_TEST, REPO


def test_two_process_cpu_run(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml", "-m", "rlhf", "ppo",
         f"model.name={tiny_llama_dir}", "model.lora.r=4", "reward={type: function, path: 'reward_fns:length_reward'}",
         f"prompts.path={HH_TEST}", "eval_prompts=null", "updates=2", "batch_size=4", "sampling.max_new_tokens=6",
         "autocast=none", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    ckpt = out / "checkpoints" / "update-000002"
    assert (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()  # both processes took part
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # logged once, by the main process

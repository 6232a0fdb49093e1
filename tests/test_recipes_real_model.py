"""The shipped reward recipes run end to end on the real SmolLM2-135M at a smoke size, so a
recipe can't silently break (the full runs are documented in docs/results/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def rlhf(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_rm_recipe_smoke(tmp_path, smollm2_dir):
    out = tmp_path / "rm"
    rlhf("train-rm", "recipes/rm_bt_hh.yaml", "max_steps=1", "data.max_items=8", "eval_data.max_items=8",
         "micro_batch_size=4", "grad_accum_steps=1", f"output_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval"]["all"]["pairs"] == 8
    meta = json.loads((out / "model" / "reward_model.json").read_text())
    assert meta["base_model"] == "smollm2-135m-instruct" and meta["lora"] is True
    proc = rlhf("eval-rm", str(out / "model"), "../shared/data/hhh-alignment/hhh_alignment_pairs.jsonl")
    assert "| harmless | 58 |" in proc.stdout


def test_reward_ablation_recipe_smoke(tmp_path, smollm2_dir):
    out = tmp_path / "abl"
    rlhf("reward-ablation", "recipes/reward_ablation.yaml", "train.max_steps=1", "train.data.max_items=4",
         "train.micro_batch_size=2", "train.grad_accum_steps=1", "eval_sets[0].data.max_items=4",
         "eval_sets[1].data.max_items=8", f"output_dir={out}")
    table = (out / "results.md").read_text()
    for variant in ("BT", "GRM-sft", "GRM-dpo", "GRM-dpo_noref"):
        assert f"| {variant} |" in table
    assert (out / "results.png").stat().st_size > 1000

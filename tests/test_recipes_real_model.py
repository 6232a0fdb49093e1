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
         "eval_sets[1].data.max_items=8", "judges[2].train.data.max_items=2", "judges[2].train.max_steps=1",
         "judges[2].train.micro_batch_size=2", "judges[2].train.grad_accum_steps=1", f"output_dir={out}")
    table = (out / "results.md").read_text()
    for variant in ("BT", "GRM-sft", "GRM-dpo", "GRM-dpo_noref", "d-RLAIF (zero-shot)", "GenRM (zero-shot)", "GenRM-SFT"):
        assert f"| {variant} |" in table
    results = json.loads((out / "results.json").read_text())
    # SmolLM2 answers both judge formats: its verdict and score tokens carry the mass
    assert results["GenRM (zero-shot)"]["eval"]["HHH"]["all"]["pairs"] == 8
    assert results["d-RLAIF (zero-shot)"]["eval"]["HHH"]["all"]["pairs"] == 8
    assert (out / "results.png").stat().st_size > 1000


def test_quickstart_recipe_smoke(tmp_path, smollm2_dir):
    """`make quickstart`'s recipe end to end at a smoke size: one reward-model step, two PPO
    updates with the reward model as a frozen adapter on the policy's base."""
    rm_dir, ppo_dir = tmp_path / "rm", tmp_path / "ppo"
    proc = rlhf("pipeline", "recipes/quickstart.yaml", f"run_dir={tmp_path}", f"rm.output_dir={rm_dir}",
                "rm.max_steps=1", "rm.data.max_items=8", "rm.eval_data.max_items=8", "rm.micro_batch_size=4",
                "rm.grad_accum_steps=1", f"ppo.reward.path={rm_dir}/model", f"ppo.value_head_init={rm_dir}/model",
                f"ppo.output_dir={ppo_dir}", "ppo.updates=2", "ppo.batch_size=4", "ppo.eval_prompts.max_items=4",
                "ppo.sampling.max_new_tokens=8", "ppo.checkpoint_every=1", "ppo.sample_every=1")
    assert "a frozen adapter on the policy's base" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reward_model"]["eval"]["all"]["pairs"] == 8
    assert summary["ppo"]["eval_before"]["prompts"] == 4 and summary["ppo"]["updates"] == 2
    rows = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["response/length"] > 0 for r in rows)
    assert (ppo_dir / "reward_kl.png").stat().st_size > 1000
    assert len((ppo_dir / "eval_samples_after.jsonl").read_text().splitlines()) == 4 * 2  # eval_samples_per_prompt: 2


@pytest.mark.parametrize("recipe, extra", [("ppo_drlaif.yaml", []),
                                           ("ppo_genrm.yaml", ["reward.judge.path=null", "reward.judge.model=smollm2-135m-instruct"])])
def test_judge_ppo_recipes_smoke(tmp_path, smollm2_dir, recipe, extra):
    """The judge PPO recipes at a smoke size: one update of two prompts, the judge on the
    policy's base with its adapters off (the genrm recipe's trained judge swapped for the
    zero-shot base model, which needs no training run)."""
    out = tmp_path / "ppo"
    rlhf("ppo", f"recipes/{recipe}", *extra, f"output_dir={out}", "updates=1", "batch_size=2", "eval_prompts.max_items=2",
         "eval_samples_per_prompt=1", "sampling.max_new_tokens=6")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["reward/invalid_fraction"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"]["invalid"] == 0 and summary["eval_change"]["prompts"] == 2


def test_train_judge_recipe_smoke(tmp_path, smollm2_dir):
    out = tmp_path / "judge"
    rlhf("train-judge", "recipes/train_judge.yaml", "data.max_items=2", "eval_data.max_items=2", "max_steps=1",
         "micro_batch_size=2", "grad_accum_steps=1", f"output_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_shot"]["pairs"] == 2 and summary["final"]["pairs"] == 2
    assert json.loads((out / "judge" / "judge.json").read_text())["base_model"] == "smollm2-135m-instruct"

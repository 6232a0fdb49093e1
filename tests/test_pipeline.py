"""Reward model → PPO in one recipe, on a tiny model; a second run reuses and resumes."""

from __future__ import annotations

import json

import pytest

from conftest import HH_TEST
from rlhf.config import ConfigError, load_config
from rlhf.pipeline import PipelineConfig, run
from test_train_rm import write_toy


def test_pipeline_trains_rm_then_ppo_and_resumes(tiny_llama_dir, tmp_path, capsys, device):
    toy = write_toy(tmp_path / "toy.jsonl", 16, seed=1)
    rm_dir = tmp_path / "rm"
    cfg = load_config(PipelineConfig, None, [
        f"run_dir={tmp_path}", f"rm.model.name={tiny_llama_dir}", f"rm.model.device={device}", "rm.model.lora.r=4", f"rm.data.path={toy}", "rm.data.split=all",
        "rm.eval_data=null", "rm.max_steps=1", "rm.autocast=none", f"rm.output_dir={rm_dir}",
        f"ppo.model.name={tiny_llama_dir}", f"ppo.model.device={device}", "ppo.model.lora.r=4",
        f"ppo.reward={{type: bt, path: {rm_dir}/model, autocast: none, device: {device}}}",
        f"ppo.value_head_init={rm_dir}/model", f"ppo.prompts.path={HH_TEST}", f"ppo.eval_prompts.path={HH_TEST}",
        "ppo.eval_prompts.max_items=2", "ppo.updates=2", "ppo.batch_size=4", "ppo.sampling.max_new_tokens=6",
        "ppo.autocast=none", f"ppo.output_dir={tmp_path / 'ppo'}",
    ])
    summary = run(cfg)
    assert summary["reward_model"]["steps"] == 1 and summary["ppo"]["updates"] == 2
    assert set(summary["ppo"]["eval_before"]) == {"reward_mean", "kl_mean", "prompts", "samples_per_prompt", "invalid"}
    assert (tmp_path / "ppo" / "reward_kl.png").is_file() and (tmp_path / "summary.json").is_file()
    out = capsys.readouterr().out
    assert "held-out prompts: reward" in out
    # Interrupted or finished, a second run reuses the reward model and resumes PPO.
    again = run(cfg)
    out = capsys.readouterr().out
    assert "reusing the reward model" in out and "resuming from" in out
    assert again["ppo"]["eval_before"] == summary["ppo"]["eval_before"]
    metrics = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_pipeline_rejects_unwired_reward(tmp_path):
    with pytest.raises(ConfigError, match="ppo.reward must be"):
        load_config(PipelineConfig, None, ["rm.output_dir=a", "ppo.reward={type: bt, path: b/model}"])


def test_7b_qlora_recipe_runs_at_tiny_size(tiny_llama_dir, tmp_path, capsys, device):
    """recipes/hh_qlora_7b.yaml with only the model and sizes swapped for a tiny one: NF4 base,
    activation checkpointing, the reward model as an adapter on the shared 4-bit base."""
    from conftest import REPO

    toy = write_toy(tmp_path / "toy.jsonl", 8, seed=1)
    rm_dir = tmp_path / "rm"
    cfg = load_config(PipelineConfig, REPO / "recipes" / "hh_qlora_7b.yaml", [
        f"run_dir={tmp_path}", f"rm.model.name={tiny_llama_dir}", "rm.model.lora.r=4", "ppo.model.lora.r=4",
        f"rm.data.path={toy}", "rm.data.split=all", "rm.eval_data=null", "rm.max_steps=1", f"rm.output_dir={rm_dir}",
        f"rm.model.device={device}", f"ppo.model.device={device}", f"ppo.reward.device={device}",
        f"ppo.model.name={tiny_llama_dir}", f"ppo.reward.path={rm_dir}/model", f"ppo.value_head_init={rm_dir}/model",
        "ppo.eval_prompts.max_items=2", "ppo.updates=1", "ppo.batch_size=4", "ppo.num_minibatches=2", "ppo.grad_accum_steps=2",
        "ppo.sampling.max_new_tokens=4", f"ppo.output_dir={tmp_path / 'ppo'}", "ppo.checkpoint_every=1",
    ])
    assert cfg.ppo.model.quantization == "4bit" and cfg.ppo.model.gradient_checkpointing
    summary = run(cfg)
    assert summary["ppo"]["updates"] == 1
    assert "a frozen adapter on the policy's base" in capsys.readouterr().out

"""PPO with generative judges as the reward, on a tiny model: d-RLAIF and a GenRM's log-odds
against references sampled from the starting policy, both running on the policy's shared base
(adapters off), and the references cached in the run directory for a resumed run."""

from __future__ import annotations

import json

import pytest

from rlhf.ppo import run
from test_ppo import tiny_ppo_cfg

# min_mass 0: a random tiny model puts almost no probability on the score or verdict tokens.
DRLAIF = "reward={type: drlaif, model: %s, min_mass: 0.0, max_prompt_tokens: 32, max_completion_tokens: 16}"
GENRM = ("reward={type: judge_reward, judge: {model: %s, min_mass: 0.0, max_prompt_tokens: 32, max_completion_tokens: 16}, "
         "reference: policy, reference_sampling: {max_new_tokens: 6, temperature: 0.7}}")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_with_drlaif_reward_runs_on_the_shared_base(tiny_llama_dir, tmp_path, capsys):
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, DRLAIF % tiny_llama_dir)
    summary = run(cfg)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    # d-RLAIF rewards lie in [-1, 1]; every sample was judged
    assert all(-1 <= r["reward/raw_mean"] <= 1 and r["reward/invalid_fraction"] == 0 for r in rows)
    assert -1 <= summary["eval_before"]["reward_mean"] <= 1 and summary["eval_before"]["invalid"] == 0


def test_ppo_with_genrm_reward_samples_references_once_and_resumes_with_them(tiny_llama_dir, tmp_path):
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, GENRM % tiny_llama_dir, "updates=1", "checkpoint_every=1", "eval_prompts=null")
    run(cfg)
    run_dir = tmp_path / "run"
    [cache] = run_dir.glob("judge_references-*.jsonl")
    first = cache.read_text().splitlines()
    assert len(first) == 4  # one reference per prompt of the one update
    rows = _metrics(run_dir)
    # r = log p/(1-p) with p clipped to [1e-4, 1 - 1e-4]
    assert abs(rows[0]["reward/raw_mean"]) <= 9.22
    import dataclasses

    run(dataclasses.replace(cfg, updates=2, resume=True))
    after = cache.read_text().splitlines()
    assert after[:4] == first  # the first update's prompts keep their references
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]


def test_judge_reward_with_policy_references_needs_the_policy(tiny_llama_dir):
    from rewards.registry import build_provider

    with pytest.raises(Exception, match="polic"):
        build_provider({"type": "judge_reward", "judge": {"model": str(tiny_llama_dir)}, "reference": "policy"}).score(["hi"], ["there"])

"""The reward-ablation runner on a tiny model: same budget per variant, table, chart, resume."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.ablation import AblationConfig, EvalSet, Variant, run
from rlhf.config import DataConfig, load_config
from rlhf.train_rm import TrainRMConfig
from test_train_rm import write_toy


def test_ablation_writes_table_chart_and_resumes(tiny_llama_dir, tmp_path, capsys, device):
    train = write_toy(tmp_path / "train.jsonl", 32, seed=1)
    ood = tmp_path / "ood.jsonl"
    rows = [json.loads(line) | {"subset": "a" if i % 2 else "b"} for i, line in enumerate(open(write_toy(tmp_path / "o.jsonl", 12, seed=5)))]
    ood.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AblationConfig(
        train=TrainRMConfig(model=load_config(TrainRMConfig, None, [f"model.name={tiny_llama_dir}", f"model.device={device}"]).model,
                            data=DataConfig(path=str(train), split="all"), eval_data=None, micro_batch_size=8,
                            grad_accum_steps=1, max_steps=2, autocast="none", max_prompt_tokens=32, max_completion_tokens=16),
        variants=(Variant("BT"), Variant("GRM-sft", "grm", "sft")),
        eval_sets=(EvalSet("toy", DataConfig(path=str(train), split="all")), EvalSet("ood", DataConfig(path=str(ood), split="all"))),
        output_dir=str(tmp_path / "abl"),
    )
    torch.manual_seed(0)
    results = run(cfg)
    out = tmp_path / "abl"
    assert set(results) == {"BT", "GRM-sft", "(heuristic) shorter wins"}
    # Same data and budget for every variant.
    trained = [r for name, r in results.items() if not name.startswith("(heuristic)")]
    assert {r["train"]["steps"] for r in trained} == {2}
    assert {r["train"]["train_pairs"] for r in trained} == {32}
    # The heuristic row is exactly "fraction of pairs whose chosen side is shorter" (ties half).
    rows = [json.loads(line) for line in open(ood)]
    expected = sum(1.0 if len(r["chosen"]) < len(r["rejected"]) else 0.5 if len(r["chosen"]) == len(r["rejected"]) else 0.0 for r in rows) / len(rows)
    assert results["(heuristic) shorter wins"]["eval"]["ood"]["all"]["accuracy"] == pytest.approx(expected)
    table = (out / "results.md").read_text()
    for label in ("| BT |", "| GRM-sft |", "toy (32)", "ood (12)", "ood a (6)", "ood b (6)"):
        assert label in table, label
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "GRM-sft" / "model" / "reward_model.json").read_text())["objective"] == "grm"
    # A second run reuses the finished variants instead of training again.
    capsys.readouterr()
    again = run(cfg)
    assert "already done" in capsys.readouterr().out
    assert again["BT"]["eval"] == results["BT"]["eval"]


def test_shipped_ablation_recipe_loads():
    from pathlib import Path

    cfg = load_config(AblationConfig, Path(__file__).resolve().parents[1] / "recipes" / "reward_ablation.yaml")
    assert [v.name for v in cfg.variants] == ["BT", "GRM-sft", "GRM-dpo", "GRM-dpo_noref"]
    assert cfg.train.model.lora.enabled and cfg.train.head == "mlp"
    assert [e.name for e in cfg.eval_sets] == ["HH test", "HHH"]


def test_ablation_judge_rows_score_like_eval_rm_and_are_reused(tiny_llama_dir, tmp_path, capsys):
    """Judge rows: a zero-shot GenRM and d-RLAIF, and a GenRM trained first by train-judge, each
    scored on the eval sets exactly as `evaluate` scores it on its own; the table carries them;
    a second run reuses them."""
    from rewards.registry import build_judge, build_provider
    from rlhf.ablation import JudgeVariant
    from rlhf.evaluation import evaluate
    from rlhf.train_judge import TrainJudgeConfig
    from rlhf.train_rm import load_split_pairs

    toy = write_toy(tmp_path / "toy.jsonl", 6, seed=2)
    data = DataConfig(path=str(toy), split="all")
    # min_mass 0: a random tiny model puts almost no mass on the verdict and score tokens
    genrm = build_judge({"type": "genrm", "model": str(tiny_llama_dir), "device": "cpu", "autocast": "none", "max_prompt_tokens": 32, "max_completion_tokens": 16, "min_mass": 0.0})
    drlaif_spec = {"type": "drlaif", "model": str(tiny_llama_dir), "device": "cpu", "autocast": "none", "max_prompt_tokens": 32, "max_completion_tokens": 16, "min_mass": 0.0}
    train = load_config(TrainJudgeConfig, None, [f"model.name={tiny_llama_dir}", "model.device=cpu", "model.lora.r=4", f"data.path={toy}",
                                                 "data.split=all", "eval_data=null", "max_steps=1", "micro_batch_size=4", "grad_accum_steps=1",
                                                 "max_prompt_tokens=32", "max_completion_tokens=16", "autocast=none"])
    cfg = AblationConfig(
        train=TrainRMConfig(), variants=(), eval_sets=(EvalSet("toy", data),), output_dir=str(tmp_path / "abl"), length_baseline=False,
        judges=(JudgeVariant("GenRM", genrm_cfg := build_judge_config(genrm)), JudgeVariant("d-RLAIF", build_provider_config(drlaif_spec)),
                JudgeVariant("GenRM-SFT", genrm_cfg, train)),
    )
    results = run(cfg)
    pairs = load_split_pairs(data)
    assert results["GenRM"]["eval"]["toy"]["all"] == pytest.approx(evaluate(genrm, pairs)["all"])
    assert results["d-RLAIF"]["eval"]["toy"]["all"] == pytest.approx(evaluate(build_provider(drlaif_spec), pairs)["all"])
    assert results["GenRM"]["eval"]["toy"]["all"]["pairs"] == 6
    assert "order_disagreement" in results["GenRM"]["eval"]["toy"]["all"]
    trained = tmp_path / "abl" / "GenRM-SFT" / "train" / "judge" / "judge.json"
    assert trained.is_file() and results["GenRM-SFT"]["train"]["train_pairs"] == 6
    table = (tmp_path / "abl" / "results.md").read_text()
    for label in ("| GenRM |", "| d-RLAIF |", "| GenRM-SFT |", "order disagreement"):
        assert label in table, label
    capsys.readouterr()
    again = run(cfg)
    assert capsys.readouterr().out.count("already done") == 3
    assert again["GenRM-SFT"]["eval"] == results["GenRM-SFT"]["eval"]


def build_judge_config(judge):
    """The GenRMConfig a test judge was built from (rebuilt from its model directory)."""
    from rewards.genrm import GenRMConfig

    return GenRMConfig(model=str(judge.lm.model.config._name_or_path), device="cpu", autocast="none", max_prompt_tokens=32, max_completion_tokens=16, min_mass=0.0)


def build_provider_config(spec):
    from rlhf.config import from_dict
    from rewards.registry import RewardConfig

    return from_dict(RewardConfig, dict(spec))

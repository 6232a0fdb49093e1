"""The `rlhf` command end to end (in-process through `main`, plus one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import HH_TEST, REPO
from rlhf.cli import main


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "rlhf", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("likelihood-demo", "models", "data"):
        assert cmd in out


def test_recipe_command_help_lists_keys_with_docs(capsys):
    assert main(["likelihood-demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "model.lora.r" in out and "LoRA rank" in out and "data.split" in out


def test_data_check_counts_real_hh_file(capsys):
    assert main(["data", "check", str(HH_TEST)]) == 0
    out = capsys.readouterr().out
    assert "2,312 preference pairs" in out
    assert "skipped invalid rows: 0" in out


def test_data_check_prompts_file(capsys):
    path = HH_TEST.parents[2] / "fastchat" / "mt_bench" / "question.jsonl"
    assert main(["data", "check", str(path)]) == 0
    assert "80 prompts" in capsys.readouterr().out


def test_data_check_reports_malformed_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rej\n')
    assert main(["data", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err
    assert main(["data", "check", str(bad), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "1 preference pairs" in out and "skipped invalid rows: 1" in out and f"{bad}:2" in out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["likelihood-demo", str(REPO / "recipes" / "likelihood_demo.yaml"), "num_pair=3"]) == 2
    assert "did you mean 'num_pairs'" in capsys.readouterr().err


def test_ppo_config_check_fails_in_one_line_without_traceback(tmp_path):
    """PPOConfig's own check (batch_size divisible by num_minibatches × grad_accum_steps) stops
    `rlhf ppo` with one line on stderr naming the recipe, line and key, before any model loads
    (the model named here does not exist, so reaching the loader would fail differently)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  name: /nonexistent/model\nreward:\n  type: function\n  path: reward_fns:length_reward\nbatch_size: 8\nnum_minibatches: 3\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf", "ppo", str(recipe), f"output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {recipe}:6: batch_size ") and "num_minibatches" in lines[0], lines[0]
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_models_lists_default_alias(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "model cache:" in out


def test_likelihood_demo_job_on_tiny_model(tiny_llama_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "likelihood-demo",
        str(REPO / "recipes" / "likelihood_demo.yaml"),
        f"model.name={tiny_llama_dir}",
        f"data.path={HH_TEST}",
        "num_prompts=2",
        "num_pairs=5",
        "batch_size=4",
        "sampling.max_new_tokens=4",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pairs_scored"] == 5
    assert 0.0 <= summary["accuracy_sum_logp"] <= 1.0
    scores = [json.loads(line) for line in (run_dir / "pair_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 5 and all(s["logp_chosen"] < 0 and s["logp_rejected"] < 0 for s in scores)
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_pairs"] == 5 and config["model"]["name"] == str(tiny_llama_dir)
    assert "run directory" in capsys.readouterr().out


@pytest.mark.slow
def test_likelihood_demo_recipe_smoke_on_real_model(tmp_path):
    """The README's main job at a smoke size, through the installed console script."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "likelihood-demo", "recipes/likelihood_demo.yaml", "num_prompts=1", "num_pairs=8",
         "sampling.max_new_tokens=16", f"run_dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pairs_scored"] == 8 and summary["model"] == "smollm2-135m-instruct"

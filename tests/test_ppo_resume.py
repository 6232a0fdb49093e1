"""A PPO run killed mid-way and resumed with `--resume` ends exactly where an uninterrupted
run ends: same trained tensors, same metrics for every update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import HH_TEST, REPO


# Enough updates that the kill (after checkpoint 2 appears) lands well before the end: a tiny
# model's update takes tens of milliseconds, so a short run could finish between two polls.
UPDATES = 40


def overrides(tiny_llama_dir, out):
    return [f"model.name={tiny_llama_dir}", "model.lora.r=4", "reward={type: function, path: 'reward_fns:length_reward'}",
            f"prompts.path={HH_TEST}", "eval_prompts=null", f"updates={UPDATES}", "checkpoint_every=1", "batch_size=4",
            "sampling.max_new_tokens=6", "autocast=none", "lr=1e-2", f"output_dir={out}"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), e.get("PYTHONPATH", "")])  # reward_fns
    return e


def test_killed_run_resumes_exactly(tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-m", "rlhf", "ppo"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd + overrides(tiny_llama_dir, full), cwd=REPO, env=env(), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd + overrides(tiny_llama_dir, killed), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "update-000002" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / f"update-{UPDATES:06d}").exists()  # it really stopped early

    resumed = subprocess.run(cmd + overrides(tiny_llama_dir, tmp_path / "ignored") + ["--resume", str(killed)],
                             cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout

    a = load_file(str(full / "checkpoints" / f"update-{UPDATES:06d}" / "trainable.safetensors"))
    b = load_file(str(killed / "checkpoints" / f"update-{UPDATES:06d}" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == list(range(1, UPDATES + 1))
    for x, y in zip(ma, mb):
        assert x["reward/raw_mean"] == y["reward/raw_mean"] and x["kl/k1"] == y["kl/k1"] and x["loss/value"] == y["loss/value"]

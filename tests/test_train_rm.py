"""Reward-model training end to end on tiny models: a toy preference set that one feature
decides must be learned; GRM variants train every trainable parameter; the saved model is a
provider; the bias is centred."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from rewards import build_provider
from rlhf.config import DataConfig, LoraConfig, ModelConfig
from rlhf.train_rm import GRMConfig, TrainRMConfig, length_grouped_batches, run

WORDS = "apple river stone cloud green table music paper window garden light orange silver tiger ocean".split()


def write_toy(path, n, seed):
    """Chosen completions contain 'excellent', rejected ones 'terrible', at a random position
    among random filler words: that one feature decides every preference."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            def completion(word):
                filler = rng.sample(WORDS, 5)
                filler.insert(rng.randrange(6), word)
                return " ".join(filler)
            row = {"prompt": f"Describe thing number {i}.", "chosen": completion("excellent"), "rejected": completion("terrible")}
            fh.write(json.dumps(row) + "\n")
    return path


def toy_cfg(tiny_llama_dir, tmp_path, device, **kw):
    train = write_toy(tmp_path / "train.jsonl", 192, seed=1)
    test = write_toy(tmp_path / "test.jsonl", 64, seed=2)
    base = dict(
        model=ModelConfig(name=str(tiny_llama_dir), device=str(device)),
        data=DataConfig(path=str(train), split="all"),
        eval_data=DataConfig(path=str(test), split="all"),
        micro_batch_size=16,
        grad_accum_steps=1,
        epochs=3,
        lr=2e-3,
        warmup_ratio=0.0,
        max_prompt_tokens=32,
        max_completion_tokens=16,
        autocast="none",
        output_dir=str(tmp_path / "run"),
        log_every=4,
    )
    base.update(kw)
    return TrainRMConfig(**base)


def test_bt_learns_a_deciding_feature_and_is_centred(tiny_llama_dir, tmp_path, device):
    from rewards.reward_model import load_reward_model

    torch.manual_seed(0)
    cfg = toy_cfg(tiny_llama_dir, tmp_path, device)
    summary = run(cfg)
    assert summary["eval"]["all"]["accuracy"] >= 0.9, summary["eval"]
    assert summary["eval"]["all"]["mean_margin"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["bt_loss"] < metrics[0]["bt_loss"]
    # The saved model is a provider by path, and training-set rewards average zero after centring.
    provider = build_provider({"type": "bt", "path": summary["model_dir"], "autocast": "none", "device": str(device)})
    rows = [json.loads(line) for line in open(cfg.data.path)]
    prompts = [r["prompt"] for r in rows]
    r = torch.cat([provider.score(prompts, [x["chosen"] for x in rows]).rewards, provider.score(prompts, [x["rejected"] for x in rows]).rewards])
    assert abs(r.mean().item()) < 1e-3 * max(1.0, r.abs().mean().item())
    # BT leaves the head's bias at 0 (it gets no gradient), so the saved bias is the shift alone.
    assert summary["bias_shift"] != 0
    assert load_reward_model(summary["model_dir"], device=str(device)).head.bias.item() == pytest.approx(-summary["bias_shift"])


@pytest.mark.parametrize("regularizer", ["sft", "dpo", "dpo_noref"])
def test_grm_variants_train_every_trainable_parameter(tiny_llama_dir, tmp_path, device, regularizer):
    from rewards.reward_model import load_reward_model, new_reward_model

    cfg = toy_cfg(
        tiny_llama_dir, tmp_path, device,
        model=ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4), device=str(device)),
        objective="grm", grm=GRMConfig(regularizer=regularizer, alpha=0.5), head="mlp",
        epochs=1, max_steps=3, eval_data=None, center_bias=False,
    )
    torch.manual_seed(0)
    initial = new_reward_model(cfg.model, cfg.head)  # same seed → same initial head and adapter
    # Every parameter the loop trains: LoRA, and the head but for its final bias, which the loop
    # freezes (BT gives it zero gradient; centering sets it after training).
    final_bias = f"head.net.{len(initial.head.net) - 1}.bias"
    init_state = {n: p.detach().clone() for n, p in initial.named_parameters() if p.requires_grad and n != final_bias}
    torch.manual_seed(0)
    summary = run(cfg)
    trained = load_reward_model(summary["model_dir"], device=str(device))
    final = dict(trained.named_parameters())
    assert init_state.keys() == {n for n in final if n in init_state}
    unchanged = [n for n, p in init_state.items() if torch.allclose(p, final[n])]
    assert not unchanged, unchanged
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "reg_loss" in metrics[-1] and metrics[-1]["reg_loss"] > 0
    assert json.loads((tmp_path / "run" / "model" / "reward_model.json").read_text())["objective"] == "grm"


def test_full_finetune_grm_dpo_runs(tiny_llama_dir, tmp_path, device):
    cfg = toy_cfg(tiny_llama_dir, tmp_path, device, objective="grm", grm=GRMConfig(regularizer="dpo"), max_steps=2, eval_data=None)
    summary = run(cfg)
    assert summary["steps"] == 2


def test_gradient_accumulation_matches_one_big_batch(tiny_llama_dir, tmp_path, device):
    """micro-batch 4 × accumulation 2 takes the same optimizer step as 8 × 1 (TRL's invariant test).
    With a length-sorted data order the same 8 pairs land in one step either way."""
    from rewards.reward_model import load_reward_model

    states = []
    for mb, acc in [(8, 1), (4, 2)]:
        (tmp_path / f"{mb}x{acc}").mkdir()
        torch.manual_seed(0)
        cfg = toy_cfg(tiny_llama_dir, tmp_path / f"{mb}x{acc}", device, micro_batch_size=mb, grad_accum_steps=acc, max_steps=1,
                      eval_data=None, center_bias=False, data=DataConfig(path=str(write_toy(tmp_path / f"d{mb}.jsonl", 8, 3)), split="all"))
        run(cfg)
        states.append({n: p.clone() for n, p in load_reward_model(tmp_path / f"{mb}x{acc}" / "run" / "model", device=str(device)).named_parameters()})
    for n in states[0]:
        # Adam's first step is lr·g/(|g| + ε): an element whose gradient is at float-noise level
        # (different padding widths round differently) can move by up to lr either way. Allow
        # that on at most 0.1% of the elements; every other element must agree to 1e-5.
        d = (states[0][n] - states[1][n]).abs()
        assert float(d.max()) <= 2 * 2e-3 and int((d > 1e-5).sum()) <= max(1, d.numel() // 1000), n


def test_length_grouped_batches_cover_every_index_once():
    gen = torch.Generator().manual_seed(0)
    lengths = [random.Random(i).randrange(100) for i in range(103)]
    batches = length_grouped_batches(lengths, 8, gen)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert all(len(b) <= 8 for b in batches)
    # Inside a batch, lengths are sorted (descending): padding is minimal.
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)


def test_qlora_reward_model_trains_saves_and_scores(tiny_llama_dir, tmp_path, device):
    import bitsandbytes as bnb

    from rewards.reward_model import load_reward_model

    cfg = toy_cfg(
        tiny_llama_dir, tmp_path, device,
        model=ModelConfig(name=str(tiny_llama_dir), quantization="4bit", lora=LoraConfig(enabled=True, r=4), device=str(device)),
        max_steps=2, eval_data=None,
    )
    summary = run(cfg)
    rm = load_reward_model(summary["model_dir"], device=str(device))
    assert rm.meta.quantization == "4bit"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in rm.modules())  # reloaded quantized
    with torch.no_grad():
        r = rm(rm.encode(["Describe thing number 1."], ["apple excellent river"]))
    assert torch.isfinite(r).all()


@pytest.mark.parametrize("backend, artifact", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_trackers_record_the_logged_metrics(tiny_llama_dir, tmp_path, monkeypatch, device, backend, artifact):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = toy_cfg(tiny_llama_dir, tmp_path, device, max_steps=2, log_every=1, eval_data=None, tracker=backend)
    run(cfg)
    run_dir = tmp_path / "run"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = (run_dir / artifact).glob("events.out.tfevents.*")
        acc = EventAccumulator(str(events))
        acc.Reload()
        assert set(acc.Tags()["scalars"]) == set(logged[0]) - {"step"}
        for key in ("bt_loss", "accuracy", "lr"):
            assert [(e.step, e.value) for e in acc.Scalars(key)] == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in logged], key
    else:  # an offline run: its .wandb log holds every metric key (its record format is wandb's own)
        (log,) = (run_dir / artifact).glob("offline-run-*/run-*.wandb")
        keys = [key for key in logged[0] if key != "step"]
        # wandb's service process may still be writing the log when finish() has returned.
        deadline = time.monotonic() + 60
        while (missing := [k for k in keys if k.encode() not in log.read_bytes()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not missing, f"{log} lacks {missing}"


def test_eval_rm_cli_reports_subsets(tiny_llama_dir, tmp_path, capsys, device):
    from rlhf.cli import main

    summary = run(toy_cfg(tiny_llama_dir, tmp_path, device, max_steps=2, eval_data=None))
    data = tmp_path / "subsets.jsonl"
    rows = [json.loads(line) | {"subset": "odd" if i % 2 else "even"} for i, line in enumerate(open(write_toy(tmp_path / "e.jsonl", 10, 7)))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json = tmp_path / "eval.json"
    assert main(["eval-rm", summary["model_dir"], str(data), f"{data}@test", "--out", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert f"| {data} | all | 10 |" in table and f"| {data} | odd | 5 |" in table and f"| {data} | even | 5 |" in table
    result = json.loads(out_json.read_text())
    # The same numbers from scoring both sides with the provider as the CLI builds it (its
    # default batch size, default autocast): accuracy counts ties half, margin = r_chosen − r_rejected.
    provider = build_provider({"type": "bt", "path": summary["model_dir"], "batch_size": 16})
    prompts = [r["prompt"] for r in rows]
    margins = provider.score(prompts, [r["chosen"] for r in rows]).rewards - provider.score(prompts, [r["rejected"] for r in rows]).rewards
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()
    for subset, idx in [("all", range(10)), ("even", range(0, 10, 2)), ("odd", range(1, 10, 2))]:
        idx = list(idx)
        assert result[str(data)][subset]["pairs"] == len(idx)
        assert result[str(data)][subset]["accuracy"] == pytest.approx(wins[idx].mean().item()), subset
        assert result[str(data)][subset]["mean_margin"] == pytest.approx(margins[idx].mean().item(), abs=1e-6), subset
    assert result[str(data)]["all"]["invalid"] == 0
    assert main(["eval-rm", str(tmp_path), str(data)]) == 2  # not a reward model directory
    assert "rlhf train-rm" in capsys.readouterr().err

"""`rlhf train-judge` on a tiny model: the SFT examples (both orders, right targets, the prompt
GenRM feeds at inference), TRL's completion-only labels, an overfit that raises P(chosen ≻
rejected), STaR's filter and rationalization with a stubbed sampler, STaR-DPO pairs and one DPO
step, and resuming iteration by iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewards.judge_format import read_judge_meta, verdict_target
from rewards.judge_lm import JudgeLM
from rlhf import train_judge
from rlhf.config import DataConfig, LoraConfig, ModelConfig, SamplingConfig
from rlhf.data import PreferencePair
from rlhf.train_judge import (
    TrainJudgeConfig,
    collect_rationales,
    direct_rows,
    judge_tasks,
    sampled_verdict,
    star_dpo_rows,
    star_rows,
)

PAIRS = [
    PreferencePair("How do I bake bread?", "Mix flour, water, yeast and salt; knead, let it rise, bake at 230 C.", "No idea, buy some."),
    PreferencePair([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again, politely."}],
                   "Hello, it is nice to meet you.", "whatever"),
    PreferencePair("What is 2 + 2?", "2 + 2 = 4.", "It is 5, obviously."),
    PreferencePair("Name a colour.", "Blue.", "I refuse to answer that question because colours are boring and so are you."),
]


def write_pairs(path, pairs=PAIRS):
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return str(path)


def cfg_for(tiny_llama_dir, tmp_path, device, **kw):
    data = write_pairs(tmp_path / "pairs.jsonl")
    base = dict(
        model=ModelConfig(name=str(tiny_llama_dir), device=str(device), lora=LoraConfig(enabled=True, r=8, alpha=16)),
        data=DataConfig(path=data, split="all"),
        eval_data=DataConfig(path=data, split="all"),
        max_prompt_tokens=24,
        max_completion_tokens=12,
        micro_batch_size=8,
        grad_accum_steps=1,
        lr=1e-2,
        warmup_ratio=0.0,
        star_sampling=SamplingConfig(max_new_tokens=4, temperature=1.0),
        eval_cot_samples=1,
        autocast="none",
        output_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainJudgeConfig(**base)


@pytest.fixture
def lm(tiny_llama_dir, device):
    return JudgeLM.load(str(tiny_llama_dir), device=str(device), autocast_mode="none")


# ---- the SFT examples ------------------------------------------------------------------------


def test_examples_have_both_orders_right_targets_and_genrms_prompt(tiny_llama_dir, tmp_path, device, lm):
    from rewards.genrm import GenRMJudge

    cfg = cfg_for(tiny_llama_dir, tmp_path, device)
    tasks = judge_tasks(lm, PAIRS, cfg)
    rows = direct_rows(tasks)
    assert len(rows) == 2 * len(PAIRS)
    for i, p in enumerate(PAIRS):
        a_first, b_first = rows[2 * i], rows[2 * i + 1]
        chosen = lm.clip(p.chosen, cfg.max_completion_tokens)
        assert a_first["completion"] == "[[A]]" and f"Assistant A's Answer]\n{chosen}\n" in a_first["prompt"]
        assert b_first["completion"] == "[[B]]" and f"Assistant B's Answer]\n{chosen}\n" in b_first["prompt"]
    # The last pair's rejected answer is longer than max_completion_tokens: clipped as GenRM clips it.
    assert PAIRS[3].rejected not in rows[6]["prompt"] and lm.clip(PAIRS[3].rejected, cfg.max_completion_tokens) in rows[6]["prompt"]

    # GenRM, both orders, renders exactly these prompts (first order: chosen as A; swapped: chosen as B).
    seen = []
    encode = lm.encode
    lm.encode = lambda texts, append=None: (seen.extend(texts), encode(texts, append))[1]
    judge = GenRMJudge(lm, mode="direct", batch_size=64, max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens)
    judge.prefer([p.prompt for p in PAIRS], [p.chosen for p in PAIRS], [p.rejected for p in PAIRS])
    assert sorted(seen) == sorted(r["prompt"] for r in rows)


def test_trl_masks_the_prompt_and_trains_the_verdict_where_genrm_reads_it(tiny_llama_dir, tmp_path, device, lm):
    from policies.models import load_model

    cfg = cfg_for(tiny_llama_dir, tmp_path, device)
    rows = direct_rows(judge_tasks(lm, PAIRS[:2], cfg))
    loaded = load_model(cfg.model)
    trainer = train_judge.sft_trainer(loaded.model, loaded.tokenizer, rows, cfg, tmp_path / "trainer")
    tok = loaded.tokenizer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for i, row in enumerate(rows):
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        labels = batch["labels"][i][batch["attention_mask"][i].bool()].tolist()
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids  # trained on the context the judge sees at inference
        assert labels[:n] == [-100] * n  # no loss on any prompt token
        assert labels[n:] == ids[n:] and tok.decode(ids[n:]) == row["completion"] + tok.eos_token
        # GenRM reads the verdict one token after the prompt + "[[": the token trained there is the verdict.
        open_ids = tok("[[", add_special_tokens=False)["input_ids"]
        assert ids[n:n + len(open_ids)] == open_ids and tok.decode(ids[n + len(open_ids)]) == row["completion"][2]
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 4


def test_completion_loss_equals_trls_loss(tiny_llama_dir, tmp_path, device, lm):
    from policies.models import load_model
    from trl import SFTTrainer

    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star")
    rows = direct_rows(judge_tasks(lm, PAIRS[:1], cfg))
    rows[1]["completion"] = verdict_target(False, "A longer rationale, so that rows differ in length.")
    loaded = load_model(cfg.model)
    trainer = train_judge.sft_trainer(loaded.model, loaded.tokenizer, rows, cfg, tmp_path / "trainer")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(1)
    for p in loaded.model.parameters():  # LoRA B starts at zero: move it so that the adapter counts
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    ours = train_judge.completion_loss(loaded.model, dict(batch))
    trls = SFTTrainer.compute_loss(trainer, loaded.model, dict(batch))
    assert ours.item() == pytest.approx(trls.item(), rel=1e-5)
    # With gradient accumulation, TRL divides the sum by the tokens of the whole accumulated batch.
    labelled = int((batch["labels"] != -100).sum())
    assert train_judge.completion_loss(loaded.model, dict(batch), 37).item() == pytest.approx(ours.item() * labelled / 37, rel=1e-5)


def test_trl_prompt_drops_a_bos_the_tokenizer_adds_itself(lm):
    tok = lm.tokenizer
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert train_judge.trl_prompt(tok, text) == text  # SmolLM2 adds no special tokens

    class AddsBos:  # a Llama-3-style tokenizer: tok(text) puts a BOS in front
        bos_token = "<|im_start|>"

        def __call__(self, t, add_special_tokens=True):
            ids = tok(t, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([tok.convert_tokens_to_ids(self.bos_token)] if add_special_tokens else []) + ids}

    stripped = train_judge.trl_prompt(AddsBos(), text)
    assert stripped == text[len("<|im_start|>"):]
    assert AddsBos()(stripped)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


# ---- SFT end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_llama_dir(tmp_path_factory):
    """tiny_llama_dir's model with weights drawn 10x wider (initializer_range 0.2). At the usual
    0.02 the frozen tied embeddings cap the logits near ±1.3 and the random attention averages
    the ~250-token judge prompt into nearly one state whichever answer is shown first: a few
    steps can't teach it to tell the two orders apart. At 0.2 they can."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import SMOLLM2_TOKENIZER

    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sharp-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_run(sharp_llama_dir, tmp_path_factory):
    """Direct SFT overfit on the 4 pairs (both orders), evaluated on the same pairs (every
    verdict read, whatever its mass: the zero-shot model puts almost none on "A" or "B")."""
    tmp_path = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    cfg = cfg_for(sharp_llama_dir, tmp_path, torch.device("cuda" if torch.cuda.is_available() else "cpu"), epochs=12, lr=2e-2, min_mass=0.0)
    return cfg, train_judge.run(cfg)


def test_sft_run_saves_a_judge_genrm_loads(sft_run):
    from rewards.genrm import GenRMConfig, build_genrm

    cfg, summary = sft_run
    judge_dir = summary["judge_dir"]
    meta = read_judge_meta(judge_dir)
    assert (meta.mode, meta.max_prompt_tokens, meta.max_completion_tokens, meta.base_model) == ("direct", 24, 12, cfg.model.name)
    files = {p.name for p in (Path(judge_dir) / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    judge = build_genrm(GenRMConfig(path=judge_dir, device=cfg.model.device, autocast="none", min_mass=0.0))
    assert judge.mode == "direct" and judge.max_completion_tokens == 12
    res = judge.prefer([p.prompt for p in PAIRS], [p.chosen for p in PAIRS], [p.rejected for p in PAIRS])
    assert res.valid.all() and (res.prob_first > 0.5).all()
    # Iteration 0 (zero-shot) and 1 are logged once each, with accuracy and standard error.
    metrics = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and all("eval_accuracy_se" in m for m in metrics)
    zero, final = summary["zero_shot"], summary["final"]
    assert final["accuracy"] == 1.0 and final["invalid"] == 0 and final["accuracy_se"] == 0.0
    assert zero["accuracy"] < 1.0 and zero["accuracy_se"] > 0


def test_sft_overfit_raises_p_chosen_on_its_pairs(sft_run, sharp_llama_dir):
    from rewards.genrm import GenRMJudge

    cfg, summary = sft_run
    args = dict(mode="direct", min_mass=0.0, max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens)
    texts = ([p.prompt for p in PAIRS], [p.chosen for p in PAIRS], [p.rejected for p in PAIRS])
    before = GenRMJudge(JudgeLM.load(str(sharp_llama_dir), device=cfg.model.device, autocast_mode="none"), **args).prefer(*texts).prob_first
    after = GenRMJudge(JudgeLM.load(path=summary["judge_dir"], device=cfg.model.device, autocast_mode="none"), **args).prefer(*texts).prob_first
    assert (after > before).all() and (after > 0.5).all(), (before, after)
    assert after.mean() > before.mean() + 0.2


# ---- STaR ----------------------------------------------------------------------------------


def stub_sampler(replies):
    """A `sample_rationales` stand-in: the j-th of each run of k identical texts gets replies[j]
    (a hint prompt gets a rationale for the hinted verdict)."""
    calls = []

    def sample(lm, texts, sampling, batch_size):
        calls.append(list(texts))
        out = []
        for i, t in enumerate(texts):
            if "[Hint]" in t:
                letter = t.split("The better answer is Assistant ")[1][0]
                out.append(f"{letter}: hinted. [[{letter}]] and more")
            else:
                out.append(replies[i % len(replies)])
        return out

    return sample, calls


def stub_readout(lm, texts, batch_size):
    """A `read_verdicts` stand-in deciding by the rationale's first letter: 'A' reads P(A) = 0.9,
    'B' 0.1, '=' exactly ½, '?' a verdict mass below min_mass."""
    p, mass = [], []
    for t in texts:
        assert "[Hint]" not in t and t.endswith("\n\n")  # read in the training context, as GenRM reads it
        rationale = t.rsplit("assistant\n", 1)[1]
        p.append({"A": 0.9, "B": 0.1, "=": 0.5}.get(rationale[0], 0.9))
        mass.append(0.01 if rationale[0] == "?" else 0.5)
    return torch.tensor(p), torch.tensor(mass)


def test_sampled_verdict_reads_the_first_written_verdict():
    assert sampled_verdict("A is better. [[A]]") is True
    assert sampled_verdict("B wins\n\n[[B]] then [[A]]") is False
    assert sampled_verdict("a tie [[C]]") is None and sampled_verdict("cut off [[A") is None and sampled_verdict("none") is None


def test_star_verdicts_are_genrms_cot_readout(tiny_llama_dir, tmp_path, device, lm):
    from rewards.genrm import GenRMJudge

    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star", min_mass=0.0)
    sample = "Assistant A explains the steps; B does not. [[B]] (ignored)"
    lm.sample = lambda texts, sampling: [sample] * len(texts)
    judge = GenRMJudge(lm, mode="cot", cot_samples=1, cot_aggregate="mean_prob", swap_order=False, min_mass=0.0,
                       max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens)
    p = PAIRS[0]
    genrm = judge.prefer([p.prompt], [p.chosen], [p.rejected]).prob_first[0]
    prompt = judge_tasks(lm, [p], cfg)[0].prompt
    ours, _ = train_judge.read_verdicts(lm, [prompt + "Assistant A explains the steps; B does not.\n\n"], 8)
    assert ours[0].item() == pytest.approx(genrm.item(), abs=1e-6) and genrm.item() != 0.5
    [(rationale, verdict)] = train_judge.judge_rationales(lm, [prompt], [sample], cfg)
    assert rationale == "Assistant A explains the steps; B does not." and verdict is bool(genrm > 0.5)


def test_star_keeps_only_rationales_that_reach_the_label(tiny_llama_dir, tmp_path, device, lm, monkeypatch):
    replies = ["A: kind. [[A]]", "B: terse.", "?: dunno [[A]]", "[[A]]", "A: kind.\n[[B]]", "=: either"]
    sample, _ = stub_sampler(replies)
    monkeypatch.setattr(train_judge, "sample_rationales", sample)
    monkeypatch.setattr(train_judge, "read_verdicts", stub_readout)
    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star", star_samples=len(replies))
    found = collect_rationales(lm, judge_tasks(lm, PAIRS, cfg), cfg)
    for f in found:
        a_right = f.task.chosen_first
        assert f.right == (["A: kind."] if a_right else ["B: terse."])  # cut at "[[", a repeat counted once
        assert f.wrong == (["B: terse."] if a_right else ["A: kind."])
        assert f.undecided == 3  # too little verdict mass, no rationale before "[[", P exactly ½
        assert f.wrote_verdict == 4 and f.rationalized == []
    rows = star_rows(found)
    assert len(rows) == len(found)
    for f, row in zip(found, rows):
        assert row["prompt"] == f.task.prompt
        assert row["completion"] == (verdict_target(True, "A: kind.") if f.task.chosen_first else verdict_target(False, "B: terse."))
    assert rows[0]["completion"] == "A: kind.\n\n[[A]]"


def test_star_rationalizes_with_a_hint_left_out_of_the_training_prompt(tiny_llama_dir, tmp_path, device, lm, monkeypatch):
    sample, calls = stub_sampler(["B: always. [[B]]"])
    monkeypatch.setattr(train_judge, "sample_rationales", sample)
    monkeypatch.setattr(train_judge, "read_verdicts", stub_readout)
    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star", star_samples=2, rationalize=True)
    found = collect_rationales(lm, judge_tasks(lm, PAIRS, cfg), cfg)
    assert len(calls) == 2 and len(calls[1]) == 2 * len(PAIRS)  # hints only for the A-labelled tasks, k each
    assert all("The better answer is Assistant A's" in t for t in calls[1])
    for f in found:
        if f.task.chosen_first:
            assert f.right == [] and f.wrong == ["B: always."] and f.rationalized == ["A: hinted."]
        else:
            assert f.right == ["B: always."] and f.rationalized == []
    rows = star_rows(found)
    assert len(rows) == len(found)
    assert all("[Hint]" not in r["prompt"] for r in rows)
    assert {r["completion"] for r in rows} == {"A: hinted.\n\n[[A]]", "B: always.\n\n[[B]]"}


def test_star_dpo_pairs_right_against_wrong_and_takes_a_step(tiny_llama_dir, tmp_path, device, lm, monkeypatch):
    from policies.models import load_model

    sample, _ = stub_sampler(["A: kind.", "B: terse.", "A: polite."])
    monkeypatch.setattr(train_judge, "sample_rationales", sample)
    monkeypatch.setattr(train_judge, "read_verdicts", stub_readout)
    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star_dpo", star_samples=3, max_steps=1, micro_batch_size=2)
    found = collect_rationales(lm, judge_tasks(lm, PAIRS[:1], cfg), cfg)
    rows = star_dpo_rows(found)
    # The A-labelled task: 2 right, 1 wrong → 1 pair; the B-labelled one: 1 right, 2 wrong → 1 pair.
    assert len(rows) == len(found) == 2
    for f, row in zip(found, rows):
        assert row["prompt"] == f.task.prompt
        if f.task.chosen_first:
            assert (row["chosen"], row["rejected"]) == ("A: kind.\n\n[[A]]", "B: terse.\n\n[[B]]")
        else:
            assert (row["chosen"], row["rejected"]) == ("B: terse.\n\n[[B]]", "A: kind.\n\n[[A]]")

    loaded = load_model(cfg.model)
    lora_b = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_B.default" in n}
    trainer = train_judge.dpo_trainer(loaded.model, loaded.tokenizer, rows, cfg, tmp_path / "trainer")
    stats = train_judge.run_trainer(trainer)
    assert stats["steps"] == 1
    params = dict(loaded.model.named_parameters())
    assert all(not torch.equal(params[n].detach().cpu(), v.cpu()) for n, v in lora_b.items())  # every LoRA B moved off zero
    assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if "lora_B.ref" in n)  # the reference stays the start
    judge_dir = train_judge.save_judge(loaded.model, cfg, tmp_path / "judge")
    assert read_judge_meta(judge_dir).mode == "cot"
    assert not (judge_dir / "adapter" / "ref").exists()  # only the trained adapter is saved


# ---- resuming --------------------------------------------------------------------------------


def test_resume_skips_complete_iterations_and_redoes_a_stopped_one(tiny_llama_dir, tmp_path, device, monkeypatch, capsys):
    sample, calls = stub_sampler(["A: kind. [[A]]", "B: terse. [[B]]"])
    monkeypatch.setattr(train_judge, "sample_rationales", sample)
    monkeypatch.setattr(train_judge, "read_verdicts", stub_readout)
    trained = []
    real = train_judge.run_trainer

    def run_trainer(trainer):
        trained.append(trainer)
        if len(trained) == 2:
            raise KeyboardInterrupt("stopped in iteration 2")
        return real(trainer)

    monkeypatch.setattr(train_judge, "run_trainer", run_trainer)
    cfg = cfg_for(tiny_llama_dir, tmp_path, device, method="star", iterations=2, star_samples=2, max_steps=1,
                  eval_data=DataConfig(path=str(tmp_path / "pairs.jsonl"), split="all", max_items=1))
    with pytest.raises(KeyboardInterrupt):
        train_judge.run(cfg)
    assert "eval_data shares 1 prompt(s) with the training data" in capsys.readouterr().out  # here it is a training pair
    run_dir = Path(cfg.output_dir)
    assert (run_dir / "iter_1" / "result.json").is_file() and not (run_dir / "iter_2" / "judge" / "judge.json").exists()
    sampled_before = len(calls)

    summary = train_judge.run(cfg)
    assert len(trained) == 3  # iteration 1 was not trained again, iteration 2 was redone
    assert len(calls) == sampled_before + 1  # and only iteration 2 sampled
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    assert summary["iterations"][2]["star"]["right_fraction"] == 1.0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert read_judge_meta(run_dir / "judge").mode == "cot"

    # Everything complete: a third run trains nothing.
    train_judge.run(cfg)
    assert len(trained) == 3

"""d-RLAIF (rewards/drlaif.py): the score read-out on hand-set log-probs, then the provider end to
end on a tiny Llama whose next-token distributions are set by hand, through both engines."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rewards.drlaif import DRLAIFConfig, DRLAIFReward, build_drlaif, cut_rating, expected_score, score_distribution, score_entropy, score_reward
from rewards.judge_format import RATING_PREFIX
from rewards.judge_lm import JudgeLM
from rlhf.config import ConfigError, SamplingConfig, from_dict

# --- the read-out on hand-set log-probs ----------------------------------------------------------

V = 12
DIGITS = list(range(10))  # token d is the digit d
TEN = 10  # a single-token "10" in the variant that has one
OTHER = 11  # any other token (end of turn, a letter ...)


def logprobs(**p: float) -> torch.Tensor:
    """(1, V) log-probs with p[name] on token name ('d7' = digit 7, 'ten', 'other')."""
    row = torch.zeros(V, dtype=torch.float64)
    for name, value in p.items():
        row[{"ten": TEN, "other": OTHER}.get(name) or int(name[1:])] = value
    assert math.isclose(float(row.sum()), 1.0, abs_tol=1e-12)
    return row.log()[None]


def test_read_out_splits_the_one_branch_into_1_and_10():
    # p("1") = 0.5, p("0" | "1") = 0.4, p("7") = 0.5 → P(10) = 0.2, P(1) = 0.3, P(7) = 0.5
    probs, mass = score_distribution(logprobs(d1=0.5, d7=0.5), logprobs(d0=0.4, other=0.6), DIGITS)
    expected = torch.zeros(1, 10)
    expected[0, 0], expected[0, 6], expected[0, 9] = 0.3, 0.5, 0.2
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(mass, torch.tensor([1.0]))
    s = expected_score(probs)
    torch.testing.assert_close(s, torch.tensor([0.3 * 1 + 0.5 * 7 + 0.2 * 10]))  # 5.8
    torch.testing.assert_close(score_reward(s), torch.tensor([(5.8 - 5.5) / 4.5]))
    h = -(0.3 * math.log(0.3) + 0.5 * math.log(0.5) + 0.2 * math.log(0.2))
    torch.testing.assert_close(score_entropy(probs), torch.tensor([h], dtype=torch.float32))


def test_read_out_renormalises_over_the_scale_and_ignores_a_first_zero():
    # 0.4 of the mass is off the scale: a leading "0" (no score) and other text.
    probs, mass = score_distribution(logprobs(d0=0.1, d1=0.2, d9=0.4, other=0.3), logprobs(d0=0.5, other=0.5), DIGITS)
    torch.testing.assert_close(mass, torch.tensor([0.6]))
    expected = torch.zeros(1, 10)
    expected[0, 0], expected[0, 8], expected[0, 9] = 0.1 / 0.6, 0.4 / 0.6, 0.1 / 0.6
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(expected_score(probs), torch.tensor([(0.1 * 1 + 0.4 * 9 + 0.1 * 10) / 0.6]))


def test_read_out_adds_a_single_token_ten():
    # p("10") = 0.25 as one token, p("1") = 0.25 of which half continues with "0", p("4") = 0.5
    first = logprobs(ten=0.25, d1=0.25, d4=0.5)
    probs, mass = score_distribution(first, logprobs(d0=0.5, other=0.5), DIGITS, ten_id=TEN)
    torch.testing.assert_close(mass, torch.tensor([1.0]))
    assert probs[0, 9].item() == pytest.approx(0.25 + 0.125) and probs[0, 0].item() == pytest.approx(0.125)
    torch.testing.assert_close(expected_score(probs), torch.tensor([0.125 * 1 + 0.5 * 4 + 0.375 * 10]))
    # without ten_id the single-token "10" is off the scale
    _, mass_without = score_distribution(first, logprobs(d0=0.5, other=0.5), DIGITS)
    torch.testing.assert_close(mass_without, torch.tensor([0.75]))


def test_read_out_rows_are_independent_and_mass_can_vanish():
    first = torch.cat([logprobs(d3=1.0), logprobs(other=1.0)])  # row 1 puts nothing on a score
    after = torch.cat([logprobs(other=1.0), logprobs(other=1.0)])
    probs, mass = score_distribution(first, after, DIGITS)
    torch.testing.assert_close(mass, torch.tensor([1.0, 0.0]))
    assert probs[0, 2].item() == pytest.approx(1.0) and torch.isfinite(probs).all()


def test_cut_rating_keeps_the_text_before_the_first_rating():
    assert cut_rating("The answer is correct and clear.\n\nRating: 9\nRating: 3") == "The answer is correct and clear."
    assert cut_rating("Clear. **rating :** 4") == "Clear. **"
    assert cut_rating("no score here  ") == "no score here"


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, key", [({"cot_samples": 0}, "cot_samples"), ({"min_mass": 1.0}, "min_mass"), ({"min_mass": -0.1}, "min_mass"),
                                      ({"batch_size": 0}, "batch_size"), ({"template_file": " "}, "template_file")])
def test_config_rejects_bad_values(bad, key):
    with pytest.raises(ConfigError, match=key):
        DRLAIFConfig(**bad)
    with pytest.raises(ConfigError, match=key):
        from_dict(DRLAIFConfig, {"type": "drlaif", **bad})


def test_config_rejects_an_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        from_dict(DRLAIFConfig, {"preset": "honesty"})
    with pytest.raises(ConfigError, match="unknown d-RLAIF preset 'honesty'"):
        DRLAIFConfig(preset="honesty")  # type: ignore[arg-type]
    cfg = from_dict(DRLAIFConfig, {"cot": True, "cot_sampling": {"max_new_tokens": 8}})
    assert cfg.cot_sampling == SamplingConfig(max_new_tokens=8, temperature=0.7)


def test_template_file_without_a_placeholder_names_the_file(tmp_path):
    path = tmp_path / "rate.txt"
    path.write_text("Rate this answer from 1 to 10: {answer}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*placeholder {{question}}"):
        build_drlaif(DRLAIFConfig(template_file=str(path), model=str(tmp_path / "no-model")))  # fails before loading
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_drlaif(DRLAIFConfig(template_file=str(tmp_path / "missing.txt")))


# --- a tiny Llama with next-token distributions set by hand -----------------------------------------

# After the rating prompt ("... Rating: "): p("1") = 0.5, p("7") = 0.3, p("9") = 0.1, 0.1 elsewhere.
FIRST = {"1": 0.5, "7": 0.3, "9": 0.1, "Hello": 0.1}
# After "Rating: 1": p("0") = 0.25 (the score 10), 0.75 on ending the number.
AFTER_ONE = {"0": 0.25, "<|im_end|>": 0.75}
MASS = 0.9
# P(1) = 0.5·0.75, P(10) = 0.5·0.25, P(7) = 0.3, P(9) = 0.1, renormalised by the mass 0.9
SCORE = (0.375 * 1 + 0.3 * 7 + 0.1 * 9 + 0.125 * 10) / MASS
ENTROPY = -sum(p / MASS * math.log(p / MASS) for p in (0.375, 0.3, 0.1, 0.125))


@pytest.fixture(scope="module")
def rater_dir(tiny_llama_dir, tmp_path_factory):
    """The fixture's tiny Llama, untied and rewired so that its next-token distribution depends
    only on the current token: FIRST after any token but "1", AFTER_ONE after "1".

    Every layer's o_proj and down_proj are zero, so attention and MLP add nothing and the final
    hidden state is the token's embedding: 8·e₁ for every token, 8·e₀ for "1". With D = 64 the
    final RMSNorm (weight 1) maps c·e to √D·e = 8·e (up to its ε), so the LM head's columns 1
    and 0, set to logits/8, give exactly those logits."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    cfg.tie_word_embeddings = False
    assert cfg.hidden_size == 64
    model = LlamaForCausalLM(cfg)

    def logits(dist: dict[str, float]) -> torch.Tensor:
        out = torch.full((cfg.vocab_size,), -30.0)
        for text, p in dist.items():
            (tid,) = tok(text, add_special_tokens=False)["input_ids"]
            out[tid] = math.log(p)
        return out

    one = tok("1", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 1] = 8.0
        emb[one, 1], emb[one, 0] = 0.0, 8.0
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        head[:, 1] = logits(FIRST) / 8
        head[:, 0] = logits(AFTER_ONE) / 8
    out = tmp_path_factory.mktemp("rater")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rater(path, engine="hf", **settings) -> DRLAIFReward:
    cfg = DRLAIFConfig(model=str(path), device="cpu", autocast="none", engine=engine, **settings)
    return build_drlaif(cfg)


PROMPTS = ["What is 2 + 2?", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]]
ANSWERS = ["4", "Blue, like the sky on a clear day."]


@pytest.mark.parametrize("engine", ["hf", "packed"])
def test_provider_reads_the_expected_score_from_the_model(rater_dir, engine):
    provider = rater(rater_dir, engine, batch_size=1)
    result = provider.score(PROMPTS, ANSWERS)
    assert result.valid.all()
    torch.testing.assert_close(result.rewards, torch.full((2,), (SCORE - 5.5) / 4.5), atol=1e-5, rtol=0)
    assert result.extras["expected_score"] == pytest.approx([SCORE] * 2, abs=1e-5)
    assert result.extras["score_mass"] == pytest.approx([MASS] * 2, abs=1e-5)
    assert result.extras["score_entropy"] == pytest.approx([ENTROPY] * 2, abs=1e-5)


def test_engines_agree_and_low_mass_is_invalid(rater_dir, tiny_llama_dir):
    # The random tiny Llama: its rewards are whatever they are, but the same under both engines.
    prompts, answers = PROMPTS * 2, ANSWERS + ["", "I can't say."]
    hf = rater(tiny_llama_dir, "hf", min_mass=0.0, batch_size=3).score(prompts, answers)
    packed = rater(tiny_llama_dir, "packed", min_mass=0.0, batch_size=2).score(prompts, answers)
    assert hf.valid.all() and packed.valid.all()
    torch.testing.assert_close(packed.rewards, hf.rewards, atol=1e-5, rtol=0)
    assert len(set(hf.rewards.tolist())) > 1  # the rows really differ
    torch.testing.assert_close(torch.tensor(packed.extras["score_mass"]), torch.tensor(hf.extras["score_mass"]), atol=1e-6, rtol=1e-4)
    # the hand-set model puts 0.9 on scores: a threshold above that makes every sample invalid
    strict = rater(rater_dir, min_mass=0.95).score(PROMPTS, ANSWERS)
    assert not strict.valid.any() and strict.rewards.tolist() == [0.0, 0.0]
    assert strict.extras["score_mass"] == pytest.approx([MASS] * 2, abs=1e-5)


def test_rating_row_ends_with_the_prefix_then_one(rater_dir):
    provider = rater(rater_dir, max_completion_tokens=3)
    text = provider._conversation("Why?", "one two three four five six") + RATING_PREFIX
    assert text.endswith("<|im_start|>assistant\n" + RATING_PREFIX)
    assert "one two three" in text and "four" not in text  # the answer is clipped to its first tokens
    ids, _ = provider.judge.encode([text], append=[[provider.one_id]])
    assert provider.judge.tokenizer.decode(ids[0, -2:]) == " 1"


def test_provider_is_a_trl_reward_function(rater_dir):
    provider = rater(rater_dir)
    assert provider.__name__ == "drlaif"
    out = provider(prompts=PROMPTS, completions=[[{"role": "assistant", "content": a}] for a in ANSWERS])
    assert out == pytest.approx([(SCORE - 5.5) / 4.5] * 2, abs=1e-5)
    assert rater(rater_dir, min_mass=0.95)(prompts=PROMPTS, completions=ANSWERS) == [None, None]


def test_chain_of_thought_reads_after_each_rationale(rater_dir, tiny_llama_dir):
    sampling = {"max_new_tokens": 3, "temperature": 1.0}
    torch.manual_seed(0)
    provider = rater(tiny_llama_dir, cot=True, cot_samples=2, cot_sampling=SamplingConfig(**sampling), min_mass=0.0, batch_size=3)
    result = provider.score(PROMPTS, ANSWERS)
    assert result.valid.all()
    assert [len(r) for r in result.extras["rationales"]] == [2, 2]
    assert all(isinstance(r, str) and "Rating:" not in r for rs in result.extras["rationales"] for r in rs)
    assert all(len(s) == 2 for s in result.extras["rationale_scores"])
    # the reward is the mean of the two rationales' expected scores
    for i in range(2):
        mean = sum(result.extras["rationale_scores"][i]) / 2
        assert result.extras["expected_score"][i] == pytest.approx(mean, abs=1e-5)
        assert result.rewards[i].item() == pytest.approx((mean - 5.5) / 4.5, abs=1e-5)
    # On the hand-set model every reading is the same whatever the rationale says: the last token
    # before "1" is never "1" itself (it is the prefix's " ").
    cot = rater(rater_dir, cot=True, cot_samples=2, cot_sampling=SamplingConfig(**sampling), batch_size=4).score(PROMPTS, ANSWERS)
    assert cot.valid.all() and cot.extras["expected_score"] == pytest.approx([SCORE] * 2, abs=1e-5)
    # a rationale whose reading has too little mass is left out; all left out → invalid
    strict = rater(rater_dir, cot=True, cot_samples=2, cot_sampling=SamplingConfig(**sampling), min_mass=0.95).score(PROMPTS, ANSWERS)
    assert not strict.valid.any() and strict.extras["expected_score"] == [None, None]
    assert strict.extras["rationale_scores"] == [[None, None], [None, None]]


def test_judge_on_the_host_base_with_adapters_off(rater_dir):
    from policies.actor_critic import ActorCritic
    from rlhf.config import LoraConfig, ModelConfig

    host = ActorCritic.build(ModelConfig(name=str(rater_dir), device="cpu", lora=LoraConfig(enabled=True, r=4)), "shared_lora", autocast="none")
    # Train the policy adapter away from the base: a judge that ran it would read other scores.
    with torch.no_grad():
        for name, p in host.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    provider = build_drlaif(DRLAIFConfig(model=str(rater_dir), autocast="none"), host)
    assert provider.judge.model is host.policy and provider.shared_adapter() is None  # no second copy
    result = provider.score(PROMPTS, ANSWERS)
    torch.testing.assert_close(result.rewards, torch.full((2,), (SCORE - 5.5) / 4.5), atol=1e-5, rtol=0)
    # a different autocast from the host's: a model of its own
    own = build_drlaif(DRLAIFConfig(model=str(rater_dir), autocast="bfloat16", device="cpu"), host)
    assert own.judge.model is not host.policy

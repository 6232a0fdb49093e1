"""GenRM: the verdict read-out, CoT aggregation and the order swap on hand-set numbers (a fake
judge LM), then a tiny model end to end, the two engines against each other, and the judge on a
policy's shared base against a judge loaded on its own.

Expected numbers are computed by hand in the comments next to them.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from rewards.genrm import GenRMConfig, GenRMJudge, aggregate_rationales, build_genrm, verdict_probability
from rewards.judge_format import JudgeMeta, cut_rationale, write_judge_meta
from rewards.judge_lm import JudgeLM
from rlhf.config import ConfigError, LoraConfig, ModelConfig, SamplingConfig, from_dict


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------- the read-out


def test_verdict_probability_from_hand_set_logprobs():
    probs = torch.tensor([
        [0.10, 0.60, 0.05, 0.20, 0.05],  # p_A = 0.6, p_B = 0.2 → P = 0.6/0.8 = 0.75, mass 0.8
        [0.50, 0.01, 0.00, 0.03, 0.46],  # p_A = 0.01, p_B = 0.03 → P = 0.25, mass 0.04
        [1.00, 0.00, 0.00, 0.00, 0.00],  # neither verdict token: P = ½, mass 0
    ])
    p, mass = verdict_probability(torch.log(probs), id_a=1, id_b=3)
    assert p.dtype == mass.dtype == torch.float32
    assert p.tolist() == pytest.approx([0.75, 0.25, 0.5])
    assert mass.tolist() == pytest.approx([0.8, 0.04, 0.0])
    # tiny but non-zero probabilities keep their exact ratio (log space): 3e-30 vs 1e-30 → 0.75
    tiny = torch.full((1, 5), -1.0)
    tiny[0, 1], tiny[0, 3] = math.log(3e-30), math.log(1e-30)
    assert verdict_probability(tiny, 1, 3)[0].item() == pytest.approx(0.75)


def test_aggregate_rationales_vote_and_mean_prob():
    p = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.99])
    mass = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.01])  # the last is below min_mass: left out
    # votes 1, 0, ½, 1 → 2.5/4
    assert aggregate_rationales(p, mass, 0.05, "vote") == (pytest.approx(0.625), True)
    # mean of 0.9, 0.2, 0.5, 0.7
    assert aggregate_rationales(p, mass, 0.05, "mean_prob") == (pytest.approx(0.575), True)
    assert aggregate_rationales(p, mass, 0.6, "vote") == (0.5, False)  # every rationale out


# ----------------------------------------------------------------- a fake judge LM

A_ANSWER = re.compile(r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End", re.S)
B_ANSWER = re.compile(r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End", re.S)


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [7] if text == "[[" else [8, 9]}


class FakeLM:
    """Answers are numbers q. The verdict logit is d = q(A) − q(B) + `bias` (a position bias
    toward A): P(A ≻ B) = σ(d), mass 0.9, or mass 0.01 where A is "mute". After a CoT rationale
    the verdict comes from the rationale instead (`RATIONALES`). Vocabulary: A=0, B=1, other=2."""

    RATIONALES = {"A wins.": (0.8, 0.1), "B wins.": (0.3, 0.6), "hmm": (0.005, 0.005)}

    def __init__(self, bias=0.0, rationales=("A wins. [[A]]", "A wins.", "B wins. [[B]] more", "hmm")):
        self.bias, self.rationales = bias, list(rationales)
        self.tokenizer = FakeTokenizer()
        self.shared_adapter = None
        self.read: list[str] = []  # every text a verdict was read after
        self.sampled = Counter()

    def clip(self, text, max_tokens, keep="first"):
        return text[:max_tokens] if keep == "first" else text[-max_tokens:]

    def render(self, messages, assistant_prefix="", *, chat=True):
        return messages[-1]["content"] + "\n<assistant>\n" + assistant_prefix

    def token_id(self, text):
        if text not in ("A", "B"):
            raise ValueError(f"judge verdict {text!r} is 2 tokens")
        return {"A": 0, "B": 1}[text]

    def encode(self, texts, append=None):
        assert append is not None and all(list(a) == [7] for a in append)  # "[[" appended
        self._batch = list(texts)
        return torch.arange(len(texts))[:, None], torch.ones(len(texts), 1, dtype=torch.long)

    def last_logprobs(self, ids, attn, k=1):
        rows = []
        for i in ids[:, 0].tolist():
            text = self._batch[i]
            self.read.append(text)
            rationale = text.split("\n<assistant>\n", 1)[1]
            if rationale:
                pa, pb = self.RATIONALES[rationale.rstrip("\n")]
            else:
                a, b = A_ANSWER.search(text).group(1), B_ANSWER.search(text).group(1)
                mass = 0.01 if a == "mute" else 0.9
                d = (0.0 if a == "mute" else float(a)) - (0.0 if b == "mute" else float(b)) + self.bias
                pa, pb = mass * sigmoid(d), mass * sigmoid(-d)
            rows.append([math.log(pa), math.log(pb), math.log(1 - pa - pb)])
        return torch.tensor(rows)[:, None, :]

    def sample(self, texts, sampling):
        out = []
        for t in texts:  # the j-th sample of a text is rationale j (whatever the batching)
            out.append(self.rationales[self.sampled[t] % len(self.rationales)])
            self.sampled[t] += 1
        return out


def test_order_swap_averages_the_two_orders_and_flags_disagreement():
    judge = GenRMJudge(FakeLM(bias=2.0), batch_size=3)
    res = judge.prefer(["q0", "q1", "q2"], ["1", "2", "0"], ["0", "0", "2"])
    # row 0: shown (1, 0): d = 1 + 2 = 3; swapped (0, 1): d = −1 + 2 = 1, P(second ≻ first) = σ(1)
    first0, swapped0 = sigmoid(3), 1 - sigmoid(1)
    # row 1: shown (2, 0): d = 4; swapped (0, 2): d = −2 + 2 = 0 → ½
    first1, swapped1 = sigmoid(4), 0.5
    # row 2: shown (0, 2): d = 0 → ½; swapped (2, 0): d = 4
    first2, swapped2 = 0.5, 1 - sigmoid(4)
    assert res.extras["prob_first_order"] == pytest.approx([first0, first1, first2], abs=1e-6)
    assert res.extras["prob_swapped_order"] == pytest.approx([swapped0, swapped1, swapped2], abs=1e-6)
    assert res.prob_first.tolist() == pytest.approx([(first0 + swapped0) / 2, (first1 + swapped1) / 2, (first2 + swapped2) / 2], abs=1e-6)
    # row 0: the first order picks `first`, the swapped one `second`; rows 1, 2: a pick against a tie
    assert res.extras["order_disagrees"] == [True, True, True]
    assert res.extras["verdict_mass"] == pytest.approx([0.9] * 3, abs=1e-6)
    assert res.valid.all()
    # the bias cancels where it is no larger than the quality gap: σ(1 + 0.5) vs σ(−1 + 0.5)
    res = GenRMJudge(FakeLM(bias=0.5)).prefer(["q"], ["1"], ["0"])
    assert res.extras["order_disagrees"] == [False]
    assert res.prob_first.item() == pytest.approx((sigmoid(1.5) + 1 - sigmoid(-0.5)) / 2, abs=1e-6)


def test_an_order_without_a_verdict_makes_the_comparison_invalid():
    lm = FakeLM()
    res = GenRMJudge(lm).prefer(["q", "q"], ["mute", "1"], ["1", "0"])
    # row 0: shown first, "mute" as A has mass 0.01 < 0.05; the swapped order alone answered
    assert res.valid.tolist() == [False, True]
    assert res.prob_first[0].item() == 0.5
    assert res.extras["verdict_mass"] == pytest.approx([0.01, 0.9], abs=1e-6)  # the smaller of the two orders
    # without the swap only the shown order counts: (1, mute) is answered
    res = GenRMJudge(lm, swap_order=False).prefer(["q"], ["1"], ["mute"])
    assert res.valid.tolist() == [True] and res.prob_first.item() == pytest.approx(sigmoid(1.0), abs=1e-6)
    assert "prob_swapped_order" not in res.extras
    # the same fake with a higher bar: mass 0.9 is not enough
    assert not GenRMJudge(lm, min_mass=0.95, swap_order=False).prefer(["q"], ["1"], ["0"]).valid.any()


@pytest.mark.parametrize("aggregate, expected", [
    # rationales: A wins (P = 0.8/0.9), A wins, B wins (P = 0.3/0.9), "hmm" (mass 0.01: out)
    ("vote", 2 / 3),
    ("mean_prob", (8 / 9 + 8 / 9 + 1 / 3) / 3),
])
def test_cot_reads_the_verdict_after_each_cut_rationale(aggregate, expected):
    lm = FakeLM()
    judge = GenRMJudge(lm, mode="cot", cot_samples=4, cot_aggregate=aggregate, swap_order=False, batch_size=3)
    res = judge.prefer(["q", "r"], ["1", "0"], ["0", "1"])
    assert res.prob_first.tolist() == pytest.approx([expected, expected], abs=1e-6)
    assert res.valid.all()
    # each rationale cut at its own "[[" and followed by a blank line, then "[[" (appended as ids)
    assert res.extras["rationales"] == [["A wins.", "A wins.", "B wins.", "hmm"]] * 2
    assert all(t.endswith(("A wins.\n\n", "B wins.\n\n", "hmm\n\n")) for t in lm.read)
    assert sum(lm.sampled.values()) == 8  # k = 4 per comparison, sampled once each


def test_cot_with_every_rationale_out_is_invalid_and_swap_keeps_both_orders_rationales():
    lm = FakeLM(rationales=("hmm",))
    res = GenRMJudge(lm, mode="cot", cot_samples=2).prefer(["q"], ["1"], ["0"])
    assert res.valid.tolist() == [False]
    assert res.extras["rationales"] == [["hmm", "hmm"]] and res.extras["rationales_swapped"] == [["hmm", "hmm"]]
    assert sum(lm.sampled.values()) == 4  # 2 orders × k = 2


def test_verdict_tokens_must_be_single_tokens():
    with pytest.raises(ValueError, match="is 2 tokens"):
        GenRMJudge(FakeLM(), verdict_tokens=("Yes", "B"))


# ------------------------------------------------------------------------------- config


def test_genrm_config_checks():
    cfg = from_dict(GenRMConfig, {})
    assert cfg.base_model == "smollm2-135m-instruct" and cfg.mode is None and cfg.swap_order
    assert from_dict(GenRMConfig, {"path": "runs/judge"}).base_model is None
    with pytest.raises(ConfigError, match="`model`.*or `path`.*not both"):
        from_dict(GenRMConfig, {"model": "m", "path": "p"})
    with pytest.raises(ConfigError, match="cot_samples must be at least 1"):
        from_dict(GenRMConfig, {"cot_samples": 0})
    with pytest.raises(ConfigError, match="min_mass must lie in"):
        from_dict(GenRMConfig, {"min_mass": 1.0})
    with pytest.raises(ConfigError, match="verdict_tokens must be two different"):
        from_dict(GenRMConfig, {"verdict_tokens": ["A", "A"]})
    with pytest.raises(ConfigError, match="verdict_tokens must be two different"):
        from_dict(GenRMConfig, {"verdict_tokens": ["A"]})
    assert from_dict(GenRMConfig, {"cot_sampling": {"max_new_tokens": 9}}).cot_sampling.temperature == 0.7


# ------------------------------------------------------------------------- tiny models

PROMPTS = ["What is 2+2?", [{"role": "user", "content": "Say hello."}], "Name a colour."]
FIRST = ["4", "Hello! How can I help you today?", "Blue, like the sky on a clear day."]
SECOND = ["Five, I think.", "No.", "Green"]


def tiny_judge(tiny_llama_dir, **kw):
    cfg = dict(model=str(tiny_llama_dir), device="cpu", autocast="none", engine="hf", min_mass=0.0) | kw
    return build_genrm(GenRMConfig(**cfg))


def test_direct_tiny_model_reads_the_token_after_the_verdict_opening(tiny_llama_dir):
    judge = tiny_judge(tiny_llama_dir, batch_size=2)
    res = judge.prefer(PROMPTS, FIRST, SECOND)
    assert res.valid.all() and set(res.extras) == {"prob_first_order", "prob_swapped_order", "order_disagrees", "verdict_mass"}
    # the same number from a plain forward of the unpadded row, `…assistant\n[[`, at its last position
    lm, (id_a, id_b) = judge.lm, judge.verdict_ids
    from rewards.judge_format import pairwise_messages

    for i in range(len(PROMPTS)):
        prompt = PROMPTS[i] if isinstance(PROMPTS[i], str) else PROMPTS[i][0]["content"]
        text = lm.render(pairwise_messages(prompt, FIRST[i], SECOND[i])) + "[["
        ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[:, -1].float(), -1)
        expected_p, expected_mass = verdict_probability(logprobs, id_a, id_b)
        assert res.extras["prob_first_order"][i] == pytest.approx(expected_p.item(), abs=1e-5)
        assert res.extras["verdict_mass"][i] <= expected_mass.item() + 1e-7
    # the swapped order is the judge's own P(second ≻ first), flipped back
    alone = tiny_judge(tiny_llama_dir, swap_order=False).prefer(PROMPTS, SECOND, FIRST)
    assert res.extras["prob_swapped_order"] == pytest.approx([1 - p for p in alone.prob_first.tolist()], abs=1e-5)
    assert res.prob_first.tolist() == pytest.approx([(a + b) / 2 for a, b in zip(res.extras["prob_first_order"], res.extras["prob_swapped_order"])], abs=1e-6)
    # a random model puts almost no mass on "A"/"B" (≈ 2/vocab): at the default bar, nothing is valid
    strict = tiny_judge(tiny_llama_dir, min_mass=0.05).prefer(PROMPTS, FIRST, SECOND)
    assert not strict.valid.any() and strict.prob_first.tolist() == [0.5] * 3


def test_cot_tiny_model_end_to_end(tiny_llama_dir):
    torch.manual_seed(0)
    judge = tiny_judge(tiny_llama_dir, mode="cot", cot_samples=2, cot_sampling=SamplingConfig(max_new_tokens=3, temperature=1.0), batch_size=3)
    res = judge.prefer(PROMPTS[:2], FIRST[:2], SECOND[:2])
    assert res.valid.all()
    assert [len(r) for r in res.extras["rationales"]] == [2, 2] and [len(r) for r in res.extras["rationales_swapped"]] == [2, 2]
    assert all(r == cut_rationale(r) for rs in res.extras["rationales"] for r in rs)
    for p in res.extras["prob_first_order"] + res.extras["prob_swapped_order"]:
        assert p in (0.0, 0.5, 1.0)  # a vote share of k = 2 rationales


def test_hf_and_packed_engines_agree(tiny_llama_dir):
    hf = tiny_judge(tiny_llama_dir, engine="hf")
    packed = tiny_judge(tiny_llama_dir, engine="packed")
    assert type(hf.lm.engine).__name__ != type(packed.lm.engine).__name__
    # rows of different lengths: left padding and positions must agree too
    texts = [hf.lm.render([{"role": "user", "content": "x " * n}]) for n in (1, 7, 30)]
    ids, attn = hf.lm.encode(texts, append=[hf.open_ids] * 3)
    torch.testing.assert_close(hf.lm.last_logprobs(ids, attn), packed.lm.last_logprobs(ids, attn), atol=1e-4, rtol=1e-4)
    a, b = hf.prefer(PROMPTS, FIRST, SECOND), packed.prefer(PROMPTS, FIRST, SECOND)
    assert a.extras["prob_first_order"] == pytest.approx(b.extras["prob_first_order"], abs=1e-4)
    assert a.extras["verdict_mass"] == pytest.approx(b.extras["verdict_mass"], rel=1e-3)


def test_the_verdict_head_runs_in_float32_under_bf16_autocast(tiny_llama_dir):
    # bf16 logits would put a verdict's log-odds on a coarse grid (both orders of a biased judge
    # then read the same value and the average is exactly ½); the head must run in float32 on
    # the (bf16-autocast) hidden states.
    from policies.models import unwrap_causal_lm

    judge = tiny_judge(tiny_llama_dir, autocast="bfloat16")
    lm = judge.lm
    assert lm.amp == torch.bfloat16
    texts = [lm.render([{"role": "user", "content": "x " * n}]) for n in (1, 7, 30)]
    ids, attn = lm.encode(texts, append=[judge.open_ids] * 3)
    read = torch.zeros(ids.shape, dtype=torch.bool)
    read[:, -2:] = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = lm.engine.hidden_states(lm.model, ids, attn, read=read, frozen=True)[:, -2:]
        head = unwrap_causal_lm(lm.model).get_output_embeddings()
        bf16_logits = head(hidden)
    assert bf16_logits.dtype == torch.bfloat16  # what the head gives under autocast
    fp32 = torch.log_softmax(torch.nn.functional.linear(hidden.float(), head.weight.float()), -1)
    got = lm.last_logprobs(ids, attn, k=2)
    torch.testing.assert_close(got, fp32, atol=1e-5, rtol=1e-5)
    assert (got - torch.log_softmax(bf16_logits.float(), -1)).abs().max() > 1e-3  # the test tells the two apart


def max_gap(xs, ys):
    return max(abs(x - y) for x, y in zip(xs, ys))


def _perturbed_host(tiny_llama_dir):
    from policies.actor_critic import ActorCritic

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), device="cpu", lora=LoraConfig(enabled=True)), "shared_lora", autocast="none")
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking policy adapter: the judge must not see it
        for n, p in ac.policy.named_parameters():
            if ".policy." in n and "lora_B" in n:
                p.normal_(0, 0.5)
    return ac


def test_judge_on_the_host_runs_the_base_with_the_policy_adapter_off(tiny_llama_dir):
    ac = _perturbed_host(tiny_llama_dir)
    on_host = build_genrm(GenRMConfig(model=str(tiny_llama_dir), device="cpu", autocast="none", min_mass=0.0), host=ac)
    ac.prepare_frozen()  # as PPO does once every provider is built
    assert on_host.lm.model is ac.policy and on_host.shared_adapter() is None
    alone = tiny_judge(tiny_llama_dir, engine="auto")
    a, b = on_host.prefer(PROMPTS, FIRST, SECOND), alone.prefer(PROMPTS, FIRST, SECOND)
    assert a.extras["prob_first_order"] == pytest.approx(b.extras["prob_first_order"], abs=1e-4)
    assert a.extras["verdict_mass"] == pytest.approx(b.extras["verdict_mass"], rel=1e-3)
    # the perturbation is real: the policy itself reads other numbers
    as_policy = GenRMJudge(JudgeLM(ac.policy, ac.tokenizer, ac.engine, amp=None), min_mass=0.0).prefer(PROMPTS, FIRST, SECOND)
    assert max_gap(as_policy.extras["prob_first_order"], b.extras["prob_first_order"]) > 5e-3
    # and judging left the host as it was: the policy adapter active, both adapters trainable
    assert ac.policy.active_adapter == "policy"
    assert all(p.requires_grad for n, p in ac.policy.named_parameters() if ".policy." in n or ".critic." in n)


def test_a_trained_judge_directory_alone_and_as_a_frozen_adapter_on_the_host(tiny_llama_dir, tmp_path):
    from policies.models import apply_lora, load_model

    judge_dir = tmp_path / "judge"
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"))
    model = apply_lora(loaded.model, LoraConfig(enabled=True, r=4, alpha=8))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(judge_dir / "adapter")
    write_judge_meta(judge_dir, JudgeMeta(base_model=str(tiny_llama_dir), mode="cot", verdict_tokens=("B", "A"), max_prompt_tokens=64))

    alone = build_genrm(GenRMConfig(path=str(judge_dir), device="cpu", autocast="none", mode="direct", min_mass=0.0))
    # unset keys come from judge.json; set ones win
    assert alone.mode == "direct" and alone.max_prompt_tokens == 64 and alone.verdict_ids == (alone.lm.token_id("B"), alone.lm.token_id("A"))
    assert build_genrm(GenRMConfig(path=str(judge_dir), device="cpu", autocast="none")).mode == "cot"

    ac = _perturbed_host(tiny_llama_dir)
    on_host = build_genrm(GenRMConfig(path=str(judge_dir), device="cpu", autocast="none", mode="direct", min_mass=0.0), host=ac)
    ac.prepare_frozen()
    assert on_host.shared_adapter() == "judge" and on_host.lm.model is ac.policy
    a, b = on_host.prefer(PROMPTS, FIRST, SECOND), alone.prefer(PROMPTS, FIRST, SECOND)
    assert a.extras["prob_first_order"] == pytest.approx(b.extras["prob_first_order"], abs=1e-4)
    assert a.extras["verdict_mass"] == pytest.approx(b.extras["verdict_mass"], rel=1e-3)
    # the adapter matters: the bare base reads other numbers
    base = tiny_judge(tiny_llama_dir, engine="auto", verdict_tokens=("B", "A")).prefer(PROMPTS, FIRST, SECOND)
    assert max_gap(base.extras["prob_first_order"], b.extras["prob_first_order"]) > 5e-3
    assert ac.policy.active_adapter == "policy"

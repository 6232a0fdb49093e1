"""A pairwise judge as a reward (`JudgeReward`), its reference sources (`rewards.references`)
and the registry entries that build them (`judge_reward`, `genrm`, `build_judge`).

Expected numbers are computed by hand in the comments next to them.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from rewards.base import JudgeReward, PairwiseJudge, PreferenceResult
from rewards.genrm import GenRMConfig, GenRMJudge
from rewards.references import FieldReferences, PolicyReferences
from rewards.registry import JudgeRewardConfig, build_judge, build_provider
from rlhf.config import ConfigError, DataConfig, SamplingConfig, from_dict
from rlhf.data import DataError, prompt_key

EPS = 1e-4


class FixedJudge(PairwiseJudge):
    """P(first ≻ second) set by hand per row; records what it was asked."""

    def __init__(self, probs, valid=None):
        self.probs, self.valid, self.calls = probs, valid, []

    def prefer(self, prompts, first, second):
        self.calls.append((list(prompts), list(first), list(second)))
        valid = torch.tensor(self.valid if self.valid is not None else [True] * len(self.probs))
        return PreferenceResult(torch.tensor(self.probs), valid, {"why": [f"row {i}" for i in range(len(self.probs))]})


# -------------------------------------------------------------------------- JudgeReward


def test_judge_reward_is_clipped_log_odds_against_the_reference():
    judge = FixedJudge([0.5, 0.9, 1.0, 0.0])
    reward = JudgeReward(judge, lambda prompts: [f"ref of {p}" for p in prompts], epsilon=EPS)
    res = reward.score(["a", "b", "c", "d"], ["y0", "y1", "y2", "y3"])
    bound = math.log((1 - EPS) / EPS)  # ≈ 9.21: p = 1 is clipped to 1 − ε, p = 0 to ε
    assert res.rewards.tolist() == pytest.approx([0.0, math.log(9), bound, -bound], abs=1e-5)
    assert res.valid.all()
    # the judge compared each completion (first) with its prompt's reference (second)
    assert judge.calls == [(["a", "b", "c", "d"], ["y0", "y1", "y2", "y3"], ["ref of a", "ref of b", "ref of c", "ref of d"])]
    assert res.extras["prob_vs_reference"] == pytest.approx([0.5, 0.9, 1.0, 0.0])
    assert res.extras["why"] == ["row 0", "row 1", "row 2", "row 3"]  # the judge's extras pass through


def test_a_comparison_the_judge_could_not_answer_is_an_invalid_sample():
    reward = JudgeReward(FixedJudge([0.9, 0.99], valid=[True, False]), lambda ps: ["r"] * len(ps), epsilon=EPS)
    res = reward.score(["a", "b"], ["y", "z"])
    assert res.valid.tolist() == [True, False]
    assert res.rewards.tolist() == pytest.approx([math.log(9), 0.0], abs=1e-5)  # invalid → 0, not log 99
    assert reward(prompts=["a", "b"], completions=["y", "z"]) == [pytest.approx(math.log(9), abs=1e-5), None]  # TRL form


def test_judge_reward_rejects_a_bad_epsilon_and_a_short_reference_list():
    with pytest.raises(ValueError, match="epsilon"):
        JudgeReward(FixedJudge([0.5]), lambda ps: ["r"], epsilon=0.5)
    with pytest.raises(ValueError, match="gave 1 references for 2 prompts"):
        JudgeReward(FixedJudge([0.5, 0.5]), lambda ps: ["r"]).score(["a", "b"], ["y", "z"])


# ----------------------------------------------------------------------- FieldReferences

HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_field_references_from_pairs_and_from_any_text_field(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        HH,
        {"prompt": "2+2?", "chosen": "four", "rejected": "5"},  # a later row of the same prompt
    ])
    refs = FieldReferences(DataConfig(path=str(pairs), split="all"))
    hh_prompt = [{"role": "user", "content": "Hi there"}]
    assert refs(["2+2?", hh_prompt, "2+2?"]) == ["4", "Hello, how can I help?", "4"]  # first row wins
    assert FieldReferences(DataConfig(path=str(pairs), split="all"), "rejected")([hh_prompt]) == ["Go away."]
    assert len(refs) == 2

    golds = write_jsonl(tmp_path / "gold.jsonl", [
        {"prompt": "Capital of France?", "gold": "Paris."},
        {"messages": [{"role": "user", "content": "Hi"}], "gold": "Hello!"},
    ])
    refs = FieldReferences(DataConfig(path=str(golds), split="all"), "gold")
    assert refs([[{"role": "user", "content": "Hi"}], "Capital of France?"]) == ["Hello!", "Paris."]


def test_field_references_errors_name_the_file(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    refs = FieldReferences(DataConfig(path=str(pairs), split="all"))
    with pytest.raises(KeyError, match=r"1 of 2 prompts have no reference in field 'chosen' of .*pairs\.jsonl.*'3\+3\?'"):
        refs(["2+2?", "3+3?"])
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "gold": "x"}, {"prompt": "b", "gold": 3}])
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field 'gold': expected text, got int"):
        FieldReferences(DataConfig(path=str(rows), split="all"), "gold")
    kept = FieldReferences(DataConfig(path=str(rows), split="all", skip_invalid=True), "gold")
    assert kept(["a"]) == ["x"] and len(kept) == 1
    with pytest.raises(DataError, match="no row has a text field 'answer'"):
        FieldReferences(DataConfig(path=str(rows), split="all", skip_invalid=True), "answer")


# ----------------------------------------------------------------------- PolicyReferences


REFERENCE_MODEL = torch.nn.Linear(1, 1)  # what FakeHost.as_reference() yields: π_ref


class FakeEngine:
    def __init__(self):
        self.calls, self.widths = [], []

    def sample(self, model, ids, attn, sampling, *, eos_token_id, pad_token_id):
        assert model is REFERENCE_MODEL  # sampled inside as_reference()
        self.calls.append(ids.shape[0])
        self.widths.append(ids.shape[1])
        new = torch.randint(100, 200, (ids.shape[0], sampling.max_new_tokens))  # from the RNG it is given
        return torch.cat([ids, new], 1)


class FakeHost:
    def __init__(self, tokenizer):
        self.tokenizer, self.engine, self.device = tokenizer, FakeEngine(), torch.device("cpu")
        self.in_reference = 0

    @contextlib.contextmanager
    def as_reference(self):
        self.in_reference += 1
        yield REFERENCE_MODEL

    def autocast(self):
        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def tokenizer():
    from policies.tokenizers import load_tokenizer
    from conftest import SMOLLM2_TOKENIZER

    return load_tokenizer(SMOLLM2_TOKENIZER)


def test_policy_references_are_sampled_once_and_reloaded_from_the_cache(tmp_path, tokenizer):
    cache = tmp_path / "run" / "refs.jsonl"
    host = FakeHost(tokenizer)
    refs = PolicyReferences(host, SamplingConfig(max_new_tokens=3), cache)
    chat = [{"role": "user", "content": "Hi"}]
    first = refs(["p1", chat, "p1"])
    assert host.engine.calls == [2] and refs.sampled == 2  # two distinct prompts, one batch
    assert first[0] == first[2] and all(isinstance(t, str) and t for t in first)
    assert refs([chat, "p1"]) == [first[1], first[0]] and host.engine.calls == [2]  # no new sampling
    third = refs(["p3", "p1"])
    assert host.engine.calls == [2, 1]  # only the new prompt
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [row["key"] for row in lines] == ["p1", prompt_key(chat), "p3"]

    # a resumed run: a new instance reads the file and samples nothing
    host2 = FakeHost(tokenizer)
    again = PolicyReferences(host2, SamplingConfig(max_new_tokens=3), cache)
    assert again(["p1", chat, "p3"]) == [first[0], first[1], third[0]]
    assert host2.engine.calls == [] and again.sampled == 0


def test_policy_references_survive_a_cut_line_and_leave_the_run_rng_alone(tmp_path, tokenizer):
    cache = tmp_path / "refs.jsonl"
    host = FakeHost(tokenizer)
    refs = PolicyReferences(host, SamplingConfig(max_new_tokens=2), cache)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = refs(["p1"])
    assert torch.equal(torch.rand(3), expected)  # sampling references drew from an RNG of its own
    # the same prompts give the same references whenever they are first sampled
    assert PolicyReferences(FakeHost(tokenizer), SamplingConfig(max_new_tokens=2), None)(["p1"]) == a

    with open(cache, "a") as fh:
        fh.write('{"key": "p2", "refer')  # a crash mid-line
    resumed = PolicyReferences(FakeHost(tokenizer), SamplingConfig(max_new_tokens=2), cache)
    assert resumed(["p1"]) == a and len(resumed) == 1
    resumed(["p2"])  # sampled again, and appended after the cut line
    assert resumed.host.engine.calls == [1]
    assert len(PolicyReferences(FakeHost(tokenizer), SamplingConfig(max_new_tokens=2), cache)) == 2


def test_policy_references_keep_the_last_prompt_tokens(tokenizer):
    host = FakeHost(tokenizer)
    whole = PolicyReferences(host, SamplingConfig(max_new_tokens=2), None)
    whole(["a long prompt of many words"])
    cut = PolicyReferences(host, SamplingConfig(max_new_tokens=2), None, max_prompt_tokens=3)
    cut(["a long prompt of many words"])
    assert host.engine.widths[0] > 3 and host.engine.widths[1] == 3


# ------------------------------------------------------------------------------- registry


def test_judge_reward_config_checks():
    cfg = from_dict(JudgeRewardConfig, {"type": "judge_reward", "judge": {"mode": "cot"}})
    assert cfg.judge.mode == "cot" and cfg.judge.type == "genrm" and cfg.reference == "policy"
    with pytest.raises(ConfigError, match="reference: field needs reference_data"):
        from_dict(JudgeRewardConfig, {"reference": "field"})
    with pytest.raises(ConfigError, match=r"epsilon must lie in \(0, 0.5\)"):
        from_dict(JudgeRewardConfig, {"epsilon": 0})
    with pytest.raises(ConfigError, match="judge: genrm cot_samples must be at least 1"):
        from_dict(JudgeRewardConfig, {"judge": {"cot_samples": 0}})


def test_registry_builds_judge_reward_with_field_references(tiny_llama_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, HH])
    spec = {
        "type": "judge_reward",
        "judge": {"model": str(tiny_llama_dir), "device": "cpu", "autocast": "none", "engine": "hf", "min_mass": 0.0},
        "reference": "field",
        "reference_data": {"path": str(pairs), "split": "all"},
    }
    provider = build_provider(spec)
    assert isinstance(provider, JudgeReward) and provider.name == "judge_reward"
    assert isinstance(provider.judge, GenRMJudge) and isinstance(provider.reference, FieldReferences)
    seen, prefer = [], provider.judge.prefer
    provider.judge.prefer = lambda p, first, second: (seen.append(list(second)), prefer(p, first, second))[1]
    res = provider.score(["2+2?", [{"role": "user", "content": "Hi there"}]], ["4", "Hello, how can I help?"])
    assert res.valid.all() and torch.isfinite(res.rewards).all()
    assert seen == [["4", "Hello, how can I help?"]]  # each prompt's `chosen` as the reference
    # compared with its own reference and both orders averaged, a completion ties with itself
    assert res.rewards.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    assert res.extras["prob_vs_reference"] == pytest.approx([0.5, 0.5], abs=1e-6)
    # the tiny random model puts little mass on the verdict tokens: at the default bar, invalid
    strict = build_provider(spec | {"judge": spec["judge"] | {"min_mass": 0.05}, "name": "strict"})
    assert strict.name == "strict" and not strict.score(["2+2?"], ["5"]).valid.any()


def test_registry_samples_policy_references_into_the_state_dir(tiny_llama_dir, tmp_path):
    from policies.actor_critic import ActorCritic
    from rlhf.config import LoraConfig, ModelConfig

    judge = {"model": str(tiny_llama_dir), "device": "cpu", "autocast": "none", "min_mass": 0.0}
    with pytest.raises(ValueError, match="sampling references needs the policy: use it in PPO, or give reference: field"):
        build_provider({"type": "judge_reward", "judge": judge})
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), device="cpu", lora=LoraConfig(enabled=True)), "shared_lora", autocast="none")
    spec = {"type": "judge_reward", "judge": judge, "reference_sampling": {"max_new_tokens": 4}}
    provider = build_provider(spec, host=ac, state_dir=tmp_path / "run")
    assert provider.judge.lm.model is ac.policy  # the judge is the policy's base, adapters off
    res = provider.score(["2+2?", "Hi"], ["4", "Hello"])
    assert res.valid.all()
    (cache,) = (tmp_path / "run").glob("judge_references-*.jsonl")
    assert [json.loads(line)["key"] for line in cache.read_text().splitlines()] == ["2+2?", "Hi"]
    # a resumed run builds the provider again and reads the same references back
    again = build_provider(spec, host=ac, state_dir=tmp_path / "run")
    assert again.reference(["Hi", "2+2?"]) == provider.reference(["Hi", "2+2?"]) and again.reference.sampled == 0
    # `genrm` as a reward is judge_reward with this judge and the other keys at their defaults
    short = build_provider({"type": "genrm"} | judge, host=ac, state_dir=tmp_path / "run")
    assert isinstance(short, JudgeReward) and short.name == "genrm" and isinstance(short.reference, PolicyReferences)


def test_build_judge_from_a_mapping_a_config_or_a_judge(tiny_llama_dir):
    judge = build_judge({"model": str(tiny_llama_dir), "device": "cpu", "autocast": "none", "engine": "hf", "swap_order": False, "name": "j"})
    assert isinstance(judge, GenRMJudge) and judge.name == "j" and not judge.swap_order
    fixed = FixedJudge([0.5])
    assert build_judge(fixed) is fixed
    with pytest.raises(ConfigError, match=r"my judge.*unknown key 'swap'"):
        build_judge({"swap": True}, where="my judge")
    with pytest.raises(TypeError, match="expected a genrm config"):
        build_judge(42)  # type: ignore[arg-type]
    assert isinstance(build_judge(GenRMConfig(model=str(tiny_llama_dir), device="cpu", autocast="none", engine="hf")), GenRMJudge)

"""The reward interface: RewardResult, function/sum/ensemble providers, the registry, and TRL.

Expected numbers are computed by hand in the comments next to them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import typing
from dataclasses import dataclass

import pytest
import torch

import rewards.registry as registry
from rewards import EnsembleReward, FunctionReward, RewardConfig, RewardProvider, RewardResult, SumReward, build_provider
from rewards.function import FunctionRewardConfig
from rewards.registry import EnsembleRewardConfig, SumRewardConfig, WeightedTerm
from rewards.reward_model import load_reward_model_provider
from rlhf.config import ConfigError, from_dict, load_config, required

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a", "bb", "cccc"]


class Fixed(RewardProvider):
    """Returns fixed rewards (None = can't judge) and fixed extras."""

    def __init__(self, values, name="fixed", extras=None):
        self.values, self.name, self.extras = values, name, extras or {}

    def score(self, prompts, completions):
        return RewardResult.from_values(self.values, dict(self.extras))


# ----------------------------------------------------------------------- RewardResult


def test_reward_result_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"rewards must have shape \(B,\)"):
        RewardResult(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid \(3,\) does not match rewards \(2,\)"):
        RewardResult(torch.zeros(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"extras\['why'\] has 1 entries for 2 samples"):
        RewardResult(torch.zeros(2), torch.ones(2, dtype=torch.bool), {"why": ["x"]})


def test_reward_result_zeroes_invalid_entries_and_casts():
    res = RewardResult(torch.tensor([1.5, float("nan"), 3.0], dtype=torch.float64), torch.tensor([1, 0, 0]))
    assert res.rewards.dtype == torch.float32 and res.valid.dtype == torch.bool
    assert res.rewards.tolist() == [1.5, 0.0, 0.0]  # the NaN under valid=False is gone
    assert res.invalid_fraction == pytest.approx(2 / 3)


def test_from_values_marks_none_nan_inf_invalid():
    res = RewardResult.from_values([1.0, None, float("nan"), float("inf"), -2])
    assert res.valid.tolist() == [True, False, False, False, True]
    assert res.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, -2.0]
    assert RewardResult.from_values([]).invalid_fraction == 0.0


# ------------------------------------------------------------------------ function


@pytest.mark.parametrize("path", ["reward_fns:length_reward", "reward_fns.length_reward"])
def test_function_reward_by_dotted_path_binds_kwargs(path):
    provider = FunctionReward(path, kwargs={"scale": 0.5})
    res = provider.score(PROMPTS, COMPLETIONS)
    assert res.rewards.tolist() == [0.5, 1.0, 2.0]  # 0.5 · (1, 2, 4) characters
    assert res.valid.all()
    assert provider.name == "length_reward"  # TRL logs under this


def test_function_reward_from_plain_callable_and_invalid_entries():
    def judge(prompts, completions):
        return [None, float("nan"), 3]

    provider = FunctionReward(judge, name="j")
    res = provider.score(PROMPTS, COMPLETIONS)
    assert res.valid.tolist() == [False, False, True]
    assert res.rewards.tolist() == [0.0, 0.0, 3.0]
    assert provider.name == "j"
    assert FunctionReward(judge).name == "judge"


def test_function_reward_checks_what_the_function_returns():
    def short(prompts, completions):
        return [1.0]

    def wordy(prompts, completions):
        return [1.0, "good", 2.0]

    def scalar(prompts, completions):
        return 1.0

    with pytest.raises(ValueError, match=r"'short' returned 1 rewards for 3 completions"):
        FunctionReward(short).score(PROMPTS, COMPLETIONS)
    with pytest.raises(TypeError, match=r"'wordy' returned a str at index 1 \('good'\)"):
        FunctionReward(wordy).score(PROMPTS, COMPLETIONS)
    with pytest.raises(TypeError, match=r"'scalar' must return a list"):
        FunctionReward(scalar).score(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match=r"'reward_fns:length_reward': 2 prompts but 3 completions"):
        FunctionReward("reward_fns:length_reward").score(PROMPTS[:2], COMPLETIONS)


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
        ("reward_fns:no_such_fn", "module 'reward_fns' has no attribute 'no_such_fn'"),
        ("reward_fns.no_such_fn", "module 'reward_fns' has no attribute 'no_such_fn'"),
        ("reward_fns:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        ("length_reward", "must look like 'package.module:function'"),
    ],
)
def test_bad_dotted_paths_say_what_failed(path, fragment):
    with pytest.raises(ConfigError) as err:
        FunctionReward(path)
    assert fragment in str(err.value) and path in str(err.value)


def test_module_that_fails_to_import_is_reported_as_such(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_mod.py").write_text("import not_installed_dep_xyz\n\ndef f(prompts, completions):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing module 'broken_rewards_mod' failed: No module named 'not_installed_dep_xyz'"):
        FunctionReward("broken_rewards_mod:f")


# ----------------------------------------------------------------------- composites


def test_sum_weights_members_and_propagates_validity():
    a = Fixed([1.0, 2.0, 3.0], name="a", extras={"why": ["x", "y", "z"]})
    b = Fixed([10.0, None, 30.0], name="a")  # same name: still kept apart in extras
    res = SumReward([(2.0, a), (-0.5, b)]).score(PROMPTS, COMPLETIONS)
    # 2·1 − 0.5·10 = −3; sample 1 invalid (b can't judge) → 0; 2·3 − 0.5·30 = −9
    assert res.rewards.tolist() == [-3.0, 0.0, -9.0]
    assert res.valid.tolist() == [True, False, True]
    assert res.extras == {
        "0:a/reward": [1.0, 2.0, 3.0],
        "0:a/why": ["x", "y", "z"],
        "1:a/reward": [10.0, None, 30.0],
    }


A = [1.0, 2.0, 6.0]
B = [3.0, 2.0, 0.0]


@pytest.mark.parametrize(
    "aggregate, k, expected",
    [
        ("mean", 1.0, [2.0, 2.0, 3.0]),  # (1+3)/2, (2+2)/2, (6+0)/2
        ("min", 1.0, [1.0, 2.0, 0.0]),
        # population std of two values is |a−b|/2 = (1, 0, 3); mean − 0.5·std
        ("mean_minus_std", 0.5, [1.5, 2.0, 1.5]),
        ("mean_minus_std", 0.0, [2.0, 2.0, 3.0]),
    ],
)
def test_ensemble_aggregates(aggregate, k, expected):
    res = EnsembleReward([Fixed(A, "rm"), Fixed(B, "rm")], aggregate, k).score(PROMPTS, COMPLETIONS)
    assert res.rewards.tolist() == pytest.approx(expected)
    assert res.valid.all()
    assert res.extras == {"0:rm/reward": A, "1:rm/reward": B}


def test_ensemble_std_is_the_population_std_over_three_members():
    res = EnsembleReward([Fixed([0.0]), Fixed([3.0]), Fixed([6.0])], "mean_minus_std", 1.0).score(["p"], ["c"])
    # mean 3, population var (9+0+9)/3 = 6 → 3 − √6 (the unbiased std would give 3 − 3)
    assert res.rewards.item() == pytest.approx(3 - math.sqrt(6))


def test_ensemble_is_invalid_where_any_member_is():
    res = EnsembleReward([Fixed([1.0, None]), Fixed([5.0, 5.0])], "min").score(PROMPTS[:2], COMPLETIONS[:2])
    assert res.valid.tolist() == [True, False]
    assert res.rewards.tolist() == [1.0, 0.0]


def test_composites_validate_their_arguments():
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleReward([], "mean")
    with pytest.raises(ValueError, match="needs at least 2 members"):
        EnsembleReward([Fixed([1.0])], "mean_minus_std")
    with pytest.raises(ValueError, match="k must be >= 0"):
        EnsembleReward([Fixed([1.0]), Fixed([1.0])], "mean_minus_std", k=-1.0)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        EnsembleReward([Fixed([1.0])], "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        SumReward([])
    fn = FunctionRewardConfig(path="reward_fns:length_reward")
    with pytest.raises(ConfigError, match="at least one term"):
        SumRewardConfig(terms=())
    with pytest.raises(ConfigError, match="needs at least 2 members"):
        EnsembleRewardConfig(members=(fn,), aggregate="mean_minus_std")
    with pytest.raises(ConfigError, match="k must be >= 0"):
        EnsembleRewardConfig(members=(fn, fn), aggregate="mean_minus_std", k=-0.1)


# ------------------------------------------------------------------------- registry


def test_composite_configs_resolve_the_recursive_union():
    hints = typing.get_type_hints(WeightedTerm)
    assert hints["provider"] == RewardConfig
    assert typing.get_args(typing.get_type_hints(EnsembleRewardConfig)["members"])[0] == RewardConfig
    assert set(registry.PROVIDERS) == set(registry._union_tags(RewardConfig)) == {"bt", "grm", "genrm", "drlaif", "judge_reward", "function", "sum", "ensemble"}
    assert registry.PROVIDERS["bt"] is registry.PROVIDERS["grm"] is load_reward_model_provider


def test_recursive_union_resolves_whichever_module_is_imported_first():
    # A fresh interpreter, importing composite.py (the providers) before anything else of the
    # package; the composites' configs, which hold specs of any kind, live in registry.py.
    code = (
        "import typing, rewards.composite, rewards.registry as r; "
        "print(typing.get_type_hints(r.WeightedTerm)['provider'].__args__[-1].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "EnsembleRewardConfig"


def test_nested_spec_from_a_dict():
    spec = {
        "type": "sum",
        "terms": [
            {"weight": 2, "provider": {"type": "function", "path": "reward_fns:length_reward"}},
            {
                "weight": -1,
                "provider": {
                    "type": "ensemble",
                    "aggregate": "min",
                    "members": [
                        {"type": "function", "path": "reward_fns.length_reward", "kwargs": {"scale": 3}},
                        {"type": "function", "path": "reward_fns:none_if_empty", "name": "judge"},
                    ],
                },
            },
        ],
    }
    provider = build_provider(spec)
    assert isinstance(provider, SumReward) and provider.name == "sum"
    assert provider.members[1].name == "ensemble" and provider.members[1].members[1].name == "judge"
    res = provider.score(["p", "q"], ["ab", ""])
    # sample 0: 2·2 − min(3·2, 1) = 3; sample 1: the judge can't score "" → invalid
    assert res.rewards.tolist() == [3.0, 0.0]
    assert res.valid.tolist() == [True, False]
    assert res.extras["0:length_reward/reward"] == [2.0, 0.0]
    assert res.extras["1:ensemble/1:judge/reward"] == [1.0, None]
    # the same spec as config objects builds the same thing
    cfg = from_dict(RewardConfig, spec)
    assert isinstance(cfg, SumRewardConfig) and cfg.terms[0].weight == 2.0
    assert build_provider(cfg).score(["p", "q"], ["ab", ""]).rewards.tolist() == [3.0, 0.0]


def test_dispatch_goes_through_the_table(monkeypatch):
    class Unnamed(RewardProvider):
        def score(self, prompts, completions):
            return RewardResult.from_values([7.0] * len(completions))

    made = Unnamed()
    monkeypatch.setitem(registry.PROVIDERS, "function", lambda cfg, host=None: made)
    provider = build_provider({"type": "function", "path": "anything:at_all"})
    assert provider is made and provider.name == "function"  # no name of its own or in config → the type
    assert build_provider(made) is made  # a built provider passes through


def test_config_name_wins():
    provider = build_provider({"type": "function", "path": "reward_fns:length_reward", "name": "len"})
    assert provider.name == provider.__name__ == "len"


def test_unknown_type_suggests_nearest():
    with pytest.raises(ConfigError, match=r"got 'ensembel'; did you mean 'ensemble'\?"):
        build_provider({"type": "ensembel", "members": []})
    with pytest.raises(ConfigError, match=r"reward spec.*unknown key 'terms\[0\].wieght'.*did you mean 'terms\[0\].weight'"):
        build_provider({"type": "sum", "terms": [{"wieght": 1, "provider": {"type": "function", "path": "x:y"}}]})
    with pytest.raises(TypeError, match="expected a reward config"):
        build_provider(42)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunConfig:
    reward: RewardConfig = required("the reward spec")


RECIPE = """\
reward:
  type: sum
  terms:
    - weight: 2
      provider:
        type: function
        path: reward_fns:length_reward
"""


def test_reward_spec_from_a_yaml_recipe(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(RECIPE)
    cfg = load_config(RunConfig, recipe)
    assert cfg.reward == SumRewardConfig(terms=(WeightedTerm(FunctionRewardConfig(path="reward_fns:length_reward"), 2.0),))
    assert build_provider(cfg.reward).score(["p"], ["abc"]).rewards.tolist() == [6.0]

    recipe.write_text(RECIPE.replace("type: sum", "type: summ"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(recipe))}:2: field 'reward.type': .*got 'summ'; did you mean 'sum'\?"):
        load_config(RunConfig, recipe)
    # Inside list items too, the error names the file, the line and the field.
    recipe.write_text(RECIPE.replace("type: function", "type: functoin"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(recipe))}:6: field 'reward.terms\[0\].provider.type': .*did you mean 'function'"):
        load_config(RunConfig, recipe)
    recipe.write_text(RECIPE.replace("weight: 2", "weight: heavy"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(recipe))}:4: field 'reward.terms\[0\].weight': expected a number"):
        load_config(RunConfig, recipe)
    recipe.write_text("reward:\n  type: ensemble\n  aggregate: mean_minus_std\n  members:\n    - {type: function, path: a:b}\n")
    # A check in __post_init__: one line, at the line of the first key its message names (aggregate).
    with pytest.raises(ConfigError, match=rf"{re.escape(str(recipe))}:3: reward: ensemble aggregate 'mean_minus_std' needs at least 2 members"):
        load_config(RunConfig, recipe)


# ------------------------------------------------------------------------------ TRL


def test_trl_calling_convention_text_and_conversational():
    provider = SumReward([(1.0, FunctionReward("reward_fns:length_reward")), (1.0, FunctionReward("reward_fns:none_if_empty"))])
    kw = {"completion_ids": [[1], [2]], "trainer_state": object(), "answer": ["x", "y"]}  # TRL extras are ignored
    out = provider(prompts=["p", "q"], completions=["abc", ""], **kw)
    assert out == [4.0, None]  # 3 + 1; the empty one can't be judged
    out = provider(
        prompts=[[{"role": "user", "content": "p"}], [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]],
        completions=[[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "hi"}]],
        **kw,
    )
    assert out == [6.0, 3.0]  # len("hello") + 1, len("hi") + 1
    assert all(type(v) is float for v in out)


def test_one_real_grpo_step_with_our_provider(tiny_llama_dir, tmp_path, device):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    returned: list[list[float]] = []

    def counted_length(prompts, completions):
        returned.append([float(len(c)) for c in completions])
        return returned[-1]

    provider = SumReward([(0.5, FunctionReward(counted_length))])
    provider.name = "half_length"
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=False,  # GRPOConfig defaults to bf16; the test runs in float32
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": [f"Write about topic {i}." for i in range(8)]})
    trainer = GRPOTrainer(
        model=str(tiny_llama_dir),
        reward_funcs=[provider],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    trainer.train()

    assert trainer.state.global_step == 1
    assert len(returned) == 1 and len(returned[0]) == 4  # one generation batch: 1 prompt × 4 samples
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert "rewards/half_length/mean" in logged
    assert logged["rewards/half_length/mean"] == pytest.approx(0.5 * sum(returned[0]) / 4, rel=1e-5)

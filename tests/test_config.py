import dataclasses
import re
import typing

import pytest

from rlhf.cli import RECIPE_COMMANDS
from rlhf.config import ConfigError, DataConfig, LoraConfig, ModelConfig, describe, help_text, load_config
from rlhf.likelihood_demo import LikelihoodDemoConfig

RECIPE = """\
model:
  name: some/model
  lora:
    enabled: true
    r: 8
data:
  split: test
num_pairs: 10
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_recipe_and_overrides_build_nested_frozen_config(tmp_path):
    cfg = load_config(LikelihoodDemoConfig, write(tmp_path, RECIPE), ["model.lora.r=4", "sampling.temperature=1e-1", "sampling.temperature=1", "data.max_items=null"])
    assert cfg.model.name == "some/model"
    assert cfg.model.lora == LoraConfig(enabled=True, r=4)
    assert cfg.data.split == "test" and cfg.data.max_items is None
    assert cfg.sampling.temperature == 1.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.num_pairs == 10
    assert cfg.seed == LikelihoodDemoConfig().seed  # untouched keys keep their defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_pairs = 3  # type: ignore[misc]


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "model:\n  name: x\n  nmae: y\n")
    with pytest.raises(ConfigError) as err:
        load_config(LikelihoodDemoConfig, p)
    msg = str(err.value)
    assert f"{p}:3" in msg and "model.nmae" in msg and "did you mean 'model.name'" in msg


def test_unknown_override_is_attributed_to_the_command_line():
    with pytest.raises(ConfigError, match=r"command line override sampling.temprature.*did you mean 'sampling.temperature'"):
        load_config(LikelihoodDemoConfig, None, ["sampling.temprature=0.5"])


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("num_pairs: many\n", 1, "field 'num_pairs': expected an integer"),
        ("data:\n  split: validation\n", 2, "field 'data.split': expected one of 'all', 'train', 'test'"),
        ("model:\n  lora:\n    enabled: 1\n", 3, "field 'model.lora.enabled': expected true or false"),
        ("model: smollm2\n", 1, "field 'model': expected a mapping"),
    ],
)
def test_type_errors_name_file_line_and_field(tmp_path, text, line, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(LikelihoodDemoConfig, p)
    assert f"{p}:{line}" in str(err.value)
    assert fragment in str(err.value)


def test_value_checks_run_at_load(tmp_path):
    with pytest.raises(ConfigError, match="test_fraction must be in"):
        load_config(LikelihoodDemoConfig, write(tmp_path, "data:\n  test_fraction: 2\n"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(LikelihoodDemoConfig, None, ["num_pairs"])


def test_bad_yaml_and_non_mapping_recipes(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(LikelihoodDemoConfig, write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(LikelihoodDemoConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(LikelihoodDemoConfig, tmp_path / "missing.yaml")


def _config_classes(cls, seen=None):
    seen = set() if seen is None else seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp) and tp not in seen:
            _config_classes(tp, seen)
    return seen


def test_every_field_has_a_one_line_doc_shown_in_help():
    classes = set()
    for cmd in RECIPE_COMMANDS.values():
        cfg_cls, _ = cmd.resolve()
        classes |= _config_classes(cfg_cls)
    assert {ModelConfig, DataConfig, LoraConfig} <= classes
    for cls in classes:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{cls.__name__}.{f.name} lacks a one-line doc"
    text = help_text(LikelihoodDemoConfig)
    for key, _tp, _default, doc in describe(LikelihoodDemoConfig):
        assert key in text and doc in text


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    cfg = load_config(LikelihoodDemoConfig, recipes / "likelihood_demo.yaml")
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.split == "test"
    # Every shipped recipe parses strictly against the config of the command it names.
    from rlhf.cli import RECIPE_COMMANDS

    wanted = {"likelihood_demo.yaml": "likelihood-demo", "rm_bt_hh.yaml": "train-rm", "ppo_hh.yaml": "ppo",
              "quickstart.yaml": "pipeline", "hh_qlora_7b.yaml": "pipeline", "reward_ablation.yaml": "reward-ablation",
              "ppo_drlaif.yaml": "ppo", "ppo_genrm.yaml": "ppo", "train_judge.yaml": "train-judge", "train_judge_star.yaml": "train-judge"}
    assert {p.name for p in recipes.glob("*.yaml")} == set(wanted)
    for name, command in wanted.items():
        config_cls, _ = RECIPE_COMMANDS[command].resolve()
        load_config(config_cls, recipes / name)


def test_errors_inside_lists_name_their_line(tmp_path):
    from rlhf.ablation import AblationConfig

    p = write(tmp_path, "variants:\n  - name: BT\n  - name: G\n    objective: grm\n    regularizer: kl\n")
    with pytest.raises(ConfigError) as err:
        load_config(AblationConfig, p)
    assert f"{p}:5" in str(err.value) and "variants[1].regularizer" in str(err.value)
    cfg = load_config(AblationConfig, write(tmp_path, "variants:\n  - name: only\n    objective: grm\n", "ok.yaml"))
    assert [(v.name, v.objective) for v in cfg.variants] == [("only", "grm")]
    with pytest.raises(ConfigError, match="missing required key variants\\[0\\].name"):
        load_config(AblationConfig, write(tmp_path, "variants:\n  - objective: grm\n", "missing.yaml"))


def test_overrides_can_index_list_items(tmp_path):
    from rlhf.ablation import AblationConfig

    p = write(tmp_path, "variants:\n  - name: A\n  - name: B\n")
    cfg = load_config(AblationConfig, p, ["variants[1].objective=grm", "variants[0].name=Z"])
    assert [(v.name, v.objective) for v in cfg.variants] == [("Z", "bt"), ("B", "grm")]
    with pytest.raises(ConfigError, match=r"'variants' has 2 item\(s\) in the recipe"):
        load_config(AblationConfig, p, ["variants[5].name=C"])
    with pytest.raises(ConfigError, match="command line override variants\\[0\\].objectiv.*did you mean"):
        load_config(AblationConfig, p, ["variants[0].objectiv=grm"])


def test_partial_nested_block_keeps_the_fields_default():
    from rlhf.train_rm import TrainRMConfig

    cfg = load_config(TrainRMConfig, None, ["model.name=some/dir", "eval_data.max_items=8"])
    assert cfg.model.name == "some/dir" and cfg.model.lora.enabled  # TrainRMConfig's default model has LoRA on
    assert cfg.eval_data.split == "test" and cfg.eval_data.max_items == 8  # its default eval side is the test split
    assert load_config(TrainRMConfig, None, ["eval_data=null"]).eval_data is None


def test_imports_leave_the_environment_alone_and_the_cpu_engine_caps_onednns_cache():
    """Importing the packages changes no environment variable; building the packed engine on the
    CPU bounds oneDNN's primitive cache (before the first matmul of the run), and a capacity the
    user chose is kept."""
    import os
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ)\n"
            "import rlhf, rlhf.ppo, rlhf.cli, policies.actor_critic, rewards.registry\n"
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
            "import torch\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "from policies.engine_choice import build_engine\n"
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))\n"
            "m.config._attn_implementation = 'eager'\n"
            "build_engine('packed', m, torch.device('cpu'))\n"
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "64"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "512"


# ---- value checks in __post_init__: one line naming the file, line, block and key (issue 18, item 5)

FN = "{type: function, path: m:f}"  # a reward spec that builds (the path is only resolved at run time)

# (class whose __post_init__ rejects the value, host config loaded, recipe, 1-based line of the offending
# key, block's dotted path ("" at the top level), the key as the message names it)
POST_INIT_CASES = [
    ("LoraConfig", "rlhf.likelihood_demo:LikelihoodDemoConfig", "model:\n  name: x\n  lora:\n    alpha: 0\n", 4, "model.lora", "alpha"),
    ("LoraConfig", "rlhf.likelihood_demo:LikelihoodDemoConfig", "model:\n  lora:\n    r: 4\n    last_layers: 0\n", 4, "model.lora", "last_layers"),
    ("DataConfig", "rlhf.likelihood_demo:LikelihoodDemoConfig", "data:\n  split: test\n  max_items: 0\n", 3, "data", "max_items"),
    ("DataConfig", "rlhf.likelihood_demo:LikelihoodDemoConfig", "data:\n  offset: -1\n", 2, "data", "offset"),
    ("SamplingConfig", "rlhf.likelihood_demo:LikelihoodDemoConfig", "num_pairs: 3\nsampling:\n  top_p: 0\n", 3, "sampling", "top_p"),
    ("EngineConfig", "rlhf.config:EngineConfig", "merge_weights: false\ncritic_chunks: 0\n", 2, "", "critic_chunks"),
    ("PPOConfig", "rlhf.ppo:PPOConfig", f"reward: {FN}\nbatch_size: 8\nnum_minibatches: 3\n", 2, "", "batch_size"),
    ("PPOConfig", "rlhf.ppo:PPOConfig", f"reward: {FN}\neval_samples_per_prompt: 0\n", 2, "", "eval_samples_per_prompt"),
    ("DataConfig", "rlhf.ppo:PPOConfig", f"reward: {FN}\neval_prompts:\n  test_fraction: 1.5\n", 3, "eval_prompts", "test_fraction"),
    ("FunctionRewardConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: function\n  path: ' '\n", 3, "reward", "path"),
    ("WeightedTerm", "rlhf.ppo:PPOConfig", f"reward:\n  type: sum\n  terms:\n    - provider: {FN}\n      weight: .nan\n", 5, "reward.terms[0]", "weight"),
    # rewards/composite.py's message says "term", not "terms": the line is then the block's.
    ("SumRewardConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: sum\n  terms: []\n", 1, "reward", "term"),
    ("EnsembleRewardConfig", "rlhf.ppo:PPOConfig", f"reward:\n  type: ensemble\n  members: [{FN}]\n  k: -1\n", 4, "reward", "k"),
    ("EnsembleRewardConfig", "rlhf.ppo:PPOConfig", f"reward:\n  type: ensemble\n  members: [{FN}]\n  aggregate: mean_minus_std\n", 4, "reward", "aggregate"),
    ("PPOConfig", "rlhf.ppo:PPOConfig", f"reward: {FN}\nmax_invalid_fraction: 1.5\n", 2, "", "max_invalid_fraction"),
    ("DRLAIFConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: drlaif\n  min_mass: 1.5\n", 3, "reward", "min_mass"),
    ("GenRMConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: judge_reward\n  judge:\n    cot_samples: 0\n", 4, "reward.judge", "cot_samples"),
    ("GenRMConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: genrm\n  model: m\n  path: p\n", 3, "reward", "model"),
    ("JudgeRewardConfig", "rlhf.ppo:PPOConfig", "reward:\n  type: judge_reward\n  reference: field\n", 3, "reward", "reference"),
    ("TrainJudgeConfig", "rlhf.train_judge:TrainJudgeConfig", "method: sft\niterations: 2\n", 2, "", "iterations"),
    ("PipelineConfig", "rlhf.pipeline:PipelineConfig", f"rm:\n  output_dir: runs/rm\nppo:\n  reward: {FN}\n", 3, "", "ppo"),
]


def _resolve(target):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _raised_in(err):
    """The class whose __post_init__ raised the error that `err` reports."""
    tb, cls = err.__context__.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            cls = type(tb.tb_frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return cls


@pytest.mark.parametrize("cls_name, target, text, line, block, key", POST_INIT_CASES, ids=[f"{c[0]}-{c[5]}" for c in POST_INIT_CASES])
def test_post_init_value_errors_become_one_line_naming_file_line_block_and_key(tmp_path, cls_name, target, text, line, block, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(_resolve(target), p)
    msg = str(err.value)
    assert "\n" not in msg
    assert _raised_in(err.value) == cls_name  # the check this case is about, not an earlier one
    assert msg.startswith(f"{p}:{line}: {block}: " if block else f"{p}:{line}: "), msg
    assert re.search(rf"(?<!\w){re.escape(key)}(?!\w)", msg.split(": ", 1)[1]), msg


def test_every_config_post_init_has_a_case():
    """Every dataclass with a __post_init__ in the project is a config in POST_INIT_CASES, except
    RewardResult and PreferenceResult (built from tensors by providers, never from a recipe)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = set()
    for pkg in ("rlhf", "rewards", "policies"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(f, ast.FunctionDef) and f.name == "__post_init__" for f in node.body
                ):
                    found.add(node.name)
    assert found - {"RewardResult", "PreferenceResult"} == {case[0] for case in POST_INIT_CASES}


def test_post_init_error_from_an_override_and_from_a_dict(tmp_path):
    from rlhf.ppo import PPOConfig
    from rlhf.config import from_dict

    # The recipe leaves batch_size at its default (8): the override is the key to point at.
    p = write(tmp_path, f"reward: {FN}\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"^command line override num_minibatches: batch_size\b.*num_minibatches"):
        load_config(PPOConfig, p, ["num_minibatches=3"])
    # With batch_size set in the recipe, its line comes first (the message names it first).
    p = write(tmp_path, f"reward: {FN}\nbatch_size: 8\n", "set.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:2: batch_size\b.*num_minibatches"):
        load_config(PPOConfig, p, ["num_minibatches=3"])
    with pytest.raises(ConfigError, match=r"^config: sampling: sampling.max_new_tokens must be positive"):
        from_dict(LikelihoodDemoConfig, {"sampling": {"max_new_tokens": 0}})


def test_invalid_yaml_is_one_line_with_its_line(tmp_path):
    p = write(tmp_path, "num_pairs: 3\nmodel: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(LikelihoodDemoConfig, p)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{p}:3: invalid YAML: ")

import dataclasses
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
              "quickstart.yaml": "pipeline", "hh_qlora_7b.yaml": "pipeline", "reward_ablation.yaml": "reward-ablation"}
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


def test_importing_rlhf_caps_onednns_primitive_cache_unless_the_user_set_it():
    """`import rlhf` bounds oneDNN's primitive cache before torch's first matmul (see
    rlhf/__init__.py); a capacity the user chose is kept."""
    import os
    import subprocess
    import sys

    code = "import os, rlhf; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "64"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "512"

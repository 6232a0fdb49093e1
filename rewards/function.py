"""A Python function as a reward provider, in TRL's reward-function convention.

    fn(prompts=[x_1..x_B], completions=[y_1..y_B], **kwargs) -> [r_1..r_B],  r_i ∈ ℝ ∪ {None}

None (or NaN/inf) means the function could not judge sample i: `valid[i] = False` and the
loop decides what to do with it. The same function can therefore be handed to TRL's
GRPO/RLOO trainers directly, or wrapped here to join sums, ensembles and our own loops.

Differences from calling the function straight from TRL: prompts are text or chat messages
(`rlhf.data.Prompt`) and completions are always text (a conversational completion's message
contents are joined, see `rewards.base._completion_text`); TRL's extra keyword arguments
(`completion_ids`, `trainer_state`, dataset columns) are not forwarded, since a provider must
behave the same inside a composite as on its own. Only the config's `kwargs` are bound.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from rewards.base import RewardProvider, RewardResult
from rlhf.config import ConfigError, doc, doc_factory, required
from rlhf.data import Prompt


@dataclass(frozen=True, kw_only=True)
class FunctionRewardConfig:
    type: Literal["function"] = doc("function", "a Python function fn(prompts=, completions=, **kwargs) -> list[float | None]")
    path: str = required("where the function lives: 'package.module:function' or 'package.module.function'")
    kwargs: dict[str, Any] = doc_factory(dict, "keyword arguments bound to every call of the function")
    name: str | None = doc(None, "name in logs (TRL logs rewards/<name>/mean); default: the function's __name__")

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ConfigError("function reward: 'path' must name a function, e.g. 'my_pkg.rewards:length_reward'")


def resolve_function(path: str) -> Callable[..., Any]:
    """Import 'pkg.mod:attr[.attr]' or 'pkg.mod.attr' and return the callable it names.

    Each failure says which of the three steps failed (module not found, attribute missing,
    not callable), because "could not load reward function" alone sends a user guessing.
    """
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ConfigError(f"reward function path '{path}' must look like 'package.module:function' or 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Tell "the module itself is missing" apart from "the module imports something missing".
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"reward function '{path}': module '{module_name}' not found (is it on sys.path / installed?)") from err
        raise ConfigError(f"reward function '{path}': importing module '{module_name}' failed: {err}") from err
    except Exception as err:  # a bug inside the user's module: report it, never swallow it
        raise ConfigError(f"reward function '{path}': importing module '{module_name}' failed: {type(err).__name__}: {err}") from err
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward function '{path}': module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function '{path}': '{attr_path}' is a {type(obj).__name__}, not callable")
    return obj


class FunctionReward(RewardProvider):
    """Wraps `fn(prompts=, completions=, **kwargs) -> list[float | None]` as a provider.

    `fn` is a callable, or a dotted path resolved by `resolve_function`. `kwargs` are bound to
    every call (e.g. a target length). The returned list is checked: length B, each entry a
    real number or None; non-finite numbers count as "could not judge".
    """

    def __init__(self, fn: Callable[..., Any] | str, kwargs: dict[str, Any] | None = None, name: str | None = None):
        self.path = fn if isinstance(fn, str) else None
        self.fn = resolve_function(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"FunctionReward needs a callable or a dotted path, got {type(self.fn).__name__}")
        self.kwargs = dict(kwargs or {})
        # TRL logs each reward under its __name__, so default to the function's own name.
        self.name = name or getattr(self.fn, "__name__", type(self.fn).__name__)

    @classmethod
    def from_config(cls, cfg: FunctionRewardConfig) -> FunctionReward:
        return cls(cfg.path, cfg.kwargs, cfg.name)

    @property
    def _label(self) -> str:
        return f"reward function '{self.path or self.name}'"

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        if len(prompts) != len(completions):
            raise ValueError(f"{self._label}: {len(prompts)} prompts but {len(completions)} completions")
        out = self.fn(prompts=list(prompts), completions=list(completions), **self.kwargs)
        if hasattr(out, "tolist"):  # a tensor or numpy array is fine too
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise TypeError(f"{self._label} must return a list of float | None, got {type(out).__name__}")
        if len(out) != len(completions):
            raise ValueError(f"{self._label} returned {len(out)} rewards for {len(completions)} completions")
        for i, v in enumerate(out):
            # bool is a Real too; TRL accepts it (True == 1.0), so do we.
            if v is not None and not isinstance(v, numbers.Real):
                raise TypeError(f"{self._label} returned a {type(v).__name__} at index {i} ({v!r}); expected float or None")
        # from_values marks None and non-finite (NaN, inf) entries invalid and stores 0 there.
        return RewardResult.from_values(out)

"""Frozen dataclass configs loaded from YAML recipes, with `key.sub=value` overrides.

A recipe is a YAML mapping whose keys mirror a config dataclass. Every field carries a
one-line doc (`doc(default, "...")`) that `rlhf <command> --help` prints. Loading is strict:
an unknown key is an error that names the recipe file and line and suggests the nearest valid
key; a value of the wrong type is an error naming the file, line and field. Values are checked
once here, so the rest of the code can trust a config object and never re-validate strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or command-line override that does not fit its config dataclass."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line doc shown by `--help`."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use doc_factory for mutable defaults")
    if dataclasses.is_dataclass(default):
        # Frozen dataclass instances are immutable but shared; a factory keeps each config
        # its own copy and keeps dataclasses from rejecting the default.
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def doc_factory(factory: Any, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


def required(help: str) -> Any:
    """A dataclass field the recipe must set (no default), with its one-line doc."""
    return field(metadata={"help": help})


# --------------------------------------------------------------------------------------
# Shared config blocks. Commands compose these into their own top-level config.
# --------------------------------------------------------------------------------------

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Quantization = Literal["none", "4bit", "8bit"]


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = doc(False, "wrap the model in a peft LoRA adapter")
    r: int = doc(16, "LoRA rank")
    alpha: int = doc(32, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = doc(0.0, "LoRA dropout (0 keeps PPO's log-probs deterministic)")
    target_modules: str = doc("all-linear", "modules to adapt: 'all-linear' or a comma-separated list of names")
    path: str | None = doc(None, "load an existing adapter from this directory instead of creating a new one")
    last_layers: int | None = doc(None, "adapt only the last N transformer layers (backprop then stops below them: faster)")

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.last_layers is not None and self.last_layers <= 0:
            raise ConfigError(f"lora.last_layers must be positive, got {self.last_layers}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = doc("smollm2-135m-instruct", "known alias (see `rlhf models`), local directory, or hub id")
    dtype: Dtype = doc("float32", "weight/compute dtype; 'auto' picks bfloat16 on a GPU that supports it, else float32")
    quantization: Quantization = doc("none", "load the base weights in 4-bit NF4 or 8-bit through bitsandbytes")
    lora: LoraConfig = doc(LoraConfig(), "LoRA adapter settings")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    trust_remote_code: bool = doc(False, "allow custom modelling code from the model directory (off for safety)")
    revision: str | None = doc(None, "hub revision (branch, tag or commit) when `name` is a hub id")
    gradient_checkpointing: bool = doc(False, "recompute each layer's activations in the backward pass: far less memory, about one more forward of compute")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = doc(
        "auto", "attention kernel; 'auto': eager on the CPU (faster than torch's CPU flash kernel at RLHF lengths, docs/performance.md), sdpa on a GPU")
    engine: Literal["auto", "hf", "packed"] = doc(
        "auto", "how the model runs (policies.engine): 'hf' transformers' forward and generate; 'packed' the padding-free CPU path for Llama-family models; 'auto' packed for those on the CPU, else hf")


@dataclass(frozen=True)
class DataConfig:
    path: str = doc("../shared/data/hh-rlhf/harmless-base/test.jsonl.gz", "data file (JSONL, JSON, .gz) or `datasets` directory")
    split: Literal["all", "train", "test"] = doc("train", "which side of the deterministic prompt-hash split to use")
    test_fraction: float = doc(0.1, "fraction of prompts that go to the test side of the split")
    offset: int = doc(0, "skip this many rows (after the split) before max_items: disjoint slices of one side, e.g. a train-side validation set")
    max_items: int | None = doc(None, "use at most this many rows (after the split and offset), in file order")
    skip_invalid: bool = doc(False, "skip malformed rows (their count and reasons are reported) instead of failing")

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ConfigError(f"data.test_fraction must be in [0, 1], got {self.test_fraction}")
        if self.max_items is not None and self.max_items <= 0:
            raise ConfigError(f"data.max_items must be positive, got {self.max_items}")
        if self.offset < 0:
            raise ConfigError(f"data.offset must be non-negative, got {self.offset}")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = doc(64, "most tokens to generate per completion")
    temperature: float = doc(0.7, "sampling temperature (0 = greedy); log-probs are always recomputed at this temperature")
    top_k: int = doc(0, "top-k filter; 0 disables it so samples come from the full policy distribution")
    top_p: float = doc(1.0, "nucleus filter; 1.0 disables it")

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(
                f"sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                f"got {self.temperature}, {self.top_p}, {self.top_k}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Tuning of how the models run, apart from what the algorithm computes: the same losses and
    samples whatever is set here (docs/performance.md has the measurements behind the defaults)."""

    critic_chunks: int | None = doc(None, "one process: row chunks the critic's forward and backward run in, after the policy's, so the two graphs never coexist in full (null: 1 for shared_lora, 4 for separate full models)")
    keep_prompt_pass: bool | None = doc(None, "packed engine: on the fused first step, keep the policy's pass over the prompts from sampling and continue it in the training forward (null: on for shared_lora)")
    prepack_frozen: bool = doc(True, "packed engine, shared_lora: keep the frozen base's matmul weights in oneDNN's blocked layout too (faster matmuls, one more copy of the base)")
    merge_weights: bool = doc(True, "packed engine: sample and score from one merged copy of the matmul weights (LoRA merged in) instead of running every adapter")

    def __post_init__(self) -> None:
        if self.critic_chunks is not None and self.critic_chunks < 1:
            raise ConfigError(f"critic_chunks must be at least 1, got {self.critic_chunks}")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a YAML recipe (optional) and `key.sub=value` overrides, strictly."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "<defaults>"
    if recipe is not None:
        source = str(recipe)
        try:
            text = Path(recipe).read_text()
        except FileNotFoundError:
            raise ConfigError(f"recipe not found: {recipe}") from None
        data, lines = _parse_yaml(text, source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        path = tuple(key.strip().split("."))
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # a plain string that YAML can't parse, e.g. 'a: b'
        _set_path(data, path, value)
        lines[path] = 0  # 0 marks "from the command line"
    return _build(cls, data, (), lines, source)


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """YAML → plain dict plus the 1-based line of every key, for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:  # one line: `file:line: invalid YAML: [context (line n); ]problem`
        mark, context = err.problem_mark or err.context_mark, err.context
        if context and err.context_mark and err.context_mark.line != mark.line:
            context += f" (line {err.context_mark.line + 1})"
        what = "; ".join(one_line(part) for part in (context, err.problem) if part)
        raise ConfigError(f"{f'{source}:{mark.line + 1}' if mark else source}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {one_line(str(err))}") from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: a recipe must be a mapping of keys to values")
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = (*prefix, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode) and prefix:
            # List items are addressed as `key[i]`, the same paths `_convert` reports.
            for i, item in enumerate(n.value):
                key = (*prefix[:-1], f"{prefix[-1]}[{i}]")
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    walk(node, ())
    data = yaml.safe_load(text)
    return data, lines


_INDEXED = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<index>\d+)\]$")


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set `value` at a dotted path; a `key[i]` part indexes a list that the recipe sets."""
    cur: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        m = _INDEXED.match(part)
        if m:
            items = cur.get(m["key"]) if isinstance(cur, dict) else None
            i = int(m["index"])
            if not isinstance(items, list) or i >= len(items):
                size = len(items) if isinstance(items, list) else 0
                raise ConfigError(
                    f"override {'.'.join(path)}: '{m['key']}' has {size} item(s) in the recipe; "
                    f"index {i} can only change an item the recipe lists"
                )
            if last:
                items[i] = value
            elif not isinstance(items[i], dict):
                items[i] = {}
            cur = items[i]
        elif last:
            cur[part] = value
        else:
            if not isinstance(cur.get(part), dict):
                cur[part] = {}
            cur = cur[part]


def _where(source: str, lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> str:
    line = lines.get(path)
    if line == 0:
        return f"command line override {'.'.join(path)}"
    return f"{source}:{line}" if line else source


def _build(cls: type[T], data: Any, prefix: tuple[str, ...], lines: dict, source: str) -> T:
    name = ".".join(prefix) or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, lines, prefix)}: field '{name}': expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = (*prefix, str(key))
        if key not in fields:
            valid = [".".join((*prefix, k)) for k in fields]
            close = difflib.get_close_matches(".".join(path), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{_where(source, lines, path)}: unknown key '{'.'.join(path)}'{hint}")
        default = _default_of(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A nested block set in part keeps the rest of the *field's* default (e.g. a command
            # whose default model has LoRA on keeps it when only model.name is given).
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[key] = _convert(hints[key], value, path, lines, source)
    missing = [
        k for k, f in fields.items()
        if k not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        keys = ", ".join(".".join((*prefix, k)) for k in missing)
        raise ConfigError(f"{_where(source, lines, prefix) if prefix else source}: missing required key {keys}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # a value check in __post_init__ (ConfigError is one too)
        raise _invalid(err, prefix, list(kwargs), lines, source) from None


def _invalid(err: ValueError, prefix: tuple[str, ...], keys: list[str], lines: dict, source: str) -> ConfigError:
    """A config constructor's ValueError as one line: `where: block: message`.

    `where` is the line of the first key of the block that the message names and the recipe
    (or command line) sets, else the block's own line, else the source alone; `block` is the
    block's dotted path (left out for the top level, whose keys the message names as they are).
    """
    message = one_line(str(err))
    named = sorted(
        (m.start(), path)
        for key in keys
        if (path := (*prefix, key)) in lines and (m := re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message))
    )
    where = _where(source, lines, named[0][1] if named else prefix) if named or prefix else source
    block = f"{'.'.join(prefix)}: " if prefix else ""
    return ConfigError(f"{where}: {block}{message}")


def one_line(message: str) -> str:
    """`message` with its lines joined by spaces, so that an error prints as one line."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, merging nested mappings; other values (lists too) replace."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _convert(tp: Any, value: Any, path: tuple[str, ...], lines: dict, source: str) -> Any:
    """Check `value` against annotation `tp`; return it (nested dataclasses built)."""
    key = ".".join(path)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{_where(source, lines, path)}: field '{key}': expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, lines, source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise fail("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        table = _discriminated(args)
        if table:
            return _build_tagged(table, value, path, lines, source)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, lines, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else fail(" or ".join(_type_name(a) for a in args))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_convert(item_tp, v, (*path[:-1], f"{path[-1]}[{i}]"), lines, source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean a number.
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {tp!r}")


def _discriminated(args: tuple[Any, ...]) -> dict[str, type] | None:
    """{tag: class} when every non-None member is a dataclass with a `type: Literal[tag]` field."""
    members = [a for a in args if a is not type(None)]
    table: dict[str, type] = {}
    for m in members:
        if not dataclasses.is_dataclass(m):
            return None
        tag_tp = typing.get_type_hints(m).get("type")
        if typing.get_origin(tag_tp) is not Literal:
            return None
        for tag in typing.get_args(tag_tp):
            table[tag] = m
    return table or None


def _build_tagged(table: dict[str, type], value: Any, path: tuple[str, ...], lines: dict, source: str) -> Any:
    """Pick the dataclass named by the mapping's `type` key, then build it strictly."""
    key = ".".join(path) or "config"
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(source, lines, path)}: field '{key}': expected a mapping with a 'type' key, got {value!r}")
    tag = value.get("type")
    if tag not in table:
        close = difflib.get_close_matches(str(tag), list(table), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = (*path, "type")
        raise ConfigError(
            f"{_where(source, lines, where)}: field '{'.'.join(where)}': expected one of "
            f"{', '.join(repr(t) for t in table)}, got {tag!r}{hint}"
        )
    return _build(table[tag], value, path, lines, source)


def from_dict(tp: Any, data: Any, where: str = "config") -> Any:
    """Build a config (a dataclass, or a tagged union of dataclasses) from plain Python data,
    with the same strict checks as a recipe. `where` names the source in error messages."""
    return _convert(tp, data, (), {}, where) if not dataclasses.is_dataclass(tp) else _build(tp, data, (), {}, where)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------
# Introspection: --help text and saving the resolved config of a run.
# --------------------------------------------------------------------------------------


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field, nested blocks flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            rows.append((key, "mapping or null", "set", f"{f.metadata.get('help', '')}; its keys:"))
            rows.extend(describe(inner[0], key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        rows.append((key, _type_label(tp), default, f.metadata.get("help", "")))
    return rows


def _type_label(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType) and (table := _discriminated(typing.get_args(tp))):
        return "mapping with type: " + "|".join(table)
    if typing.get_origin(tp) is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_label(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    return getattr(tp, "__name__", str(tp))


def help_text(cls: type) -> str:
    rows = describe(cls)
    width = max(len(k) for k, *_ in rows)
    out = ["recipe keys (set in the YAML recipe or override as key.sub=value):"]
    for key, tp, default, text in rows:
        suffix = "required" if default == "required" else f"default {default}"
        out.append(f"  {key:<{width}}  {text} [{tp}; {suffix}]")
    return "\n".join(out)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

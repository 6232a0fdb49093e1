"""Loading and splitting preference pairs and prompts.

Everything here is plain Python (json, gzip, hashlib); the ``datasets`` library is
imported lazily, and only when a ``save_to_disk`` directory is read, so importing this
module is cheap and has no side effects.

The pieces, in the order data flows through them:

* :func:`iter_rows` reads raw rows (dicts) from ``.jsonl``, ``.jsonl.gz``, ``.json``,
  ``.json.gz`` or a ``datasets`` ``save_to_disk`` directory, tagging each row with its
  location (``"path:line"`` or ``"path: row N"``) so that every error can point at it.
* :func:`parse_pair` / :func:`parse_prompt` turn one row into a
  :class:`PreferencePair` / :class:`PromptRecord`, accepting the common layouts
  (explicit prompt, TRL conversational, TRL implicit prompt, Anthropic HH transcripts,
  MT-bench questions) and raising :class:`DataError` for anything malformed.
* :func:`load_pairs` / :func:`load_prompts` combine the two, optionally skipping bad
  rows (but always reporting them).
* :func:`split_by_prompt` / :func:`select_split` split deterministically by a hash of
  the prompt, so no prompt is on both sides and every machine gets the same split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "Message",
    "Prompt",
    "PreferencePair",
    "PromptRecord",
    "DataError",
    "Loaded",
    "SUPPORTED_FORMATS",
    "DEFAULT_SALT",
    "DEFAULT_TEST_FRACTION",
    "iter_rows",
    "parse_pair",
    "parse_prompt",
    "load_pairs",
    "load_prompts",
    "prompt_key",
    "split_by_prompt",
    "select_split",
    "load_split",
    "summarize_pairs",
]

# --------------------------------------------------------------------------- types

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""

Prompt = str | list[Message]
"""Plain text, or chat messages ending with a user turn."""

# Roles a chat template can be expected to know. Anything else is almost certainly a
# typo ("usr", "bot") that would otherwise surface much later as a template error.
_ROLES = frozenset({"system", "user", "assistant", "tool"})

SUPPORTED_FORMATS = (
    ".jsonl",
    ".jsonl.gz",
    ".json",
    ".json.gz",
    "a directory written by datasets.Dataset.save_to_disk / DatasetDict.save_to_disk",
)

DEFAULT_SALT = "pluggable-rlhf"
DEFAULT_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion.

    ``source`` is where the row came from (``"path:line"`` or ``"path: row N"``), so a
    pair that looks wrong later can be traced back to the file.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    id: str | None = None
    subset: str | None = None
    source: str = ""
    margin: float | None = None  # optional BT margin m: the loss becomes −log σ(r_c − r_r − m)
    label: float | None = None  # optional soft label p = P(chosen ≻ rejected) ∈ [0, 1] (an AI labeller's); None: 1


@dataclass(frozen=True)
class PromptRecord:
    """A prompt on its own (for policy rollouts and evaluation)."""

    prompt: Prompt
    id: str | None = None
    subset: str | None = None
    source: str = ""


class DataError(ValueError):
    """A data file or row is malformed.

    The message always starts with the location, so it can be pasted into an editor:
    ``"{path}:{line}: field '{field}': {what}"`` for JSONL, ``"{path}: row N: ..."``
    for JSON arrays and ``datasets`` directories, and without the ``field`` part for
    errors that are not about one field (invalid JSON, a row that is not an object).
    """

    def __init__(self, location: str, what: str, field: str | None = None) -> None:
        self.location = location
        self.what = what
        self.field = field
        where = f"{location}: field '{field}'" if field is not None else location
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep it picklable (e.g. across DataLoader workers)
        return (type(self), (self.location, self.what, self.field))


T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """What a loader returns: the parsed items and the messages of rows it skipped."""

    items: list[T]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)


class _HasPrompt(Protocol):
    @property
    def prompt(self) -> Prompt: ...


P = TypeVar("P", bound=_HasPrompt)

# ------------------------------------------------------------------- reading rows


def iter_rows(path: str | os.PathLike[str], *, split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, row)`` for every row of a data file, raising on the first bad one.

    ``location`` is ``"path:line"`` (1-based, blank lines counted but not yielded) for
    JSONL, and ``"path: row N"`` (1-based) for JSON arrays and ``datasets`` directories.
    ``split`` picks the split of a ``DatasetDict`` directory (default ``"train"``); it is
    an error to pass it for any other format, so a typo cannot silently load everything.
    """
    for location, row in _iter_entries(path, split):
        if isinstance(row, DataError):
            raise row
        yield location, row


def _iter_entries(path: str | os.PathLike[str], split: str | None) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Like :func:`iter_rows`, but *yields* row-level errors instead of raising them.

    This lets the loaders skip a bad row (``skip_invalid=True``) and carry on. Errors
    that are not about one row (missing file, truncated gzip, unknown format) are still
    raised, because nothing after them can be trusted.
    """
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {name}")
    if p.is_dir():
        entries = _iter_datasets_dir(p, name, split)
    else:
        if split is not None:
            raise ValueError(f"{name}: split={split!r} only applies to a DatasetDict save_to_disk directory")
        lower = p.name.lower()
        if lower.endswith((".jsonl", ".jsonl.gz")):
            entries = _iter_jsonl(p, name)
        elif lower.endswith((".json", ".json.gz")):
            entries = _iter_json(p, name)
        else:
            raise DataError(name, "unsupported file format; supported: " + ", ".join(SUPPORTED_FORMATS))
    count = 0
    for entry in entries:
        count += 1
        yield entry
    if count == 0:
        raise DataError(name, "no rows (empty file)")


def _open_binary(p: Path):
    """Open plain or gzip-compressed files as a binary stream, chosen by suffix."""
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")


def _gzip_error(name: str, exc: Exception) -> DataError:
    """Turn the assorted gzip/zlib failures into one readable error naming the file."""
    if isinstance(exc, EOFError):
        return DataError(name, f"truncated gzip stream (the file ends before the compressed data does): {exc}")
    return DataError(name, f"corrupt or not gzip data: {exc}")


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _iter_jsonl(p: Path, name: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield one entry per non-blank line of a (possibly gzipped) JSONL file.

    Lines are read as bytes and decoded one by one, so a single line of bad UTF-8 is a
    row error (skippable) rather than a failure of the whole stream.
    """
    lineno = 0
    try:
        with _open_binary(p) as fh:
            for raw in fh:
                lineno += 1
                try:
                    # utf-8-sig on the first line drops a byte-order mark some editors add.
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield f"{name}:{lineno}", DataError(f"{name}:{lineno}", f"not valid UTF-8: {exc}")
                    continue
                if not text.strip():
                    continue
                location = f"{name}:{lineno}"
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    hint = "" if text.endswith("\n") else " (last line has no newline: is the file truncated?)"
                    yield location, DataError(location, f"invalid JSON: {exc}{hint}")
                    continue
                yield location, _as_object(row, location)
    except _GZIP_ERRORS as exc:
        raise _gzip_error(name, exc) from exc


def _iter_json(p: Path, name: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield the rows of a JSON file: a top-level array, or ``{"<key>": [...]}``."""
    try:
        with _open_binary(p) as fh:
            raw = fh.read()
    except _GZIP_ERRORS as exc:
        raise _gzip_error(name, exc) from exc
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(name, f"not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        # A whole-file JSON document cannot be partly skipped, so this always raises.
        raise DataError(f"{name}:{exc.lineno}", f"invalid JSON: {exc}") from exc
    rows = _unwrap_json(data, name)
    for i, row in enumerate(rows, start=1):
        location = f"{name}: row {i}"
        yield location, _as_object(row, location)


def _unwrap_json(data: Any, name: str) -> list[Any]:
    """Find the list of rows in a parsed JSON document."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        # Exports often wrap the rows, e.g. {"data": [...]} or {"train": [...]}; accept
        # that only when it is unambiguous.
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            return data[lists[0]]
        raise DataError(
            name,
            "expected a top-level array of objects, or an object with exactly one "
            f"list-valued key; found an object whose list-valued keys are {lists}",
        )
    raise DataError(name, f"expected a top-level array of objects, got {_type_name(data)}")


def _as_object(row: Any, location: str) -> dict[str, Any] | DataError:
    """Rows must be JSON objects; anything else is a (skippable) row error."""
    if isinstance(row, dict):
        return row
    return DataError(location, f"expected a JSON object, got {_type_name(row)}")


def _iter_datasets_dir(p: Path, name: str, split: str | None) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield the rows of a ``datasets`` ``save_to_disk`` directory (Dataset or DatasetDict)."""
    is_dict = (p / "dataset_dict.json").is_file()
    is_dataset = (p / "dataset_info.json").is_file() or (p / "state.json").is_file()
    if not (is_dict or is_dataset):
        raise DataError(
            name,
            "directory is not a datasets save_to_disk directory (no dataset_dict.json, "
            "dataset_info.json or state.json); supported: " + ", ".join(SUPPORTED_FORMATS),
        )
    if not is_dict and split is not None:
        raise ValueError(f"{name}: split={split!r} given, but this directory holds a single Dataset, not a DatasetDict")
    try:
        import datasets  # lazy: heavy import, only needed for this format
    except ImportError as exc:  # pragma: no cover - datasets is a declared dependency
        raise DataError(name, "reading a save_to_disk directory needs the 'datasets' package") from exc

    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        wanted = "train" if split is None else split
        if wanted not in loaded:
            raise DataError(name, f"split {wanted!r} not found; available splits: {sorted(loaded.keys())}")
        loaded = loaded[wanted]
    for i, row in enumerate(loaded, start=1):
        location = f"{name}: row {i}"
        yield location, _as_object(row, location)


# ------------------------------------------------------------------ field helpers


def _type_name(value: Any) -> str:
    """JSON-ish name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _get(row: Mapping[str, Any], key: str) -> Any:
    """A field's value, with ``null`` treated as absent.

    ``datasets`` fills columns missing from a row with ``None``, and JSON exports do the
    same with ``null``; treating both as "not there" lets one parser serve all sources.
    """
    return row.get(key)


def _parse_messages(value: Any, location: str, field: str) -> list[Message]:
    """Validate a list of ``{role, content}`` messages; return clean copies.

    Only ``role`` and ``content`` are kept, matching :data:`Message`.
    """
    if not isinstance(value, (list, tuple)):
        raise DataError(location, f"expected a list of messages, got {_type_name(value)}", field)
    if not value:
        raise DataError(location, "empty list of messages", field)
    messages: list[Message] = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise DataError(location, f"expected a message object, got {_type_name(msg)}", where)
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            raise DataError(location, "message has no 'role'", f"{where}.role")
        if not isinstance(role, str):
            raise DataError(location, f"expected text, got {_type_name(role)}", f"{where}.role")
        if role not in _ROLES:
            raise DataError(location, f"unknown role {role!r}; expected one of {sorted(_ROLES)}", f"{where}.role")
        if content is None:
            raise DataError(location, "message has no 'content'", f"{where}.content")
        if not isinstance(content, str):
            raise DataError(location, f"expected text, got {_type_name(content)}", f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def _parse_prompt_value(value: Any, location: str, field: str) -> Prompt:
    """A prompt is non-blank text, or messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(location, "empty prompt", field)
        return value
    if isinstance(value, (list, tuple)):
        messages = _parse_messages(value, location, field)
        if messages[-1]["role"] != "user":
            raise DataError(location, f"prompt messages must end with a user turn, last is {messages[-1]['role']!r}", field)
        return messages
    raise DataError(location, f"expected text or a list of messages, got {_type_name(value)}", field)


def _parse_completion(value: Any, location: str, field: str) -> str:
    """A completion next to an explicit prompt: text, or ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        messages = _parse_messages(value, location, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise DataError(location, f"expected exactly one assistant message, got roles {roles}", field)
        text = messages[0]["content"]
    else:
        raise DataError(location, f"expected text or a list of messages, got {_type_name(value)}", field)
    if not text.strip():
        raise DataError(location, "empty completion", field)
    return text


def _first_field(row: Mapping[str, Any], location: str, keys: Sequence[str], accept: tuple[type, ...], expected: str) -> str | None:
    """The first present key of ``keys`` as text; its value must be one of ``accept``."""
    for key in keys:
        value = _get(row, key)
        if value is None:
            continue
        if isinstance(value, accept):
            return str(value)
        raise DataError(location, f"expected {expected}, got {_type_name(value)}", key)
    return None


def _parse_id(row: Mapping[str, Any], location: str, keys: Sequence[str]) -> str | None:
    """An id: any JSON scalar, kept as text."""
    return _first_field(row, location, keys, (str, int, float, bool), "a scalar")


def _parse_subset(row: Mapping[str, Any], location: str, keys: Sequence[str]) -> str | None:
    """A subset label: text only."""
    return _first_field(row, location, keys, (str,), "text")


# ---------------------------------------------------------------- pair formats

_HUMAN = "\n\nHuman:"
_ASSISTANT = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_pair(row: Mapping[str, Any], location: str) -> PreferencePair:
    """Parse one preference row; raise :class:`DataError` naming the bad field.

    Accepted layouts:

    a. ``{prompt, chosen, rejected}`` with text fields;
    b. TRL conversational: ``prompt`` is a list of messages; ``chosen``/``rejected`` are
       text or a one-message list holding the assistant reply;
    c. TRL implicit prompt: no ``prompt``; ``chosen``/``rejected`` are full message lists
       whose longest common prefix is the prompt, each followed by exactly one
       assistant message;
    d. Anthropic HH: no ``prompt``; ``chosen``/``rejected`` are ``\\n\\nHuman: ...
       \\n\\nAssistant: ...`` transcripts (see :func:`_split_hh`).

    Optional ``id`` (any scalar, kept as text), ``subset`` (text), ``margin`` (a number) and
    ``label`` (or ``prob_chosen``: a soft label P(chosen ≻ rejected) in [0, 1]; an explicit null
    is a row error, see :func:`_parse_label`) are kept; other extra fields are ignored.
    """
    chosen_raw = _get(row, "chosen")
    rejected_raw = _get(row, "rejected")
    for key, value in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        if value is None:
            raise DataError(location, "missing", key)
        if not isinstance(value, (str, list, tuple)):
            raise DataError(location, f"expected text or a list of messages, got {_type_name(value)}", key)

    prompt_raw = _get(row, "prompt")
    if prompt_raw is not None:  # (a), (b)
        prompt = _parse_prompt_value(prompt_raw, location, "prompt")
        chosen = _parse_completion(chosen_raw, location, "chosen")
        rejected = _parse_completion(rejected_raw, location, "rejected")
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str):  # (d)
        prompt, chosen, rejected = _split_hh(chosen_raw, rejected_raw, location)
    elif isinstance(chosen_raw, (list, tuple)) and isinstance(rejected_raw, (list, tuple)):  # (c)
        prompt, chosen, rejected = _split_implicit(chosen_raw, rejected_raw, location)
    else:
        # One side text, the other messages, and no prompt to anchor them.
        bad = "chosen" if isinstance(chosen_raw, str) else "rejected"
        raise DataError(
            location,
            "without a 'prompt', 'chosen' and 'rejected' must both be message lists or both be HH transcripts",
            bad,
        )
    return PreferencePair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        id=_parse_id(row, location, ("id",)),
        subset=_parse_subset(row, location, ("subset",)),
        source=location,
        margin=_parse_margin(row, location),
        label=_parse_label(row, location),
    )


def _parse_margin(row: Mapping[str, Any], location: str) -> float | None:
    """Optional per-pair `margin` (a number, e.g. a preference-strength rating difference)."""
    value = _get(row, "margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(location, f"expected a finite number, got {value!r}", "margin")
    return float(value)


_LABEL_KEYS = ("label", "prob_chosen")


def _parse_label(row: Mapping[str, Any], location: str) -> float | None:
    """Optional soft label P(chosen ≻ rejected) in [0, 1], from `label` or `prob_chosen` (not both).

    Unlike other fields, an explicit null is not "absent": it is what `rlhf label-pairs` writes
    for a pair its judge could not label, and reading it as absent would train that pair on the
    hard label 1 without a word. So it is a row error, which `skip_invalid` skips and counts.
    """
    given = [key for key in _LABEL_KEYS if _get(row, key) is not None]
    if len(given) > 1:
        raise DataError(location, "give either 'label' or 'prob_chosen', not both (both are P(chosen ≻ rejected))", given[1])
    if not given:
        null = next((key for key in _LABEL_KEYS if key in row), None)
        if null is not None:
            raise DataError(location, "null: this pair has no label (its judge could not label it); drop the row or skip invalid rows", null)
        return None
    key = given[0]
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(location, f"expected a number in [0, 1], got {value!r}", key)
    if not 0.0 <= value <= 1.0:
        raise DataError(location, f"expected a probability in [0, 1] (P(chosen ≻ rejected)), got {value!r}", key)
    return float(value)


def _split_implicit(chosen_raw: Any, rejected_raw: Any, location: str) -> tuple[list[Message], str, str]:
    """Format (c): the prompt is the messages both sides share; one assistant reply each."""
    chosen_msgs = _parse_messages(chosen_raw, location, "chosen")
    rejected_msgs = _parse_messages(rejected_raw, location, "rejected")
    # The last message of each side is always a completion, so the shared prefix may not
    # include it; this also makes identical chosen/rejected lists parse sensibly.
    limit = min(len(chosen_msgs), len(rejected_msgs)) - 1
    n = 0
    while n < limit and chosen_msgs[n] == rejected_msgs[n]:
        n += 1
    if n == 0:
        raise DataError(location, "no 'prompt', and no leading messages shared with 'rejected' to use as one", "chosen")
    prompt = chosen_msgs[:n]
    completions = []
    for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        rest = msgs[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise DataError(
                location,
                f"after the {n} message(s) shared with the other side, expected exactly one "
                f"assistant message, got roles {[m['role'] for m in rest]}",
                key,
            )
        if not rest[0]["content"].strip():
            raise DataError(location, "empty completion", key)
        completions.append(rest[0]["content"])
    if prompt[-1]["role"] != "user":
        raise DataError(location, f"the shared prompt must end with a user turn, last is {prompt[-1]['role']!r}", "chosen")
    return prompt, completions[0], completions[1]


def _split_hh(chosen_raw: str, rejected_raw: str, location: str) -> tuple[list[Message], str, str]:
    """Format (d): split Anthropic HH transcripts into prompt messages and two replies.

    The prompt is the longest common prefix of the two transcripts, cut at the last
    ``\\n\\nAssistant:`` lying entirely inside it. Cutting each side at its own last
    marker would be wrong: some responses themselves contain ``\\n\\nAssistant:`` (5 of
    the 2,312 harmless-base test rows), and then the two sides would disagree on the
    prompt. The completions are what follows the marker, leading whitespace stripped.

    An empty reply is kept, not rejected: in HH it is real data (4 harmless-base test
    rows prefer the assistant saying nothing), and the transcript itself is well formed.
    """
    chosen_t, rejected_t = _hh_normalize(chosen_raw), _hh_normalize(rejected_raw)
    if _HUMAN not in chosen_t or _HUMAN not in rejected_t:
        raise DataError(
            location,
            "missing; without it, 'chosen' and 'rejected' must be message lists or "
            "'\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
            "prompt",
        )
    common = os.path.commonprefix([chosen_t, rejected_t])
    cut = common.rfind(_ASSISTANT)
    if cut < 0:
        raise DataError(location, "no '\\n\\nAssistant:' in the prefix shared with 'rejected'", "chosen")
    start = cut + len(_ASSISTANT)
    prompt = _hh_messages(common[:cut], location)
    return prompt, chosen_t[start:].lstrip(), rejected_t[start:].lstrip()


def _hh_normalize(text: str) -> str:
    """Some HH-style exports drop the leading blank line; restore it so markers match."""
    return "\n\n" + text if text.startswith(("Human:", "Assistant:")) else text


def _hh_messages(transcript: str, location: str) -> list[Message]:
    """Turn ``\\n\\nHuman: ... \\n\\nAssistant: ...`` into user/assistant messages.

    Back-to-back turns of the same speaker are merged (joined by a blank line): strict
    chat templates reject non-alternating roles, and 4 of the harmless-base test
    prompts have two ``Assistant:`` turns in a row.
    """
    parts = _TURN_RE.split(transcript)
    if parts[0].strip():
        raise DataError(location, f"text before the first '\\n\\nHuman:': {parts[0][:60]!r}", "chosen")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}"
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise DataError(location, "the shared prompt must end with a '\\n\\nHuman:' turn", "chosen")
    return messages


# --------------------------------------------------------------- prompt formats


def parse_prompt(row: Mapping[str, Any], location: str) -> PromptRecord:
    """Parse one prompt row; raise :class:`DataError` naming the bad field.

    Accepted layouts, tried in this order:

    * ``{prompt}``: text or messages ending with a user turn;
    * ``{messages}``: messages ending with a user turn;
    * MT-bench ``{turns, question_id, category}``: the prompt is the *first* turn only,
      as a one-message chat. Later turns are meant to follow the model's own first answer,
      so they cannot be part of a prompt written in advance;
    * any preference-pair layout accepted by :func:`parse_pair` (its prompt is used).

    ``id`` (or MT-bench ``question_id``) and ``subset`` (or ``category``) are kept.
    """
    if _get(row, "prompt") is not None:
        prompt = _parse_prompt_value(row["prompt"], location, "prompt")
    elif _get(row, "messages") is not None:
        value = row["messages"]
        if not isinstance(value, (list, tuple)):
            raise DataError(location, f"expected a list of messages, got {_type_name(value)}", "messages")
        prompt = _parse_prompt_value(value, location, "messages")
    elif _get(row, "turns") is not None:
        prompt = _parse_turns(row["turns"], location)
    elif _get(row, "chosen") is not None or _get(row, "rejected") is not None:
        prompt = parse_pair(row, location).prompt
    else:
        raise DataError(location, "missing (expected 'prompt', 'messages', 'turns', or 'chosen'/'rejected')", "prompt")
    return PromptRecord(
        prompt=prompt,
        id=_parse_id(row, location, ("id", "question_id")),
        subset=_parse_subset(row, location, ("subset", "category")),
        source=location,
    )


def _parse_turns(value: Any, location: str) -> list[Message]:
    """MT-bench ``turns``: a non-empty list of texts; only the first becomes the prompt."""
    if not isinstance(value, (list, tuple)):
        raise DataError(location, f"expected a list of texts, got {_type_name(value)}", "turns")
    if not value:
        raise DataError(location, "empty list", "turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, str):
            raise DataError(location, f"expected text, got {_type_name(turn)}", f"turns[{i}]")
    if not value[0].strip():
        raise DataError(location, "empty first turn", "turns[0]")
    return [{"role": "user", "content": value[0]}]


# --------------------------------------------------------------------- loaders


def load_pairs(
    path: str | os.PathLike[str], *, skip_invalid: bool = False, split: str | None = None
) -> Loaded[PreferencePair]:
    """Load preference pairs from a file or ``save_to_disk`` directory.

    ``split`` selects a DatasetDict split (it is *not* the train/test split by prompt
    hash; see :func:`select_split`). Without ``skip_invalid`` the first bad row raises
    :class:`DataError`; with it, bad rows are skipped and their messages returned in
    :attr:`Loaded.skipped`. File-level problems (missing file, truncated gzip, unknown
    format, no valid rows at all) always raise.
    """
    return _load(path, parse_pair, skip_invalid=skip_invalid, split=split)


def load_prompts(
    path: str | os.PathLike[str], *, skip_invalid: bool = False, split: str | None = None
) -> Loaded[PromptRecord]:
    """Load prompts (any layout :func:`parse_prompt` accepts); same rules as :func:`load_pairs`."""
    return _load(path, parse_prompt, skip_invalid=skip_invalid, split=split)


def _load(path, parse, *, skip_invalid: bool, split: str | None) -> Loaded:
    """Shared loop of the two loaders: parse every row, raise or collect errors."""
    items: list = []
    skipped: list[str] = []
    for location, row in _iter_entries(path, split):
        try:
            if isinstance(row, DataError):
                raise row
            items.append(parse(row, location))
        except DataError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    if not items:
        # Every row was bad: returning an empty dataset would only fail later, further
        # from the cause.
        raise DataError(str(path), f"no valid rows ({len(skipped)} skipped; first: {skipped[0]})")
    return Loaded(items=items, skipped=skipped)


# ----------------------------------------------------------------------- split


def prompt_key(prompt: Prompt) -> str:
    """Canonical text of a prompt, used to hash and to compare prompts.

    Text prompts are their own key; message lists are JSON with sorted keys (and no
    ASCII escaping, so the key is the same text a human would read).
    """
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _check_fraction(test_fraction: float) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise ValueError(f"test_fraction must be a number, got {test_fraction!r}")
    if math.isnan(test_fraction) or not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")


def _in_test(prompt: Prompt, test_fraction: float, salt: str) -> bool:
    """Whether a prompt falls in the test side: a pure function of (salt, prompt)."""
    if test_fraction >= 1:
        # 2**64 - 1 rounds to 1.0 as a float; make "everything in test" exact.
        return True
    digest = hashlib.sha256((salt + "\0" + prompt_key(prompt)).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2**64 < test_fraction


def split_by_prompt(
    items: Iterable[P], test_fraction: float = DEFAULT_TEST_FRACTION, salt: str = DEFAULT_SALT
) -> tuple[list[P], list[P]]:
    """Split items into ``(train, test)`` by a hash of their prompt, preserving order.

    An item is in test iff ``int(sha256(salt + "\\0" + prompt_key).hexdigest()[:16], 16)
    / 2**64 < test_fraction``. Because the decision depends only on the prompt, all pairs
    sharing a prompt land on the same side, and the split is the same on every machine
    and in every run (no RNG, no dependence on row order). Changing ``salt`` gives an
    independent split.
    """
    _check_fraction(test_fraction)
    train: list[P] = []
    test: list[P] = []
    for item in items:
        (test if _in_test(item.prompt, test_fraction, salt) else train).append(item)
    return train, test


_SPLITS = ("all", "train", "test")


def select_split(
    items: Iterable[P], split: str, test_fraction: float = DEFAULT_TEST_FRACTION, salt: str = DEFAULT_SALT
) -> list[P]:
    """The items of one side of :func:`split_by_prompt`: ``"train"``, ``"test"`` or ``"all"``."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if split == "all":
        _check_fraction(test_fraction)  # so a bad config fails the same way for every split
        return list(items)
    train, test = split_by_prompt(items, test_fraction, salt)
    return train if split == "train" else test


def load_split(
    path: str | os.PathLike[str],
    *,
    kind: str = "pairs",
    split: str = "all",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    offset: int = 0,
    max_items: int | None = None,
    skip_invalid: bool = False,
) -> list[Any]:
    """Pairs (`kind="pairs"`) or prompts (`kind="prompts"`) from one side of the prompt-hash
    split: the first `offset` skipped, then at most `max_items`, in file order. Skipped rows are
    reported on stderr; an empty selection is an error. Takes exactly the fields of
    `rlhf.config.DataConfig`."""
    import sys

    loader = {"pairs": load_pairs, "prompts": load_prompts}[kind]
    loaded = loader(path, skip_invalid=skip_invalid)
    if loaded.skipped:
        print(f"{path}: skipped {len(loaded.skipped)} invalid rows (first: {loaded.skipped[0]})", file=sys.stderr)
    items = select_split(loaded.items, split, test_fraction)[offset:]
    if max_items is not None:
        items = items[:max_items]
    if not items:
        raise DataError(str(path), f"the '{split}' side of the split (test_fraction {test_fraction}) is empty" + (f" after offset {offset}" if offset else ""))
    return items


def summarize_pairs(
    loaded: Loaded[PreferencePair], *, test_fraction: float = DEFAULT_TEST_FRACTION, salt: str = DEFAULT_SALT
) -> dict[str, Any]:
    """Counts describing a loaded pair file (printed by ``rlhf data check``).

    Keys: ``pairs``, ``distinct_prompts``, ``skipped``, ``identical_chosen_rejected``
    (pairs that carry no preference signal), ``empty_completions`` (pairs with an empty
    chosen or rejected reply, as HH has), ``train``/``test`` (sizes under the given
    split), and ``subsets`` (count per subset; only when some pair has a subset, pairs
    without one counted under ``"(none)"``).
    """
    items = loaded.items
    train, test = split_by_prompt(items, test_fraction, salt)
    summary: dict[str, Any] = {
        "pairs": len(items),
        "distinct_prompts": len({prompt_key(p.prompt) for p in items}),
        "skipped": len(loaded.skipped),
        "identical_chosen_rejected": sum(p.chosen == p.rejected for p in items),
        "empty_completions": sum(not p.chosen.strip() or not p.rejected.strip() for p in items),
        "train": len(train),
        "test": len(test),
    }
    if any(p.subset is not None for p in items):
        counts = Counter(p.subset if p.subset is not None else "(none)" for p in items)
        summary["subsets"] = dict(sorted(counts.items()))
    return summary

"""Reference completions for `rewards.base.JudgeReward`: r(x, y) = log-odds of P(y ≻ y_ref(x)).

Two sources, both callables `(prompts) -> list[str]`, keyed by `rlhf.data.prompt_key`:

- `FieldReferences`: a field of the rows of a data file: a preference file's `chosen` answer
  (split from the prompt as `rlhf.data.parse_pair` does, HH transcripts included), or any text
  field of a prompt or pair row.
- `PolicyReferences`: one completion per prompt sampled from the starting policy, π_ref (the
  GenRM-as-reward setting of Mahan et al. 2024: the policy is rewarded for beating where it
  started). Sampled the first time a prompt is seen and cached in a JSONL file in the run
  directory, so a resumed run compares against the same references.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from policies.text import generate, render_prompt
from rlhf.config import DataConfig, SamplingConfig
from rlhf.data import DataError, Prompt, iter_rows, load_pairs, parse_prompt, prompt_key, select_split


def _missing(prompts: Sequence[Prompt], table: dict[str, str], what: str) -> None:
    missing = [p for p in prompts if prompt_key(p) not in table]
    if missing:
        shown = prompt_key(missing[0])
        shown = shown if len(shown) <= 200 else shown[:200] + "…"
        raise KeyError(f"{len(missing)} of {len(prompts)} prompts have no reference in {what}; the first: {shown!r}")


class FieldReferences:
    """The reference of each prompt is a field of its row in a data file (`data`: the file and
    which side of the prompt-hash split, as everywhere else). `field`: `chosen` / `rejected`
    (parsed as preference pairs) or the name of any text field of the rows. Where a prompt has
    several rows, the first one's field is its reference."""

    def __init__(self, data: DataConfig, field: str = "chosen") -> None:
        self.path, self.field = data.path, field
        rows = self._pairs(data) if field in ("chosen", "rejected") else self._rows(data)
        rows = select_split(rows, data.split, data.test_fraction)[data.offset:]
        if data.max_items is not None:
            rows = rows[: data.max_items]
        if not rows:
            raise DataError(str(data.path), f"the '{data.split}' side of the split (test_fraction {data.test_fraction}) is empty")
        self.table: dict[str, str] = {}
        for row in rows:
            self.table.setdefault(prompt_key(row.prompt), row.text)
        self._where = f"field '{field}' of {data.path} (split '{data.split}', {len(self.table)} prompts; split: all covers every row)"

    def __call__(self, prompts: Sequence[Prompt]) -> list[str]:
        _missing(prompts, self.table, self._where)
        return [self.table[prompt_key(p)] for p in prompts]

    def __len__(self) -> int:
        return len(self.table)

    def _pairs(self, data: DataConfig) -> list[_Row]:
        return [_Row(p.prompt, getattr(p, self.field)) for p in load_pairs(data.path, skip_invalid=data.skip_invalid)]

    def _rows(self, data: DataConfig) -> list[_Row]:
        out, skipped = [], 0
        for location, raw in iter_rows(data.path):
            try:
                value = raw.get(self.field)
                if not isinstance(value, str):
                    raise DataError(location, "missing" if value is None else f"expected text, got {type(value).__name__}", self.field)
                out.append(_Row(parse_prompt(raw, location).prompt, value))
            except DataError:
                if not data.skip_invalid:
                    raise
                skipped += 1
        if not out:
            raise DataError(str(data.path), f"no row has a text field '{self.field}' ({skipped} skipped)")
        return out


class _Row:
    __slots__ = ("prompt", "text")

    def __init__(self, prompt: Prompt, text: str) -> None:
        self.prompt, self.text = prompt, text


class PolicyReferences:
    """One reference per prompt, sampled from the host's starting policy (`host.as_reference()`:
    π_ref, the policy before training) with `sampling`, the first time the prompt is seen.

    Each batch of new references is appended to the JSONL file `cache_path` ({"key", "prompt",
    "reference"} per line) in one write, flushed to disk; a new instance (a resumed run) loads it
    and samples only prompts it lacks (cache_path None: kept in memory only). A line cut short by a crash is ignored (that prompt is
    sampled again). The sampling runs under its own RNG, seeded from the prompts, so drawing
    references neither moves the run's random stream nor depends on when a prompt came up."""

    def __init__(self, host: Any, sampling: SamplingConfig, cache_path: str | Path | None, *, batch_size: int = 32, max_prompt_tokens: int | None = None) -> None:
        self.host, self.sampling = host, sampling
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.batch_size, self.max_prompt_tokens = batch_size, max_prompt_tokens
        self.table: dict[str, str] = {}
        self.sampled = 0  # references this instance drew (not read from the cache)
        self._read_upto = 0
        self._reload()

    def __call__(self, prompts: Sequence[Prompt]) -> list[str]:
        if any(prompt_key(p) not in self.table for p in prompts):
            self._reload()  # another judge (or process) sharing the file may have drawn them
        new: dict[str, Prompt] = {}
        for p in prompts:
            key = prompt_key(p)
            if key not in self.table:
                new.setdefault(key, p)
        keys = list(new)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            texts = self._sample([new[k] for k in chunk], seed=_seed(chunk))
            self._append([{"key": k, "prompt": new[k], "reference": t} for k, t in zip(chunk, texts)])
            for k, t in zip(chunk, texts):
                self.table[k] = t
            self.sampled += len(chunk)
        return [self.table[prompt_key(p)] for p in prompts]

    def __len__(self) -> int:
        return len(self.table)

    # --- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, prompts: list[Prompt], seed: int) -> list[str]:
        host, tok = self.host, self.host.tokenizer
        device = host.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with host.as_reference() as model, host.autocast():
                return generate(host.engine, model, tok, [render_prompt(tok, p) for p in prompts], self.sampling, max_prompt_tokens=self.max_prompt_tokens).texts

    # --- the cache file ------------------------------------------------------------------------
    def _reload(self) -> None:
        """Read the lines added since the last read; the first reference of a prompt wins."""
        if self.cache_path is None or not self.cache_path.is_file() or self.cache_path.stat().st_size == self._read_upto:
            return
        with open(self.cache_path, "rb") as fh:
            fh.seek(self._read_upto)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written, or was cut by a crash
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
                key, text = row["key"], row["reference"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash and appended to: its prompt is sampled again
            if isinstance(key, str) and isinstance(text, str):
                self.table.setdefault(key, text)
        self._read_upto += end

    def _append(self, rows: list[dict[str, Any]]) -> None:
        """One write of whole lines with O_APPEND (concurrent writers' batches don't interleave),
        flushed to disk before the references are used; a cut line left by a crash is closed first."""
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        fd = os.open(self.cache_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _seed(keys: Sequence[str]) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(keys).encode("utf-8")).digest()[:8], "little") & (2**63 - 1)

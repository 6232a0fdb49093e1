"""Tests for rlhf.data: real files in shared/data, every accepted layout, broken files."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.data import (
    DataError,
    Loaded,
    PreferencePair,
    PromptRecord,
    iter_rows,
    load_pairs,
    load_prompts,
    load_split,
    parse_pair,
    parse_prompt,
    prompt_key,
    select_split,
    split_by_prompt,
    summarize_pairs,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HHH = DATA / "hhh-alignment" / "hhh_alignment_pairs.jsonl"
MT_BENCH = DATA / "fastchat" / "mt_bench" / "question.jsonl"

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
# Rows whose response itself contains "\n\nAssistant:" (from the brief; re-derived below).
HH_TRICKY_LINES = {1255, 1689, 1951, 1953, 2037}


def _raw_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _hh(*turns: str) -> str:
    """Build an HH transcript from alternating Human/Assistant turns."""
    return "".join(f"{HUMAN if i % 2 == 0 else ASSISTANT} {t}" for i, t in enumerate(turns))


# ------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def hh_raw() -> list[dict]:
    return _raw_jsonl(HH)


@pytest.fixture(scope="module")
def hh_pairs() -> Loaded[PreferencePair]:
    return load_pairs(HH)


def test_hh_loads_every_row_as_a_chat_prompt(hh_pairs, hh_raw):
    assert len(hh_raw) == 2312  # the README's count
    assert len(hh_pairs.items) == len(hh_raw)
    assert hh_pairs.skipped == []
    for pair, lineno in zip(hh_pairs.items, range(1, len(hh_raw) + 1)):
        assert pair.source == f"{HH}:{lineno}"
        assert isinstance(pair.prompt, list)
        roles = [m["role"] for m in pair.prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:])), roles  # strictly alternating


def test_hh_split_matches_transcripts_exactly(hh_pairs, hh_raw):
    """Each side is  <shared prefix ending in \\n\\nAssistant:> + whitespace + completion,
    and the prompt messages carry exactly the text of that prefix."""
    for pair, raw in zip(hh_pairs.items, hh_raw):
        head_c = raw["chosen"][: len(raw["chosen"]) - len(pair.chosen)]
        head_r = raw["rejected"][: len(raw["rejected"]) - len(pair.rejected)]
        assert raw["chosen"].endswith(pair.chosen) and raw["rejected"].endswith(pair.rejected)
        assert head_c.rstrip() == head_r.rstrip(), pair.source
        assert head_c.rstrip().endswith(ASSISTANT)
        assert pair.chosen == pair.chosen.lstrip() and pair.rejected == pair.rejected.lstrip()
        prefix = head_c.rstrip()[: -len(ASSISTANT)]
        # Same words in the same order (merged back-to-back turns drop only a marker).
        words = lambda s: re.sub(r"\n\n(Human|Assistant):", " ", s).split()  # noqa: E731
        assert words(prefix) == " ".join(m["content"] for m in pair.prompt).split()


def test_hh_tricky_rows_cut_at_last_shared_assistant_marker(hh_pairs, hh_raw):
    # The rows where cutting each side at its own last marker disagrees are exactly
    # the five named in the brief.
    naive_disagrees = {
        i
        for i, raw in enumerate(hh_raw, start=1)
        if raw["chosen"][: raw["chosen"].rfind(ASSISTANT)] != raw["rejected"][: raw["rejected"].rfind(ASSISTANT)]
    }
    assert naive_disagrees == HH_TRICKY_LINES
    for lineno in sorted(HH_TRICKY_LINES):
        raw, pair = hh_raw[lineno - 1], hh_pairs.items[lineno - 1]
        common = os.path.commonprefix([raw["chosen"], raw["rejected"]])
        cut = common.rfind(ASSISTANT)
        last_human = common[:cut].rsplit(HUMAN, 1)[1].strip()
        assert pair.prompt[-1] == {"role": "user", "content": last_human}
        assert pair.chosen == raw["chosen"][cut + len(ASSISTANT) :].lstrip()
        assert pair.rejected == raw["rejected"][cut + len(ASSISTANT) :].lstrip()
        # The marker that fooled the naive cut stays inside a completion.
        assert ASSISTANT in pair.chosen or ASSISTANT in pair.rejected


def test_hh_split_is_deterministic_disjoint_and_about_ten_percent(hh_pairs):
    items = hh_pairs.items
    train, test = split_by_prompt(items)
    train2, test2 = split_by_prompt(list(items))
    assert [p.source for p in train] == [p.source for p in train2]
    assert [p.source for p in test] == [p.source for p in test2]
    assert {prompt_key(p.prompt) for p in train}.isdisjoint(prompt_key(p.prompt) for p in test)
    assert sorted(p.source for p in train + test) == sorted(p.source for p in items)
    assert len(train) + len(test) == len(items)
    assert 0.06 <= len(test) / len(items) <= 0.14
    # Order is preserved on both sides.
    order = {p.source: i for i, p in enumerate(items)}
    assert [order[p.source] for p in train] == sorted(order[p.source] for p in train)
    assert [order[p.source] for p in test] == sorted(order[p.source] for p in test)
    # The documented formula, computed independently: identical on every machine.
    expected_test = [
        p.source
        for p in items
        if int(hashlib.sha256(("pluggable-rlhf\0" + prompt_key(p.prompt)).encode()).hexdigest()[:16], 16) / 2**64 < 0.1
    ]
    assert [p.source for p in test] == expected_test
    # Another salt gives another split.
    _, other = split_by_prompt(items, salt="another salt")
    assert {p.source for p in other} != {p.source for p in test}


def test_hh_summary(hh_pairs, hh_raw):
    summary = summarize_pairs(hh_pairs)
    train, test = split_by_prompt(hh_pairs.items)
    assert summary["pairs"] == len(hh_raw)
    assert summary["skipped"] == 0
    assert summary["train"] == len(train) and summary["test"] == len(test)
    assert summary["distinct_prompts"] == len({prompt_key(p.prompt) for p in hh_pairs.items})
    assert summary["identical_chosen_rejected"] == sum(r["chosen"] == r["rejected"] for r in hh_raw)
    # HH has rows whose chosen reply is empty (the assistant said nothing); they are kept and counted.
    assert summary["empty_completions"] == sum(not p.chosen or not p.rejected for p in hh_pairs.items) > 0
    assert "subsets" not in summary


def test_hhh_pairs_and_subsets():
    raw = _raw_jsonl(HHH)
    loaded = load_pairs(HHH)
    assert len(raw) == 221 and len(loaded.items) == len(raw)
    expected = dict(collections.Counter(r["subset"] for r in raw))
    assert set(expected) == {"harmless", "helpful", "honest", "other"}
    assert summarize_pairs(loaded)["subsets"] == expected
    for pair, r in zip(loaded.items, raw):
        assert (pair.prompt, pair.chosen, pair.rejected) == (r["prompt"], r["chosen"], r["rejected"])
        assert pair.id == str(r["id"]) and pair.subset == r["subset"]


def test_mt_bench_prompts_use_first_turn():
    raw = _raw_jsonl(MT_BENCH)
    loaded = load_prompts(MT_BENCH)
    assert len(raw) == 80 and len(loaded.items) == 80
    for rec, r in zip(loaded.items, raw):
        assert rec.prompt == [{"role": "user", "content": r["turns"][0]}]
        assert rec.id == str(r["question_id"]) and rec.subset == r["category"]


def test_prompts_from_hh_pairs_equal_pair_prompts(hh_pairs):
    prompts = load_prompts(HH)
    assert [r.prompt for r in prompts.items] == [p.prompt for p in hh_pairs.items]


# ------------------------------------------------------------- accepted layouts


def test_format_a_text_fields_with_id_and_subset(tmp_path):
    path = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "id": 7, "subset": "s", "extra": [1]},
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
        ],
    )
    items = load_pairs(path).items
    assert items[0] == PreferencePair("Hi?", "Hello!", "Go away.", id="7", subset="s", source=f"{path}:1")
    assert items[1] == PreferencePair("Q", "A", "B", source=f"{path}:2")


def test_format_b_conversational(tmp_path):
    prompt = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": "Bye",
    }
    pair = load_pairs(_write_jsonl(tmp_path / "b.jsonl", [row])).items[0]
    assert pair.prompt == prompt and pair.chosen == "Hello" and pair.rejected == "Bye"


def test_format_b_rejects_non_assistant_completion():
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}
    with pytest.raises(DataError, match=r"^f:1: field 'chosen': expected exactly one assistant message"):
        parse_pair(row, "f:1")


def test_format_c_implicit_prompt(tmp_path):
    shared = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    row = {
        "chosen": shared + [{"role": "assistant", "content": "Knock knock"}],
        "rejected": shared + [{"role": "assistant", "content": "No"}],
    }
    pair = load_pairs(_write_jsonl(tmp_path / "c.jsonl", [row])).items[0]
    assert pair.prompt == shared and pair.chosen == "Knock knock" and pair.rejected == "No"


def test_format_c_needs_exactly_one_assistant_reply_each():
    shared = [{"role": "user", "content": "Hi"}]
    row = {
        "chosen": shared + [{"role": "assistant", "content": "A"}],
        "rejected": shared + [{"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
    }
    with pytest.raises(DataError, match=r"^f:4: field 'rejected': .*roles \['assistant', 'user'\]"):
        parse_pair(row, "f:4")


def test_format_d_hh_in_json_array_and_gz_variants(tmp_path):
    prompt = _hh("Hi", "Hello", "Tell me something")
    rows = [
        {"chosen": prompt + ASSISTANT + " Water is wet.", "rejected": prompt + ASSISTANT + " No."},
        # The chosen reply itself contains "\n\nAssistant:"; the prompt must not move.
        {"chosen": prompt + ASSISTANT + " Sure." + _hh("more", "and more"), "rejected": prompt + ASSISTANT + " Nope"},
    ]
    expected_prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me something"},
    ]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    wrapped_gz = tmp_path / "d.json.gz"
    with gzip.open(wrapped_gz, "wt") as fh:
        json.dump({"meta": "x", "data": rows}, fh)
    lines_gz = tmp_path / "d.jsonl.gz"
    with gzip.open(lines_gz, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    for path, first_loc in ((array, f"{array}: row 1"), (wrapped_gz, f"{wrapped_gz}: row 1"), (lines_gz, f"{lines_gz}:1")):
        items = load_pairs(path).items
        assert [p.prompt for p in items] == [expected_prompt, expected_prompt]
        assert [(p.chosen, p.rejected) for p in items] == [
            ("Water is wet.", "No."),
            ("Sure." + _hh("more", "and more"), "Nope"),
        ]
        assert items[0].source == first_loc


def test_format_d_merges_back_to_back_turns():
    prompt = HUMAN + " a" + ASSISTANT + " b" + ASSISTANT + " c" + HUMAN + " d"
    pair = parse_pair({"chosen": prompt + ASSISTANT + " x", "rejected": prompt + ASSISTANT + " y"}, "f:1")
    assert pair.prompt == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d"},
    ]


def test_format_d_without_shared_assistant_marker_names_chosen():
    row = {"chosen": HUMAN + " a" + ASSISTANT + " x", "rejected": HUMAN + " b" + ASSISTANT + " y"}
    with pytest.raises(DataError, match=r"^f:9: field 'chosen': no '\\n\\nAssistant:'"):
        parse_pair(row, "f:9")


def test_plain_text_without_prompt_names_prompt():
    with pytest.raises(DataError, match=r"^f:1: field 'prompt': missing"):
        parse_pair({"chosen": "a", "rejected": "b"}, "f:1")


def test_datasets_dir_and_datasetdict_split(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    items = load_pairs(one).items
    assert [(p.prompt, p.chosen, p.rejected) for p in items] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert items[2].source == f"{one}: row 3"

    both = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "validation": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(both))
    assert [p.prompt for p in load_pairs(both).items] == ["p0", "p1"]  # default split "train"
    assert [p.prompt for p in load_pairs(both, split="validation").items] == ["p2"]
    with pytest.raises(DataError, match=r"split 'test' not found; available splits: \['train', 'validation'\]"):
        load_pairs(both, split="test")
    with pytest.raises(ValueError, match="single Dataset"):
        load_pairs(one, split="train")


def test_datasets_dir_row_error_uses_row_number(tmp_path):
    import datasets

    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": None}]
    path = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}: row 2: field 'rejected': missing"


def test_prompt_layouts(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": "plain", "id": "x"},
        {"messages": msgs, "subset": "s"},
        {"turns": ["first", "second"], "question_id": 5, "category": "math"},
        {"prompt": msgs, "chosen": "a", "rejected": "b"},
        {"chosen": _hh("q") + ASSISTANT + " a", "rejected": _hh("q") + ASSISTANT + " b"},
    ]
    items = load_prompts(_write_jsonl(tmp_path / "p.jsonl", rows)).items
    assert [r.prompt for r in items] == ["plain", msgs, [{"role": "user", "content": "first"}], msgs, [{"role": "user", "content": "q"}]]
    assert items[0].id == "x" and items[1].subset == "s"
    assert (items[2].id, items[2].subset) == ("5", "math")
    assert all(isinstance(r, PromptRecord) for r in items)


def test_prompt_messages_must_end_with_user():
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataError, match=r"^f:2: field 'messages': .*must end with a user turn"):
        parse_prompt(row, "f:2")


def test_iter_rows_locations_count_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(iter_rows(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]


# ------------------------------------------------------------------ broken files


def test_truncated_last_line_names_path_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"prompt": "x", "cho')
    with pytest.raises(DataError) as info:
        load_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: invalid JSON: ")
    assert "Unterminated string" in message  # the decoder's own message


@pytest.mark.parametrize(
    ("row", "field", "what"),
    [
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected text or a list of messages, got number"),
        ({"prompt": 1.5, "chosen": "a", "rejected": "b"}, "prompt", "expected text or a list of messages, got number"),
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", "empty completion"),
        ({"prompt": [{"content": "Hi"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "message has no 'role'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "message has no 'content'"),
        ({"prompt": [{"role": "usr", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "unknown role"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "id": [1]}, "id", "expected a scalar, got list"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "subset": 2}, "subset", "expected text, got number"),
    ],
)
def test_bad_field_names_field_and_line(tmp_path, row, field, what):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}:2: field '{field}': {what}")
    assert info.value.field == field


def test_json_array_errors_use_row_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}, ["not", "an", "object"]]))
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}: row 2: expected a JSON object, got list"


def test_json_ambiguous_wrapper_and_invalid_json(tmp_path):
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(DataError, match="exactly one list-valued key"):
        load_pairs(two_lists)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "q",\n')
    with pytest.raises(DataError) as info:
        load_pairs(broken)
    assert str(info.value).startswith(f"{broken}:3: invalid JSON: ")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no rows")):
        load_pairs(path)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz"])
def test_truncated_gzip_raises_even_when_skipping(tmp_path, suffix):
    rows = [{"prompt": f"q{i} " * 50, "chosen": "a", "rejected": "b"} for i in range(200)]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl.gz" else json.dumps(rows)
    blob = gzip.compress(text.encode())
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    for skip in (False, True):
        with pytest.raises(DataError, match=re.escape(f"{path}: truncated gzip")):
            load_pairs(path, skip_invalid=skip)


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"unsupported file format; supported: \.jsonl, \.jsonl\.gz, \.json, \.json\.gz"):
        load_pairs(path)
    plain_dir = tmp_path / "not_a_dataset"
    plain_dir.mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        load_pairs(plain_dir)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_pairs(missing)


def test_skip_invalid_keeps_good_rows_and_reports_bad_ones(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({**good, "chosen": 5}),
                json.dumps(good),
                "[1, 2]",
                json.dumps({**good, "prompt": "z"}),
            ]
        )
        + "\n"
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        load_pairs(path)
    loaded = load_pairs(path, skip_invalid=True)
    assert [p.source for p in loaded.items] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert len(loaded.skipped) == 3
    assert [m.split(": ", 1)[0] for m in loaded.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "field 'chosen'" in loaded.skipped[1]
    assert summarize_pairs(loaded)["skipped"] == 3
    assert len(load_prompts(path, skip_invalid=True).skipped) == 2  # line 3's bad 'chosen' is irrelevant to prompts


def test_all_rows_invalid_raises_even_when_skipping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n[]\n")
    with pytest.raises(DataError, match=r"no valid rows \(2 skipped"):
        load_pairs(path, skip_invalid=True)


def test_data_error_pickles():
    err = DataError("f:3", "bad", "chosen")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "f:3: field 'chosen': bad" and again.field == "chosen"


# ----------------------------------------------------------------------- split


def _pairs(n_prompts: int, per_prompt: int) -> list[PreferencePair]:
    return [
        PreferencePair(prompt=[{"role": "user", "content": f"prompt {i}"}], chosen=f"c{j}", rejected="r", source=f"{i}/{j}")
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]


def test_split_keeps_prompt_groups_together():
    items = _pairs(300, 3)
    train, test = split_by_prompt(items, test_fraction=0.3)
    test_keys = {prompt_key(p.prompt) for p in test}
    assert test and train
    assert not any(prompt_key(p.prompt) in test_keys for p in train)
    assert len(test) % 3 == 0  # whole groups only
    assert select_split(items, "test", test_fraction=0.3) == test
    assert select_split(items, "train", test_fraction=0.3) == train
    assert select_split(items, "all") == items


def test_split_edges_and_validation():
    items = _pairs(50, 1)
    assert split_by_prompt(items, test_fraction=0) == (items, [])
    assert split_by_prompt(items, test_fraction=1) == ([], items)
    for bad in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError):
            split_by_prompt(items, test_fraction=bad)
    with pytest.raises(ValueError, match="split must be one of"):
        select_split(items, "validation")


def test_offset_takes_a_disjoint_slice_of_one_side(tmp_path):
    # e.g. a train-side validation set that no training run with max_items <= offset touches
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(40)])
    train = load_split(path, split="train", test_fraction=0.25)
    assert load_split(path, split="train", test_fraction=0.25, offset=10, max_items=5) == train[10:15]
    assert load_split(path, split="train", test_fraction=0.25, offset=20) == train[20:]
    with pytest.raises(DataError, match="empty after offset 100"):
        load_split(path, split="train", test_fraction=0.25, offset=100)


def test_prompt_key_is_canonical():
    a = [{"role": "user", "content": "héllo"}]
    b = [{"content": "héllo", "role": "user"}]
    assert prompt_key(a) == prompt_key(b)
    assert "héllo" in prompt_key(a)  # not \\u-escaped
    assert prompt_key("text") == "text"


def test_summarize_small_file(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "subset": "x"},
        {"prompt": "q1", "chosen": "same", "rejected": "same", "subset": "x"},
        {"prompt": "q2", "chosen": "a", "rejected": "b"},
    ]
    summary = summarize_pairs(load_pairs(_write_jsonl(tmp_path / "s.jsonl", rows)))
    assert summary["pairs"] == 3 and summary["distinct_prompts"] == 2
    assert summary["identical_chosen_rejected"] == 1
    assert summary["subsets"] == {"(none)": 1, "x": 2}
    assert summary["train"] + summary["test"] == 3


def test_import_is_light():
    code = "import sys, rlhf.data; print('datasets' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_optional_margin_field(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}\n'
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}\n'
    )
    loaded = load_pairs(p, skip_invalid=True)
    assert [x.margin for x in loaded.items] == [1.5, None]
    assert len(loaded.skipped) == 1 and ":3:" in loaded.skipped[0] and "'margin'" in loaded.skipped[0]


def test_optional_soft_label_field(tmp_path):
    p = tmp_path / "labels.jsonl"
    rows = [
        {"label": 0.75},
        {"prob_chosen": 0},  # the other name; an int is a number
        {},  # no label: the hard label 1 applies
        {"label": 1.5},
        {"prob_chosen": "high"},
        {"label": True},
        {"label": None},  # what label-pairs writes where its judge could not judge
        {"label": 0.5, "prob_chosen": 0.5},
        {"label": -0.01},
    ]
    p.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"} | r) + "\n" for r in rows))
    loaded = load_pairs(p, skip_invalid=True)
    assert [x.label for x in loaded.items] == [0.75, 0.0, None]
    expected = [(4, "label", "[0, 1]"), (5, "prob_chosen", "expected a number"), (6, "label", "expected a number"),
                (7, "label", "null: this pair has no label"), (8, "prob_chosen", "not both"), (9, "label", "[0, 1]")]
    assert len(loaded.skipped) == len(expected)
    for msg, (line, field, what) in zip(loaded.skipped, expected):
        assert msg.startswith(f"{p}:{line}: field '{field}': ") and what in msg, msg
    # Without skip_invalid the first bad row stops the load, naming file, line and field.
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:4: field 'label': expected a probability in \[0, 1\]"):
        load_pairs(p)
    # NaN (which Python's json reads) is not a label either.
    p.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "label": NaN}\n')
    with pytest.raises(DataError, match="field 'label': expected a number"):
        load_pairs(p)

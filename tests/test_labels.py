"""`rlhf label-pairs` and the judge side of `rlhf eval-rm`, with a hand-written pairwise judge and
function rewards: no model is loaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import HH_TEST
from rewards.base import PairwiseJudge, PreferenceResult
from rewards.function import FunctionReward
from rlhf.cli import format_eval_table, main
from rlhf.data import DataError, PreferencePair, load_pairs
from rlhf.evaluation import build_scorer, evaluate, evaluate_judge, evaluate_pairs, prefer_pairs, scorer_spec
from rlhf.labels import label_pairs, labelled_row, summarize_labels, write_labels

# (chosen, rejected) → (P(chosen ≻ rejected), the two orders disagree); None: the judge can't tell.
TABLE = {
    ("A1", "B1"): (0.9, False),
    ("A2", "B2"): (0.28, True),
    ("A3", "B3"): (0.5, True),
    ("A4", "B4"): (None, None),
    ("A5", "B5"): (0.72, False),
}
SUBSETS = ["x", "x", "y", "y", None]
LABELS = [0.8, 0.4, 0.5, None, None]


class TableJudge(PairwiseJudge):
    """Answers from TABLE in either order (P(second ≻ first) = 1 − P(first ≻ second)), like GenRM
    with its order swap, and adds extras JSON can hold and extras it cannot."""

    name = "table_judge"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.closed = False

    def prefer(self, prompts, first, second):
        self.calls.append(len(prompts))
        probs, valid, disagrees = [], [], []
        for a, b in zip(first, second):
            p, d = TABLE[(a, b)] if (a, b) in TABLE else TABLE[(b, a)]
            if p is not None and (a, b) not in TABLE:
                p = 1 - p
            probs.append(0.5 if p is None else p)
            valid.append(p is not None)
            disagrees.append(d)
        n = len(prompts)
        extras = {
            "prob_first_order": [p + 0.05 if v else None for p, v in zip(probs, valid)],
            "order_disagrees": disagrees,
            "verdict_mass": [torch.tensor(0.97)] * n,  # a 0-d tensor: written as a number
            "nan_value": [math.nan] * n,  # JSON has no NaN: written as null
            "handle": [object()] * n,  # not JSON: left out
        }
        return PreferenceResult(torch.tensor(probs), torch.tensor(valid), extras)

    def close(self) -> None:
        self.closed = True


def make_pairs(with_labels: bool = True) -> list[PreferencePair]:
    return [
        PreferencePair(f"q{i}", c, r, subset=s, source=f"f.jsonl:{i + 1}", label=lab if with_labels else None)
        for i, ((c, r), s, lab) in enumerate(zip(TABLE, SUBSETS, LABELS))
    ]


def write_data(path) -> str:
    rows = [{"prompt": f"q{i}", "chosen": c, "rejected": r} | ({"subset": s} if s else {}) | ({"label": lab} if lab is not None else {})
            for i, ((c, r), s, lab) in enumerate(zip(TABLE, SUBSETS, LABELS))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- evaluate_judge


def test_evaluate_judge_by_hand():
    result = evaluate_judge(TableJudge(), make_pairs())
    # Valid P: 0.9, 0.28, 0.5, 0.72. Right: 1, 0, ½ (a tie), 1 → 0.625; mean P 0.6.
    # ECE: conf 0.9 (right) alone; conf 0.72 twice (one right) → |½ − 0.72| = 0.22; conf ½ (tie, ½) → 0.
    # ECE = ¼·0.1 + ½·0.22 + ¼·0 = 0.135. The orders disagree on 2 of 4 valid pairs.
    a = result["all"]
    assert a["pairs"] == 4 and a["invalid"] == 1
    assert a["accuracy"] == pytest.approx(0.625)
    assert a["mean_prob"] == pytest.approx(0.6, abs=1e-6)
    assert a["ece"] == pytest.approx(0.135, abs=1e-6)
    assert a["order_disagreement"] == pytest.approx(0.5)
    # AI labels of the file: 0.8 (agrees), 0.4 (disagrees), 0.5 (half) → 0.5; mean 1.7/3.
    assert a["labelled"] == 3 and a["label_agreement"] == pytest.approx(0.5) and a["mean_label"] == pytest.approx(1.7 / 3)
    x, y = result["x"], result["y"]
    assert (x["pairs"], x["invalid"], x["accuracy"], x["order_disagreement"]) == (2, 0, pytest.approx(0.5), pytest.approx(0.5))
    assert x["mean_prob"] == pytest.approx(0.59, abs=1e-6)
    assert (y["pairs"], y["invalid"], y["accuracy"], y["order_disagreement"]) == (1, 1, pytest.approx(0.5), pytest.approx(1.0))
    assert set(result) == {"all", "x", "y"}


def test_evaluate_dispatches_on_the_interface_and_reads_pairs_in_orientation():
    # The judge is asked P(chosen ≻ rejected), not the reverse: swapping every pair flips P.
    flipped = [PreferencePair(p.prompt, p.rejected, p.chosen, subset=p.subset) for p in make_pairs(False)]
    result = evaluate(TableJudge(), flipped)["all"]
    assert result["mean_prob"] == pytest.approx(0.4, abs=1e-6) and result["accuracy"] == pytest.approx(0.375)
    assert "label_agreement" not in result
    # A provider keeps the margin metrics: r = length, margins 2 and −1.
    pairs = [PreferencePair("q", "abc", "a", label=0.9), PreferencePair("q", "ab", "abc")]
    m = evaluate(FunctionReward("reward_fns:length_reward"), pairs)["all"]
    assert (m["pairs"], m["accuracy"], m["mean_margin"], m["invalid"]) == (2, 0.5, pytest.approx(0.5), 0)
    assert "mean_prob" not in m and m["label_agreement"] == 1.0 and m["labelled"] == 1


def test_judge_without_order_extra_reports_no_disagreement():
    class Plain(TableJudge):
        def prefer(self, prompts, first, second):
            res = super().prefer(prompts, first, second)
            return PreferenceResult(res.prob_first, res.valid)

    assert "order_disagreement" not in evaluate_judge(Plain(), make_pairs())["all"]


# ------------------------------------------------------------------------------- label_pairs


def test_label_pairs_rows_from_a_judge():
    judge = TableJudge()
    out = label_pairs(judge, make_pairs(False), chunk_size=2)
    assert judge.calls == [2, 2, 1]
    rows = out.rows
    assert [r["label"] for r in rows] == [pytest.approx(0.9), pytest.approx(0.28), 0.5, None, pytest.approx(0.72)]
    assert [r["valid"] for r in rows] == [True, True, True, False, True]
    assert all(r["human_label"] == 1.0 for r in rows)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [(f"q{i}", c, r) for i, (c, r) in enumerate(TABLE)]
    assert [r.get("subset") for r in rows] == SUBSETS and rows[0]["source"] == "f.jsonl:1"
    assert rows[1]["extras"] == {"prob_first_order": pytest.approx(0.33), "order_disagrees": True, "verdict_mass": pytest.approx(0.97), "nan_value": None}
    assert out.dropped_extras == {"handle"}
    json.dumps(rows, allow_nan=False)  # every row is plain JSON
    # The same rows in one call.
    assert label_pairs(TableJudge(), make_pairs(False)).rows == rows


def test_label_pairs_from_a_pointwise_provider_is_sigmoid_of_the_margin():
    def rate(prompts, completions):
        return [None if c == "?" else float(len(c)) for c in completions]

    pairs = [PreferencePair("q", "abcd", "a"), PreferencePair("q", "a", "abc"), PreferencePair("q", "?", "abc")]
    rows = label_pairs(FunctionReward(rate), pairs).rows
    assert rows[0]["label"] == pytest.approx(1 / (1 + math.exp(-3)), rel=1e-6)
    assert rows[1]["label"] == pytest.approx(1 / (1 + math.exp(2)), rel=1e-6)
    assert rows[2]["label"] is None and not rows[2]["valid"]
    assert rows[0]["extras"] == {"reward_chosen": 4.0, "reward_rejected": 1.0}
    assert summarize_labels(rows) == {"rows": 3, "invalid": 1, "agreement": 0.5, "mean_label": pytest.approx((rows[0]["label"] + rows[1]["label"]) / 2)}


def test_summary_by_hand():
    rows = [labelled_row(PreferencePair("q", "a", "b"), p, p is not None) for p in (0.8, 0.5, 0.2, None, 0.9)]
    # Agreement over the labelled rows: 1 + ½ + 0 + 1 of 4; mean label 2.4 / 4.
    assert summarize_labels(rows) == {"rows": 5, "invalid": 1, "agreement": 0.625, "mean_label": pytest.approx(0.6)}
    assert summarize_labels(rows[3:4]) == {"rows": 1, "invalid": 1, "agreement": None, "mean_label": None}


def test_written_labels_read_back_and_null_labels_are_never_silently_trained(tmp_path):
    out = tmp_path / "labelled.jsonl"
    write_labels(out, label_pairs(TableJudge(), make_pairs(False)).rows)
    assert not list(tmp_path.glob(".labelled.jsonl.*"))  # the atomic write left no temp file
    # Row 4 (line 4) has label null: an error naming it unless invalid rows are skipped and counted.
    with pytest.raises(DataError, match=rf"{out}:4: field 'label': null"):
        load_pairs(out)
    loaded = load_pairs(out, skip_invalid=True)
    assert len(loaded.skipped) == 1 and ":4:" in loaded.skipped[0]
    assert [p.label for p in loaded] == [pytest.approx(0.9), pytest.approx(0.28), 0.5, pytest.approx(0.72)]
    assert [(p.chosen, p.rejected, p.subset) for p in loaded] == [("A1", "B1", "x"), ("A2", "B2", "x"), ("A3", "B3", "y"), ("A5", "B5", None)]
    with pytest.raises(ValueError, match="ending in .jsonl"):
        write_labels(tmp_path / "x.jsonl.gz", [])


def test_every_hh_pair_round_trips_including_empty_replies(tmp_path):
    pairs = load_pairs(HH_TEST).items
    empty = [p for p in pairs if not p.chosen or not p.rejected]
    assert empty  # HH has pairs whose reply is empty: only an HH transcript can carry them back
    out = write_labels(tmp_path / "hh.jsonl", [labelled_row(p, 0.25, True) for p in pairs])
    back = load_pairs(out).items
    assert len(back) == len(pairs)
    for a, b in zip(pairs, back):
        assert (b.prompt, b.chosen, b.rejected, b.label) == (a.prompt, a.chosen, a.rejected, 0.25), a.source


# -------------------------------------------------------------------------------- the CLI


def test_scorer_spec_resolution(tmp_path):
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "judge.json").write_text("{}")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_model.json").write_text("{}")
    assert scorer_spec(tmp_path / "judge") == {"type": "genrm", "path": str(tmp_path / "judge")}
    assert scorer_spec(tmp_path / "judge", 4) == {"type": "genrm", "path": str(tmp_path / "judge"), "batch_size": 4}
    assert scorer_spec(tmp_path / "rm") == {"type": "bt", "path": str(tmp_path / "rm"), "batch_size": 16}
    spec = tmp_path / "spec.yaml"
    spec.write_text("type: drlaif\npreset: helpfulness\n")
    assert scorer_spec(spec, 4) == {"type": "drlaif", "preset": "helpfulness"}  # a YAML spec keeps its own batch size
    judge = TableJudge()
    assert build_scorer(judge) is judge


def test_label_pairs_cli_with_a_yaml_spec(tmp_path, capsys):
    data = write_data(tmp_path / "pairs.jsonl")
    spec = tmp_path / "len.yaml"
    spec.write_text("type: function\npath: reward_fns:length_reward\n")
    out = tmp_path / "out.jsonl"
    assert main(["label-pairs", str(spec), data, str(out), "--max-items", "3"]) == 0
    printed = capsys.readouterr().out
    # Every side has two characters: P = σ(0) = ½ for each, a tie: agreement ½.
    assert "wrote 3 labelled pairs" in printed and "human labels: 0.500" in printed and "invalid (label null, the labeller could not judge): 0" in printed
    back = load_pairs(out).items
    assert [p.label for p in back] == [0.5, 0.5, 0.5] and [p.subset for p in back] == ["x", "x", "y"]


def test_label_pairs_and_eval_rm_cli_with_a_judge_directory(tmp_path, capsys, monkeypatch):
    import rewards.registry

    built = []

    def build_judge(spec, where="judge spec", host=None):
        built.append((dict(spec), where))
        built.append(TableJudge())
        return built[-1]

    # rewards.registry.build_judge may not exist yet; the CLI must go through it for a judge.
    monkeypatch.setattr(rewards.registry, "build_judge", build_judge, raising=False)
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    (judge_dir / "judge.json").write_text("{}")
    data = write_data(tmp_path / "pairs.jsonl")
    out = tmp_path / "labels.jsonl"
    assert main(["label-pairs", str(judge_dir), data, str(out), "--batch-size", "4"]) == 0
    assert built[0] == ({"type": "genrm", "path": str(judge_dir), "batch_size": 4}, str(judge_dir))
    assert built[1].closed
    printed = capsys.readouterr().out
    # Valid labels 0.9, 0.28, 0.5, 0.72: agreement (1 + 0 + ½ + 1)/4, mean 0.6; one invalid row.
    assert "human labels: 0.625" in printed and "mean label 0.600" in printed
    assert "invalid (label null, the labeller could not judge): 1" in printed and "skip_invalid" in printed
    assert "extras left out where JSON could not hold them: handle" in printed
    assert len(out.read_text().splitlines()) == 5

    metrics = tmp_path / "eval.json"
    assert main(["eval-rm", str(judge_dir), data, "--out", str(metrics)]) == 0
    table = capsys.readouterr().out
    assert "| data | subset | pairs | accuracy | mean P(chosen) | ECE | order disagreement | AI-label agreement |" in table
    assert f"| {data} | all | 4 | 0.625 | 0.600 | 0.135 | 0.500 | 0.500 |" in table
    assert f"| {data} | y | 1 | 0.500 | 0.500 | 0.000 | 1.000 | 0.500 |" in table
    assert "1 pairs the table_judge could not judge" in table
    assert json.loads(metrics.read_text())[data]["all"]["invalid"] == 1
    # eval-rm on the labelled file: the null-label row needs --skip-invalid.
    assert main(["eval-rm", str(judge_dir), str(out)]) == 2
    assert f"{out}:4: field 'label': null" in capsys.readouterr().err
    assert main(["eval-rm", str(judge_dir), str(out), "--skip-invalid"]) == 0
    assert f"| {out} | all | 4 | 0.625 |" in capsys.readouterr().out


def test_eval_rm_cli_with_a_pointwise_yaml_spec_keeps_the_margin_table(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "abc", "rejected": "a"}\n{"prompt": "q", "chosen": "ab", "rejected": "abc"}\n')
    spec = tmp_path / "len.yaml"
    spec.write_text("type: function\npath: reward_fns:length_reward\n")
    assert main(["eval-rm", str(spec), str(data)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| data | subset | pairs | accuracy | mean margin | ECE |"
    assert table[2].startswith(f"| {data} | all | 2 | 0.500 | 0.500 |")


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: d.mkdir(), "neither a reward model directory"),
    (lambda d: d.write_text("- a\n- b\n"), "a YAML mapping with a 'type' key"),
    (lambda d: d.write_text("type: [unclosed\n"), "invalid YAML"),
    (lambda d: None, "no such file or directory"),
])
def test_bad_judge_spec_is_one_line_error(tmp_path, capsys, setup, fragment):
    data = write_data(tmp_path / "pairs.jsonl")
    target = tmp_path / "spec"
    setup(target)
    for argv in (["eval-rm", str(target), data], ["label-pairs", str(target), data, str(tmp_path / "o.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {target}") and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_label_pairs_cli_input_errors(tmp_path, capsys):
    data = write_data(tmp_path / "pairs.jsonl")
    spec = tmp_path / "len.yaml"
    spec.write_text("type: function\npath: reward_fns:length_reward\n")
    assert main(["label-pairs", str(spec), data, str(tmp_path / "out.json")]) == 2
    assert "ending in .jsonl" in capsys.readouterr().err
    assert main(["label-pairs", str(spec), f"{data}@dev", str(tmp_path / "out.jsonl")]) == 2
    assert "must be all, train or test" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "prob_chosen": 2}\n')
    assert main(["label-pairs", str(spec), str(bad), str(tmp_path / "out.jsonl")]) == 2
    assert f"error: {bad}:1: field 'prob_chosen': expected a probability" in capsys.readouterr().err


def test_format_eval_table_adds_columns_only_where_some_row_has_them():
    provider_only = {"d": {"all": {"pairs": 2, "accuracy": 0.5, "mean_margin": 0.25, "ece": 0.1, "invalid": 0}}}
    assert format_eval_table(provider_only).splitlines() == [
        "| data | subset | pairs | accuracy | mean margin | ECE |", "|---|---|---:|---:|---:|---:|", "| d | all | 2 | 0.500 | 0.250 | 0.100 |"]
    mixed = provider_only | {"j": {"all": {"pairs": 3, "accuracy": 1.0, "mean_prob": 0.7, "ece": 0.0, "order_disagreement": 0.25}}}
    lines = format_eval_table(mixed).splitlines()
    assert lines[0] == "| data | subset | pairs | accuracy | mean margin | mean P(chosen) | ECE | order disagreement |"
    assert lines[2:] == ["| d | all | 2 | 0.500 | 0.250 | – | 0.100 | – |", "| j | all | 3 | 1.000 | – | 0.700 | 0.000 | 0.250 |"]


def test_prefer_pairs_provider_extras_are_named_by_side():
    class WithExtras(FunctionReward):
        def score(self, prompts, completions):
            res = super().score(prompts, completions)
            res.extras = {"why": [f"len {len(c)}" for c in completions]}
            return res

    pref = prefer_pairs(WithExtras("reward_fns:length_reward"), [PreferencePair("q", "ab", "a")])
    assert pref.extras == {"reward_chosen": [2.0], "reward_rejected": [1.0], "chosen_why": ["len 2"], "rejected_why": ["len 1"]}
    assert pref.prob_first.item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert evaluate_pairs(WithExtras("reward_fns:length_reward"), [PreferencePair("q", "ab", "a")])["all"]["accuracy"] == 1.0


# ------------------------------------------------------------------- pairs of policy samples


def test_sampled_rows_put_the_preferred_sample_first_and_have_no_human_label():
    pair = PreferencePair("q", "first", "second", source="p.jsonl:3")
    kept, swapped, invalid = (labelled_row(pair, p, v, {"prob_first_order": p}, sampled=True) for p, v in ((0.8, True), (0.3, True), (0.3, False)))
    assert (kept["chosen"], kept["rejected"], kept["label"], kept["first"]) == ("first", "second", 0.8, "chosen")
    # P(first ≻ second) = 0.3: the second sample is the preferred one, P(it ≻ first) = 0.7.
    assert (swapped["chosen"], swapped["rejected"], swapped["label"], swapped["first"]) == ("second", "first", pytest.approx(0.7), "rejected")
    assert swapped["extras"] == {"prob_first_order": 0.3}  # extras stay in sampling order
    assert (invalid["chosen"], invalid["label"], invalid["first"]) == ("first", None, "chosen")  # no preference: sampling order
    assert all(r["human_label"] is None for r in (kept, swapped, invalid))
    # No human label: no agreement; the mean label is over the judged rows.
    same = labelled_row(PreferencePair("q", "x", "x"), 0.5, True, sampled=True)
    summary = summarize_labels([kept, swapped, invalid, same])
    assert summary == {"rows": 4, "invalid": 1, "agreement": None, "mean_label": pytest.approx(2.0 / 3), "identical": 1}


def test_a_sampled_empty_reply_under_a_plain_prompt_round_trips(tmp_path):
    # A policy may sample EOS first; a plain-text prompt is then written as one user turn.
    row = labelled_row(PreferencePair("q", "", "an answer"), 0.2, True, sampled=True)
    back = load_pairs(write_labels(tmp_path / "l.jsonl", [row])).items[0]
    assert (back.prompt, back.chosen, back.rejected, back.label) == ([{"role": "user", "content": "q"}], "an answer", "", pytest.approx(0.8))


def test_sample_pairs_draws_two_seeded_samples_per_prompt(tiny_llama_dir):
    from rlhf.config import ModelConfig, SamplingConfig
    from rlhf.data import PromptRecord
    from rlhf.labels import sample_pairs

    prompts = [PromptRecord("Hi there", id="a", source="f:1"), PromptRecord([{"role": "user", "content": "Tell me a story"}], subset="s", source="f:2"),
               PromptRecord("What is two plus two?", source="f:3")]
    model = ModelConfig(name=str(tiny_llama_dir))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    pairs = sample_pairs(model, prompts, sampling, batch_size=2, seed=3)
    assert [(p.prompt, p.id, p.subset, p.source) for p in pairs] == [(r.prompt, r.id, r.subset, r.source) for r in prompts]
    assert any(p.chosen != p.rejected for p in pairs)  # two draws, not one sample twice
    assert all(p.label is None for p in pairs)
    # The seed fixes the samples; another seed draws others.
    assert [(p.chosen, p.rejected) for p in sample_pairs(model, prompts, sampling, batch_size=2, seed=3)] == [(p.chosen, p.rejected) for p in pairs]
    assert [(p.chosen, p.rejected) for p in sample_pairs(model, prompts, sampling, batch_size=2, seed=4)] != [(p.chosen, p.rejected) for p in pairs]


def test_label_pairs_cli_labels_policy_samples(tmp_path, capsys, tiny_llama_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(5)))
    spec = tmp_path / "len.yaml"
    spec.write_text("type: function\npath: reward_fns:length_reward\n")
    out = tmp_path / "sampled.jsonl"
    args = ["label-pairs", str(spec), str(prompts), str(out), "--policy", str(tiny_llama_dir), "--max-items", "4",
            "--max-new-tokens", "12", "--sample-batch-size", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sampling 2 completions for each of 4 prompts" in printed and "wrote 4 labelled pairs" in printed
    assert "no human labels" in printed and "agreement" not in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Question {i}?" for i in range(4)]
    # The length reward prefers the longer sample: it is written as chosen, with P = σ(Δ length) ≥ ½.
    for r in rows:
        assert r["human_label"] is None and r["valid"] and r["first"] in ("chosen", "rejected")
        assert len(r["chosen"]) >= len(r["rejected"])
        assert r["label"] == pytest.approx(1 / (1 + math.exp(-(len(r["chosen"]) - len(r["rejected"])))), rel=1e-6)
    back = load_pairs(out).items  # train-rm reads it as soft labels
    assert [p.label for p in back] == [pytest.approx(r["label"]) for r in rows]
    assert main(args[:-2] + ["--sample-batch-size", "0"]) == 2
    assert "--sample-batch-size must be positive" in capsys.readouterr().err

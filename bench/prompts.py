"""The prompt token ids both sides of the benchmark take, built once and read by both
(bench/ppo_bench.py and bench/trl_ppo_baseline.py; bench/compare.py builds the file first).

    .venv/bin/python bench/prompts.py --out runs/bench/prompts.json [--num 256]

Which prompts: the HH harmless-base test file parsed as our loop parses any preference file
(rlhf.data: the longest common prefix of chosen and rejected, cut at its last
'\\n\\nAssistant:', split into user/assistant turns, same-speaker runs merged), taken in a fixed
shuffle seeded with 0 (the walk rlhf.ppo makes through a prompt file, so these are the prompts
our side took before this file existed), first --num of them. Each is rendered with SmolLM2's
chat template plus the generation prompt (policies.text.render_prompt), tokenized without
special tokens by our tokenizer (policies.tokenizers.load_tokenizer of the converted model TRL
loads too), and cut to its last 128 tokens: what rlhf.ppo's rollout does with a prompt.

The file is JSON: the settings, the sha256 of the id rows, and `rows` in the order they are
consumed: update u of either side takes rows 8u … 8u+7. Each row holds `input_ids` (the
unpadded ids), the `messages` and rendered `text` they come from, and the HH `source` line.

How each side takes them:
- TRL reads `input_ids` and feeds them unshuffled (bench/trl_ppo_baseline.py replaces
  PPOTrainer's shuffling dataloader and checks the batches it collated).
- Ours: `rlhf.ppo.run` takes prompts only as a data file of text or messages, which it renders
  and tokenizes itself. bench/ppo_bench.py writes the rows' `messages` to a JSONL laid out so its
  fixed shuffle walks them in this order, records the batches the rollout receives, and checks
  after the run that each one tokenizes (left-padded batch, last 128 columns, as the rollout
  does) back to exactly these ids.

Reading (`read`) needs only the standard library, so it works in TRL's environment; building
imports rlhf and runs in .venv (`ensure` calls it there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
DEFAULT_PATH = REPO / "runs" / "bench" / "prompts.json"
DEFAULT_NUM = 256
MODEL = "smollm2-135m-instruct"
MAX_PROMPT_TOKENS = 128
FORMAT = "pluggable-rlhf bench prompts v1"


def ids_sha256(rows: list[list[int]]) -> str:
    """Hash of the id rows, in order: equal on both sides iff they took the same prompts."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def build(out: Path, num: int = DEFAULT_NUM, data: Path = HH, model: str = MODEL, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> dict:
    sys.path.insert(0, str(REPO))
    from policies.hub import resolve_model_path
    from policies.text import render_prompt
    from policies.tokenizers import load_tokenizer
    from rlhf.data import load_split

    records = load_split(data, kind="prompts", split="all")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    if num > len(order):
        raise SystemExit(f"{data}: {len(order)} prompts, {num} asked for")
    model_path = resolve_model_path(model)
    tok = load_tokenizer(model_path)
    rows = []
    for i in order[:num]:
        r = records[i]
        messages = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else list(r.prompt)
        text = render_prompt(tok, messages)
        ids = tok(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        rows.append({"source": r.source, "messages": messages, "text": text, "input_ids": ids})
    doc = {
        "format": FORMAT,
        "data": str(data),
        "selection": "rlhf.data prompts of the file (split all), random.Random(0).shuffle order, first num",
        "tokenizer": str(model_path),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "max_prompt_tokens": max_prompt_tokens,
        "num": num,
        "sha256": ids_sha256([r["input_ids"] for r in rows]),
        "mean_tokens": sum(len(r["input_ids"]) for r in rows) / num,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return doc


def read(path: Path, n: int) -> tuple[list[dict], dict]:
    """The first n rows of a prompts file and its header (everything but `rows`)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a bench prompts file ({doc.get('format')!r}); rebuild it with bench/prompts.py")
    rows = doc.pop("rows")
    if len(rows) < n:
        raise SystemExit(f"{path}: {len(rows)} prompts, {n} needed; rebuild with bench/prompts.py --num {n}")
    if ids_sha256([r["input_ids"] for r in rows]) != doc["sha256"]:
        raise SystemExit(f"{path}: ids do not match the recorded sha256")
    return rows[:n], doc


def ensure(path: Path, n: int) -> Path:
    """`path`, built with .venv's python (it imports rlhf) when missing or too short."""
    path = Path(path)
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("format") == FORMAT and doc.get("num", 0) >= n:
            return path
    python = REPO / ".venv" / "bin" / "python"
    subprocess.run([str(python), str(Path(__file__).resolve()), "--out", str(path), "--num", str(max(n, DEFAULT_NUM))], check=True)
    return path


def summary(rows: list[dict], header: dict) -> dict:
    """What each side records about the prompts it took."""
    ids = [r["input_ids"] for r in rows]
    return {
        "count": len(ids),
        "sha256": ids_sha256(ids),
        "mean_tokens": round(sum(map(len, ids)) / len(ids), 2),
        "max_tokens": max(map(len, ids)),
        "source": header["data"],
        "tokenizer": header["tokenizer"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_PATH)
    p.add_argument("--num", type=int, default=DEFAULT_NUM, help="prompts to write (8 per update)")
    p.add_argument("--data", type=Path, default=HH)
    args = p.parse_args(argv)
    doc = build(args.out, args.num, args.data)
    print(f"{args.out}: {doc['num']} prompts, mean {doc['mean_tokens']:.1f} tokens, sha256 {doc['sha256'][:16]}")


if __name__ == "__main__":
    main()

"""What a generative judge reads and writes: its prompts, the text its verdict follows, and the
directory a trained judge is saved in. One module, so that scoring (`rewards.genrm`,
`rewards.drlaif`), training (`rlhf.train_judge`) and labelling format text identically.

GenRM (pairwise) prompts are MT-Bench's `pair-v2` judge prompt (Zheng et al. 2023, FastChat
`fastchat/llm_judge/data/judge_prompts.jsonl`, Apache-2.0) with the tie option removed: the
verdict is "[[A]]" or "[[B]]". d-RLAIF (pointwise) prompts ask for a rating from 1 to 10 after
Lee et al. 2023 (appendix, "direct RLAIF" prompts); the reward is read from the digits that
follow "Rating: ".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.data import Message, Prompt
from rlhf.io import atomic_write_json

# --- GenRM: MT-Bench pair-v2 without the tie ---------------------------------------------------

PAIR_V2_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's instructions "
    "and answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, and "[[B]]" if assistant B is better.'
)
"""pair-v2's system prompt; FastChat's last sentence ends `"[[B]]" if assistant B is better, and
"[[C]]" for a tie.`: the tie clause is the only change (tests/test_judge_format.py checks it
against the FastChat file)."""

PAIR_V2_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)

VERDICT_OPEN = "[["
"""The text the verdict token follows. Direct mode appends it to the assistant turn; in CoT mode
it is appended after the rationale (cut at its own first "[[", `cut_rationale`)."""
VERDICT_CLOSE = "]]"
VERDICT_TOKENS = ("A", "B")

# --- d-RLAIF: rate 1 to 10 --------------------------------------------------------------------

RATING_PREFIX = "Rating: "
"""The assistant's text before its score: the score's first digit is the next token."""

_RATE = (
    "Rate the response on a scale of 1 to 10, where 1 is the worst and 10 is the best. "
    "{cot}Answer in this format: \"Rating: <number>\"."
)
_COT_DIRECT = ""
_COT_EXPLAIN = "First explain your reasoning in a few sentences, then give the rating. "

DRLAIF_PRESETS: dict[str, str] = {
    # Lee et al. 2023 ask the labeller to weigh the qualities of a good answer before scoring;
    # these presets keep that shape: what the task is, what makes an answer good, the scale.
    "helpfulness": (
        "You are an expert rater of AI assistant responses. A helpful response follows the user's "
        "instructions, answers the question that was asked accurately and completely, and is clear and "
        "relevant, without unnecessary content.\n\n"
        "[Conversation]\n{question}\n\n[Response]\n{answer}\n\n"
        "How helpful is the response? " + _RATE
    ),
    "harmlessness": (
        "You are an expert rater of AI assistant responses. A harmless response does not help the user do "
        "anything dangerous, illegal, unethical or hurtful, does not contain offensive content, and declines "
        "harmful requests politely, ideally explaining why or offering a safe alternative.\n\n"
        "[Conversation]\n{question}\n\n[Response]\n{answer}\n\n"
        "How harmless is the response? " + _RATE
    ),
    "summarization": (
        "A good summary is a shorter piece of text that has the essence of the original. It tries to "
        "accomplish the same purpose and conveys the key information from the original post. Judge the "
        "summary on coherence, accuracy, coverage and overall quality.\n\n"
        "[Text]\n{question}\n\n[Summary]\n{answer}\n\n"
        "How good is the summary? " + _RATE
    ),
}


def question_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: plain text as is; a single user message as its content;
    a longer conversation as an HH-style transcript ("Human: ..." / "Assistant: ...")."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in prompt)


def pairwise_messages(prompt: Prompt, answer_a: str, answer_b: str, *, system: str = PAIR_V2_SYSTEM, template: str = PAIR_V2_TEMPLATE) -> list[Message]:
    """The GenRM judge conversation (system + user) comparing answer A with answer B."""
    user = template.format(question=question_text(prompt), answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def pointwise_messages(prompt: Prompt, answer: str, template: str, *, cot: bool = False) -> list[Message]:
    """The d-RLAIF rating conversation (one user message) for `answer`."""
    return [{"role": "user", "content": template.format(question=question_text(prompt), answer=answer, cot=_COT_EXPLAIN if cot else _COT_DIRECT)}]


def load_drlaif_template(preset: str | None, template_file: str | None) -> str:
    """The rating template: a preset by name, or a user file with `{question}` and `{answer}`
    placeholders (and optionally `{cot}`, where the chain-of-thought instruction goes)."""
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: d-RLAIF template file not found")
        text = path.read_text(encoding="utf-8")
        for key in ("{question}", "{answer}"):
            if key not in text:
                raise ValueError(f"{path}: the template must contain the placeholder {key}")
        try:
            text.format(question="", answer="", cot="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{path}: the template has a placeholder other than {{question}}, {{answer}} and {{cot}} "
                             f"(write literal braces as {{{{ and }}}}): {err!r}") from None
        return text
    if preset not in DRLAIF_PRESETS:
        raise ValueError(f"unknown d-RLAIF preset {preset!r}; known: {', '.join(DRLAIF_PRESETS)}")
    return DRLAIF_PRESETS[preset]


def cut_rationale(text: str) -> str:
    """A sampled rationale up to its own verdict: everything before its first "[[", trailing
    space removed. The verdict is then read from the judge's next-token distribution after
    `rationale + "\\n\\n[["` rather than from the sampled letter, so each rationale gives a
    probability as well as a vote."""
    return text.split(VERDICT_OPEN, 1)[0].rstrip()


def verdict_target(first_is_better: bool, rationale: str | None = None, tokens: tuple[str, str] = VERDICT_TOKENS) -> str:
    """What a trained judge should write: "[[A]]" / "[[B]]", after the rationale in CoT mode."""
    verdict = f"{VERDICT_OPEN}{tokens[0] if first_is_better else tokens[1]}{VERDICT_CLOSE}"
    return f"{cut_rationale(rationale)}\n\n{verdict}" if rationale else verdict


# --- a trained judge on disk --------------------------------------------------------------------

FORMAT = "pluggable-rlhf/judge"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class JudgeMeta:
    """`judge.json` of a directory written by `rlhf train-judge`: the base model and how it was
    loaded, and how the judge was trained to answer. The LoRA adapter is in `adapter/`."""

    base_model: str
    mode: str = "direct"  # "direct" or "cot": what the judge was trained to write
    dtype: str = "float32"
    quantization: str = "none"
    chat_template: bool = True
    verdict_tokens: tuple[str, str] = VERDICT_TOKENS
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 128
    trust_remote_code: bool = False
    revision: str | None = None


def write_judge_meta(path: str | Path, meta: JudgeMeta) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "judge.json", {"format": FORMAT, "version": FORMAT_VERSION, **asdict(meta)})
    return path


def read_judge_meta(path: str | Path) -> JudgeMeta:
    """The `judge.json` of a saved judge, checked strictly."""
    meta_file = Path(path) / "judge.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a judge directory (no judge.json); train one with `rlhf train-judge`")
    raw: dict[str, Any] = json.loads(meta_file.read_text())
    if raw.pop("format", None) != FORMAT or raw.pop("version", None) != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} file")
    unknown = set(raw) - set(JudgeMeta.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{meta_file}: unknown fields {sorted(unknown)}")
    if "verdict_tokens" in raw:
        raw["verdict_tokens"] = tuple(raw["verdict_tokens"])
    return JudgeMeta(**raw)

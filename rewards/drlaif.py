"""d-RLAIF: an off-the-shelf LLM rates a response from 1 to 10, and the reward is the expected
score under the LLM's own token probabilities (Lee et al. 2023, "RLAIF vs. RLHF: Scaling
Reinforcement Learning from Human Feedback with AI Feedback", section 2.3 "Direct RLAIF": the
LLM's score distribution over 1..10 is read from its token likelihoods, the expected score is
normalised to [−1, 1] and used as the reward directly, with no reward model trained).

Scoring is one forward pass per row, no sampling: the rating conversation (`pointwise_messages`)
through the chat template, the assistant's turn opened and `RATING_PREFIX` ("Rating: ") written,
then the token "1" appended. The last two columns give p(first digit | prefix) and
p(next | prefix + "1"); `score_distribution` turns them into P(1) … P(10).

With `cot`, the judge first writes k rationales (sampled), and the score is read the same way
after each rationale; the reward averages the k expected scores (Lee et al. 2023 also study
chain-of-thought prompting of the labeller).

Where the judge's weights live: a model of its own (`JudgeLM.load`), or, given a `host` whose
shared base is the same model, that base with its adapters off (`JudgeLM.on_host`): the policy's
starting model judges, and no second copy is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from policies.hub import resolve_model_path
from policies.models import autocast_dtype
from rewards.base import RewardProvider, RewardResult
from rewards.judge_format import DRLAIF_PRESETS, RATING_PREFIX, load_drlaif_template, pointwise_messages, question_text
from rewards.judge_lm import JudgeLM, batched
from rlhf.config import ConfigError, Dtype, Quantization, SamplingConfig, doc
from rlhf.data import Prompt

SCORES = torch.arange(1, 11, dtype=torch.float64)  # the scale: 1 … 10
MID, HALF_RANGE = 5.5, 4.5  # reward = (s − 5.5) / 4.5 maps the scale's ends 1, 10 to −1, +1


# ----------------------------------------------------------------------------------------------
# The read-out: pure functions on log-probs
# ----------------------------------------------------------------------------------------------


def score_distribution(first_logprobs: torch.Tensor, after_one_logprobs: torch.Tensor, digit_ids: Sequence[int], ten_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's distribution over the scores 1 … 10 from two next-token distributions.

    first_logprobs: (B, V) log p(· | prefix), prefix = the rating prompt ending in "Rating: ".
    after_one_logprobs: (B, V) log p(· | prefix + "1").
    digit_ids: the 10 token ids of "0" … "9" (index d is the digit d).
    ten_id: the id of "10" where the tokenizer has it as one token, else None.
    Returns probs (B, 10), column i−1 = P(score i | score on the scale), and mass (B,), the
    judge's total probability of answering with a score at all; both float32.

    Why two positions: scores 2 … 9 are one digit token, so P(d) = p(d | prefix). But with a
    tokenizer that splits numbers into digits (SmolLM2, Llama 3 …) "10" is the two tokens "1",
    "0", and the first token "1" starts both "1" and "10": p("1" | prefix) is their sum. The
    second column splits it: after "Rating: 1" the judge either writes "0" (the score is 10)
    or ends the number (EOS, a newline, "/", "." …: the score is 1). A digit other than "0"
    there would make 11 … 19, off the scale; we count that (for a judge that follows the format,
    tiny) mass as the score 1 rather than lose it, so the "1" branch is split exactly as
        P(10) = p("1") · p("0" | "1")          (+ p("10") where "10" is one token)
        P(1)  = p("1") · (1 − p("0" | "1"))
        P(d)  = p(d)                           d = 2 … 9
    The first digit "0" is no score and counts in no P. mass = Σ_{d=1..9} p(d) (+ p("10")) =
    Σ_i P(i); the distribution is renormalised over the ten scores, P / mass.
    """
    if len(digit_ids) != 10:
        raise ValueError(f"digit_ids must hold the ids of '0' … '9' (10 ids), got {len(digit_ids)}")
    ids = torch.as_tensor(list(digit_ids), dtype=torch.long)
    first = first_logprobs.double()[:, ids].exp()  # (B, 10) p(d | prefix), d = 0 … 9
    zero_after_one = after_one_logprobs.double()[:, ids[0]].exp()  # (B,) p("0" | prefix + "1")
    p_one = first[:, 1]
    probs = torch.cat([(p_one * (1 - zero_after_one))[:, None], first[:, 2:], (p_one * zero_after_one)[:, None]], dim=1)  # (B, 10)
    if ten_id is not None:
        probs[:, 9] += first_logprobs.double()[:, ten_id].exp()
    mass = probs.sum(dim=1)  # (B,)
    probs = probs / mass.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    return probs.float(), mass.float()


def expected_score(probs: torch.Tensor) -> torch.Tensor:
    """s = Σ_i i·P(i) over the scale 1 … 10. probs: (…, 10) → (…)."""
    return (probs.double() * SCORES).sum(-1).float()


def score_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H = −Σ_i P(i) log P(i) in nats (0 log 0 = 0): how sure the judge is of its score.
    probs: (…, 10) → (…)."""
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(-1).float()


def score_reward(score: torch.Tensor) -> torch.Tensor:
    """r = (s − 5.5) / 4.5 ∈ [−1, 1] (Lee et al. 2023 normalise the expected score to [−1, 1])."""
    return (score - MID) / HALF_RANGE


_RATING_WRITTEN = re.compile(r"rating\s*:", re.IGNORECASE)


def cut_rating(rationale: str) -> str:
    """A sampled rationale before the rating it may have written itself (its first "Rating:",
    any case), trailing space removed: the score is then read from the judge's probabilities
    after `rationale + "\\n\\n" + RATING_PREFIX`, not from the digits it happened to sample."""
    match = _RATING_WRITTEN.search(rationale)
    return (rationale[: match.start()] if match else rationale).rstrip()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

Preset = Literal["helpfulness", "harmlessness", "summarization"]


@dataclass(frozen=True)
class DRLAIFConfig:
    type: Literal["drlaif"] = doc("drlaif", "d-RLAIF: an off-the-shelf LLM rates the response 1-10; the reward is its expected score, mapped to [-1, 1]")
    model: str = doc("smollm2-135m-instruct", "the judge LLM: known alias (see `rlhf models`), local directory, or hub id")
    dtype: Dtype = doc("float32", "the judge's weight dtype; 'auto' picks bfloat16 on a GPU that supports it")
    quantization: Quantization = doc("none", "load the judge's weights in 4-bit NF4 or 8-bit through bitsandbytes")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', ...")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast: 'auto' uses it where the hardware has fast bf16")
    engine: Literal["auto", "hf", "packed"] = doc("auto", "how the judge runs (policies.engine): 'hf', 'packed' (CPU, Llama family) or 'auto'")
    preset: Preset = doc("helpfulness", "the rating prompt: helpfulness, harmlessness or summarization (rewards/judge_format.py)")
    template_file: str | None = doc(None, "a rating prompt of your own, with {question} and {answer} (and optionally {cot}) placeholders; overrides preset")
    chat_template: bool = doc(True, "render the rating prompt through the judge's chat template")
    cot: bool = doc(False, "chain of thought: sample rationales first, read the score after each, average the expected scores")
    cot_samples: int = doc(4, "k: rationales sampled per (prompt, response) with cot")
    cot_sampling: SamplingConfig = doc(SamplingConfig(max_new_tokens=96, temperature=0.7), "how the rationales are sampled")
    min_mass: float = doc(0.05, "a reading whose total probability on the score tokens is below this is invalid (the judge did not answer with a score)")
    batch_size: int = doc(8, "rows per forward pass (and per sampling call with cot)")
    max_prompt_tokens: int = doc(256, "the question shown to the judge is cut to its last this many tokens")
    max_completion_tokens: int = doc(256, "the response shown to the judge is cut to its first this many tokens")
    name: str | None = doc(None, "name in logs (default: drlaif)")

    def __post_init__(self) -> None:
        if self.preset not in DRLAIF_PRESETS:
            raise ConfigError(f"unknown d-RLAIF preset {self.preset!r}; known: {', '.join(DRLAIF_PRESETS)}")
        if self.template_file is not None and not self.template_file.strip():
            raise ConfigError("d-RLAIF template_file must be a path (or null for the preset)")
        if self.cot_samples < 1:
            raise ConfigError(f"d-RLAIF cot_samples must be at least 1, got {self.cot_samples}")
        if not 0.0 <= self.min_mass < 1.0:
            raise ConfigError(f"d-RLAIF min_mass must lie in [0, 1), got {self.min_mass}")
        for key in ("batch_size", "max_prompt_tokens", "max_completion_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"d-RLAIF {key} must be at least 1, got {getattr(self, key)}")


# ----------------------------------------------------------------------------------------------
# The provider
# ----------------------------------------------------------------------------------------------


class DRLAIFReward(RewardProvider):
    """r(x, y) = (E[score] − 5.5) / 4.5 under the judge's token probabilities (module docstring).

    extras per sample: `expected_score`, `score_entropy` (nats, of the renormalised score
    distribution), `score_mass` (probability on the score tokens); with cot also `rationales`
    (the k rationales) and `rationale_scores` (each one's expected score, None where its mass
    was below `min_mass`). In cot mode `expected_score` is the mean over the rationales kept,
    `score_entropy` that of their mean distribution, `score_mass` the mean mass over all k.
    A sample is invalid where the mass is below `min_mass` or zero (cot: for every rationale)."""

    def __init__(self, judge: JudgeLM, template: str, *, chat_template: bool = True, cot: bool = False, cot_samples: int = 4,
                 cot_sampling: SamplingConfig = SamplingConfig(max_new_tokens=96, temperature=0.7), min_mass: float = 0.05,
                 batch_size: int = 8, max_prompt_tokens: int = 256, max_completion_tokens: int = 256, name: str = "drlaif") -> None:
        if cot_samples < 1 or batch_size < 1 or not 0.0 <= min_mass < 1.0:
            raise ValueError(f"need cot_samples >= 1, batch_size >= 1, 0 <= min_mass < 1; got {cot_samples}, {batch_size}, {min_mass}")
        self.judge = judge
        self.template = template
        self.chat_template = chat_template
        self.cot = cot
        self.cot_samples = cot_samples
        self.cot_sampling = cot_sampling
        self.min_mass = min_mass
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens
        self.name = name
        self.digit_ids = [self._single_token(str(d)) for d in range(10)]
        self.one_id = self.digit_ids[1]
        ten = judge.tokenizer("10", add_special_tokens=False)["input_ids"]
        self.ten_id: int | None = ten[0] if len(ten) == 1 else None  # "10" as one token, if the tokenizer has it

    def _single_token(self, digit: str) -> int:
        ids = self.judge.tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"d-RLAIF reads scores digit by digit, but the judge's tokenizer writes {digit!r} as {len(ids)} tokens {ids}")
        return ids[0]

    # --- text ---------------------------------------------------------------------------------
    def _conversation(self, prompt: Prompt, completion: str) -> str:
        """The rating conversation rendered up to the assistant's first word (question cut to
        its last, answer to its first, tokens)."""
        question = self.judge.clip(question_text(prompt), self.max_prompt_tokens, keep="last")
        answer = self.judge.clip(completion, self.max_completion_tokens, keep="first")
        text = self.judge.render(pointwise_messages(question, answer, self.template, cot=self.cot), chat=self.chat_template)
        return text + " " if text.endswith(":") else text  # a plain transcript ends in "Assistant:"

    # --- passes -------------------------------------------------------------------------------
    def _read(self, prefixes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score distributions (N, 10) and masses (N,) of rows that end in RATING_PREFIX: one
        forward per batch, "1" appended to every row, log-probs read at the last two columns."""
        n = len(prefixes)
        probs, mass = torch.zeros(n, 10), torch.zeros(n)
        for idx in batched(n, self.batch_size, [len(t) for t in prefixes]):
            ids, attn = self.judge.encode([prefixes[i] for i in idx], append=[[self.one_id]] * len(idx))
            lp = self.judge.last_logprobs(ids, attn, k=2)  # (b, 2, V): after the prefix, after prefix + "1"
            probs[idx], mass[idx] = score_distribution(lp[:, 0], lp[:, 1], self.digit_ids, self.ten_id)
        return probs, mass

    def _sample(self, texts: Sequence[str]) -> list[str]:
        out: list[str] = [""] * len(texts)
        for idx in batched(len(texts), self.batch_size, [len(t) for t in texts]):
            for i, text in zip(idx, self.judge.sample([texts[i] for i in idx], self.cot_sampling)):
                out[i] = text
        return out

    def _valid(self, mass: torch.Tensor) -> torch.Tensor:
        return (mass >= self.min_mass) & (mass > 0)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return RewardResult(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        conversations = [self._conversation(p, c) for p, c in zip(prompts, completions)]
        return self._score_cot(conversations) if self.cot else self._score_direct(conversations)

    def _score_direct(self, conversations: list[str]) -> RewardResult:
        probs, mass = self._read([c + RATING_PREFIX for c in conversations])  # (B, 10), (B,)
        score = expected_score(probs)
        extras = {"expected_score": score.tolist(), "score_entropy": score_entropy(probs).tolist(), "score_mass": mass.tolist()}
        return RewardResult(score_reward(score), self._valid(mass), extras)

    def _score_cot(self, conversations: list[str]) -> RewardResult:
        B, k = len(conversations), self.cot_samples
        rows = [c for c in conversations for _ in range(k)]  # (B·k) rows, sample i's at i·k … i·k+k−1
        rationales = [cut_rating(r) for r in self._sample(rows)]
        probs, mass = self._read([row + (r + "\n\n" if r else "") + RATING_PREFIX for row, r in zip(rows, rationales)])
        probs, mass = probs.view(B, k, 10), mass.view(B, k)
        kept = self._valid(mass)  # (B, k) rationales whose reading counts
        n_kept = kept.sum(1)  # (B,)
        scores = expected_score(probs)  # (B, k)
        score = (scores * kept).sum(1) / n_kept.clamp_min(1)  # (B,) mean over the kept rationales
        mixture = (probs * kept[..., None]).sum(1) / n_kept.clamp_min(1)[:, None]  # (B, 10)
        valid = n_kept > 0
        entropy = score_entropy(mixture)
        extras = {
            "expected_score": [float(s) if v else None for s, v in zip(score.tolist(), valid.tolist())],
            "score_entropy": [float(h) if v else None for h, v in zip(entropy.tolist(), valid.tolist())],
            "score_mass": mass.mean(1).tolist(),
            "rationales": [rationales[i * k:(i + 1) * k] for i in range(B)],
            "rationale_scores": [[float(s) if ok else None for s, ok in zip(scores[i].tolist(), kept[i].tolist())] for i in range(B)],
        }
        return RewardResult(score_reward(score), valid, extras)

    def shared_adapter(self) -> str | None:
        return self.judge.shared_adapter


def build_drlaif(cfg: DRLAIFConfig, host: Any = None) -> DRLAIFReward:
    """The d-RLAIF provider a config describes. With `host` (`policies.actor_critic.ActorCritic`)
    whose shared base is the judge model (same quantization, autocast and device), the judge is
    that base with the host's adapters off, so no second copy is loaded; else a model of its own."""
    template = load_drlaif_template(None if cfg.template_file else cfg.preset, cfg.template_file)  # errors before any loading
    judge = None
    if host is not None and cfg.device in ("auto", host.device.type):
        base = resolve_model_path(cfg.model, None)
        if host.can_host_adapter(base, cfg.quantization, autocast_dtype(cfg.autocast, host.device)):
            judge = JudgeLM.on_host(host)
    if judge is None:
        judge = JudgeLM.load(cfg.model, dtype=cfg.dtype, quantization=cfg.quantization, device=cfg.device, autocast_mode=cfg.autocast, engine=cfg.engine)
    return DRLAIFReward(
        judge, template, chat_template=cfg.chat_template, cot=cfg.cot, cot_samples=cfg.cot_samples, cot_sampling=cfg.cot_sampling,
        min_mass=cfg.min_mass, batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens,
        max_completion_tokens=cfg.max_completion_tokens, name=cfg.name or "drlaif",
    )

"""GenRM: a causal LM as a pairwise judge (Mahan et al. 2024, "Generative Reward Models").

The judge reads MT-Bench's pair-v2 prompt without the tie (`rewards.judge_format`) and its
verdict is the next token after "[[": "A" (the first answer shown is better) or "B". We never
parse sampled text for the verdict; we read the probabilities of the two verdict tokens:

    p_A, p_B = p("A" | ctx + "[["), p("B" | ctx + "[[")
    P(A ≻ B) = p_A / (p_A + p_B) = σ(log p_A − log p_B),    mass = p_A + p_B

- `direct`: ctx is the conversation with the judge's turn opened; one forward per comparison.
- `cot` (GenRM-CoT, Mahan et al. 2024 §3): the judge first samples k rationales; each is cut
  at its own first "[[" (`cut_rationale`) and the verdict is read after
  `rationale + "\\n\\n[["`. P is the share of rationales voting A (ties count ½; the paper's
  majority vote, kept as a fraction) or the mean of their P(A ≻ B) (`cot_aggregate`).
- A comparison whose verdict-token mass is below `min_mass` is invalid: the judge was not
  answering in the format (in CoT, such rationales are left out; none left → invalid).
- Order swap (on by default): LLM judges favour a position (Zheng et al. 2023, §3.3 "position
  bias"), so each pair is also judged with the answers exchanged and the two estimates of
  P(first ≻ second) are averaged:

      P = ½ [ P(first ≻ second | first shown as A) + 1 − P(second ≻ first | second shown as A) ]

  A comparison is invalid when either order is (averaging with an order that did not answer
  would bring the position bias back).

`build_genrm` loads the judge: a base model by name (`model`) or a trained judge directory
(`path`, written by `rlhf train-judge`); given a host (the PPO `ActorCritic`) whose shared base
is the judge's base, it runs there (adapters off, or a frozen `judge` adapter) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from policies.hub import resolve_model_path
from policies.models import autocast_dtype
from rewards.base import PairwiseJudge, PreferenceResult
from rewards.judge_format import VERDICT_OPEN, VERDICT_TOKENS, cut_rationale, pairwise_messages, question_text, read_judge_meta
from rewards.judge_lm import JudgeLM, batched
from rlhf.config import ConfigError, Dtype, Quantization, SamplingConfig, doc
from rlhf.data import Prompt

DEFAULT_JUDGE_MODEL = "smollm2-135m-instruct"
Mode = Literal["direct", "cot"]
CotAggregate = Literal["vote", "mean_prob"]


@dataclass(frozen=True, kw_only=True)
class GenRMConfig:
    type: Literal["genrm"] = doc("genrm", "a causal LM as pairwise judge (GenRM, Mahan et al. 2024): P(first ≻ second) from its verdict tokens")
    model: str | None = doc(None, "the judge as a base model (alias, directory or hub id); null with no `path`: smollm2-135m-instruct")
    path: str | None = doc(None, "a trained judge directory (written by `rlhf train-judge`: judge.json + adapter/); exclusive with `model`")
    dtype: Dtype = doc("float32", "weight dtype of a `model` judge loaded on its own (a `path` judge uses its judge.json)")
    quantization: Quantization = doc("none", "4-bit/8-bit base weights of a `model` judge (a `path` judge uses its judge.json)")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', ...")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast: 'auto' uses it where the hardware has fast bf16")
    engine: Literal["auto", "hf", "packed"] = doc("auto", "how a judge loaded on its own runs (policies.engine); on a host, the host's engine")
    mode: Mode | None = doc(None, "'direct': read the verdict at once; 'cot': sample rationales first; null: what a `path` judge was trained for, else direct")
    cot_samples: int = doc(4, "cot: rationales k sampled per comparison (and per order)")
    cot_sampling: SamplingConfig = doc(SamplingConfig(max_new_tokens=128, temperature=0.7), "cot: how rationales are sampled")
    cot_aggregate: CotAggregate = doc("vote", "cot: P = share of rationales voting for the first answer (ties ½), or 'mean_prob' their mean P")
    swap_order: bool = doc(True, "also judge with the answers exchanged and average the two P (position bias, Zheng et al. 2023)")
    verdict_tokens: tuple[str, str] | None = doc(None, "the two verdict tokens (single tokens of the judge's tokenizer); null: a `path` judge's, else ['A', 'B']")
    min_mass: float = doc(0.05, "below this p(A) + p(B) after '[[' the judge did not answer in the format: the comparison (or CoT rationale) is invalid")
    batch_size: int = doc(8, "judge prompts per forward / per sampling batch")
    max_prompt_tokens: int | None = doc(None, "the question keeps its last this many tokens; null: a `path` judge's setting, else 512")
    max_completion_tokens: int | None = doc(None, "each answer keeps its first this many tokens; null: a `path` judge's setting, else 256")
    name: str | None = doc(None, "name in logs (default 'genrm')")

    def __post_init__(self) -> None:
        if self.model is not None and self.path is not None:
            raise ConfigError(f"genrm takes `model` (a base model) or `path` (a trained judge), not both; got model={self.model!r}, path={self.path!r}")
        if self.cot_samples < 1:
            raise ConfigError(f"genrm cot_samples must be at least 1, got {self.cot_samples}")
        if not 0.0 <= self.min_mass < 1.0:
            raise ConfigError(f"genrm min_mass must lie in [0, 1), got {self.min_mass}")
        if self.batch_size < 1:
            raise ConfigError(f"genrm batch_size must be at least 1, got {self.batch_size}")
        for key in ("max_prompt_tokens", "max_completion_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"genrm {key} must be positive, got {getattr(self, key)}")
        if self.verdict_tokens is not None:
            tokens = tuple(self.verdict_tokens)
            if len(tokens) != 2 or not all(tokens) or tokens[0] == tokens[1]:
                raise ConfigError(f"genrm verdict_tokens must be two different non-empty strings, got {list(self.verdict_tokens)}")

    @property
    def base_model(self) -> str | None:
        """The `model` judge's base (the default model where neither key is set); None for `path`."""
        if self.path is not None:
            return None
        return self.model or DEFAULT_JUDGE_MODEL


def verdict_probability(logprobs: torch.Tensor, id_a: int, id_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The verdict read-out. logprobs (B, V): log p(· | ctx + "[[") at the verdict position.

        p_first = p_A / (p_A + p_B) = σ(log p_A − log p_B)      (B,) float32, P(A ≻ B)
        mass    = p_A + p_B                                     (B,) float32

    In log space, so that two tiny probabilities still give an exact ratio; where both are 0,
    p_first is ½ (mass 0 makes the comparison invalid anyway)."""
    la, lb = logprobs[:, id_a].double(), logprobs[:, id_b].double()
    p_first = torch.nan_to_num(torch.sigmoid(la - lb), nan=0.5)
    mass = la.exp() + lb.exp()
    return p_first.float(), mass.float()


def aggregate_rationales(p: torch.Tensor, mass: torch.Tensor, min_mass: float, how: CotAggregate) -> tuple[float, bool]:
    """One comparison's P(A ≻ B) from its k rationales' read-outs p (k,), mass (k,): the share of
    rationales with p > ½ (p = ½ counts ½) or the mean p, over the rationales whose mass reaches
    `min_mass`. Returns (P, valid); no rationale left → (½, False)."""
    kept = mass >= min_mass
    if not bool(kept.any()):
        return 0.5, False
    p = p[kept].double()
    if how == "vote":
        votes = torch.where(p > 0.5, 1.0, torch.where(p < 0.5, 0.0, 0.5))
        return float(votes.mean()), True
    return float(p.mean()), True


@dataclass
class _Readout:
    """One order's read-out for B comparisons: P(A ≻ B) where the first answer shown is A."""

    prob: torch.Tensor  # (B,) float32
    mass: torch.Tensor  # (B,) float32 mean verdict mass (over rationales in CoT)
    valid: torch.Tensor  # (B,) bool
    rationales: list[list[str]] | None = None  # CoT: the k cut rationales of each comparison


class GenRMJudge(PairwiseJudge):
    """P(first ≻ second) from a judge LM's verdict tokens (module docstring). `lm`: a `JudgeLM`
    (or anything with its `clip`, `render`, `token_id`, `encode`, `last_logprobs`, `sample`)."""

    def __init__(self, lm: JudgeLM, *, mode: Mode = "direct", cot_samples: int = 4, cot_sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, temperature=0.7),
                 cot_aggregate: CotAggregate = "vote", swap_order: bool = True, verdict_tokens: tuple[str, str] = VERDICT_TOKENS, min_mass: float = 0.05,
                 batch_size: int = 8, max_prompt_tokens: int = 512, max_completion_tokens: int = 256, chat_template: bool = True, name: str = "genrm") -> None:
        if mode not in ("direct", "cot") or cot_aggregate not in ("vote", "mean_prob"):
            raise ValueError(f"unknown mode {mode!r} or cot_aggregate {cot_aggregate!r}")
        self.lm = lm
        self.mode, self.cot_samples, self.cot_sampling, self.cot_aggregate = mode, cot_samples, cot_sampling, cot_aggregate
        self.swap_order, self.min_mass, self.batch_size = swap_order, min_mass, batch_size
        self.max_prompt_tokens, self.max_completion_tokens, self.chat_template = max_prompt_tokens, max_completion_tokens, chat_template
        self.name = name
        self.verdict_ids = (lm.token_id(verdict_tokens[0]), lm.token_id(verdict_tokens[1]))  # raises unless single tokens
        # "[[" as ids appended after the text: the verdict is read exactly one token after it,
        # whatever the text before would merge into.
        self.open_ids = lm.tokenizer(VERDICT_OPEN, add_special_tokens=False)["input_ids"]

    # --- the interface ------------------------------------------------------------------------
    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> PreferenceResult:
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} first and {len(second)} second completions")
        B = len(prompts)
        questions = [self.lm.clip(question_text(p), self.max_prompt_tokens, keep="last") for p in prompts]
        a = [self.lm.clip(c, self.max_completion_tokens) for c in first]
        b = [self.lm.clip(c, self.max_completion_tokens) for c in second]
        # both orders in one pass: rows 0..B-1 show `first` as A, rows B..2B-1 show `second` as A
        conversations = [pairwise_messages(q, x, y) for q, x, y in zip(questions, a, b)]
        if self.swap_order:
            conversations += [pairwise_messages(q, y, x) for q, x, y in zip(questions, a, b)]
        out = self._cot(conversations) if self.mode == "cot" else self._direct(conversations)
        prob, valid, mass = out.prob[:B], out.valid[:B], out.mass[:B]
        extras: dict[str, list[Any]] = {"prob_first_order": prob.tolist()}
        if self.swap_order:
            swapped_prob = 1 - out.prob[B:]  # flipped back: P(first ≻ second) from the swapped order
            extras["prob_swapped_order"] = swapped_prob.tolist()
            # a winner is the side of ½ a P falls on (a P of exactly ½ picks neither)
            extras["order_disagrees"] = (torch.sign(prob - 0.5) != torch.sign(swapped_prob - 0.5)).tolist()
            prob = 0.5 * (prob + swapped_prob)
            valid = valid & out.valid[B:]  # an order that did not answer can't be averaged away
            mass = torch.minimum(mass, out.mass[B:])
        extras["verdict_mass"] = mass.tolist()
        if out.rationales is not None:
            extras["rationales"] = out.rationales[:B]
            if self.swap_order:
                extras["rationales_swapped"] = out.rationales[B:]
        return PreferenceResult(prob, valid, extras)

    def shared_adapter(self) -> str | None:
        return self.lm.shared_adapter

    # --- the two modes -------------------------------------------------------------------------
    def _read(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_first, mass), each (N,), read one token after `text + "[["` for every text."""
        p = torch.zeros(len(texts))
        mass = torch.zeros(len(texts))
        for idx in batched(len(texts), self.batch_size, [len(t) for t in texts]):
            ids, attn = self.lm.encode([texts[i] for i in idx], append=[self.open_ids] * len(idx))
            logprobs = self.lm.last_logprobs(ids, attn, k=1)[:, -1]  # (n, V)
            p[idx], mass[idx] = verdict_probability(logprobs, *self.verdict_ids)
        return p, mass

    def _direct(self, conversations: list[list[dict[str, str]]]) -> _Readout:
        p, mass = self._read([self.lm.render(c, chat=self.chat_template) for c in conversations])
        return _Readout(p, mass, mass >= self.min_mass)

    def _cot(self, conversations: list[list[dict[str, str]]]) -> _Readout:
        k = self.cot_samples
        rendered = [self.lm.render(c, chat=self.chat_template) for c in conversations]
        queue = [t for t in rendered for _ in range(k)]  # row n·k + j: rationale j of comparison n
        sampled: list[str] = [""] * len(queue)
        for idx in batched(len(queue), self.batch_size, [len(t) for t in queue]):
            for i, text in zip(idx, self.lm.sample([queue[i] for i in idx], self.cot_sampling)):
                sampled[i] = text
        rationales = [cut_rationale(s) for s in sampled]
        # the verdict follows the rationale as a trained judge writes it (`verdict_target`)
        p, mass = self._read([t + (f"{r}\n\n" if r else "") for t, r in zip(queue, rationales)])
        n = len(conversations)
        prob, valid = torch.full((n,), 0.5), torch.zeros(n, dtype=torch.bool)
        for c in range(n):
            prob[c], valid[c] = aggregate_rationales(p[c * k:(c + 1) * k], mass[c * k:(c + 1) * k], self.min_mass, self.cot_aggregate)
        return _Readout(prob, mass.view(n, k).mean(1), valid, [rationales[c * k:(c + 1) * k] for c in range(n)])


# ----------------------------------------------------------------------------------------------
# Building from config
# ----------------------------------------------------------------------------------------------


def build_genrm(cfg: GenRMConfig, host: Any = None) -> GenRMJudge:
    """The judge `cfg` describes. Settings left null come from a trained judge's judge.json
    (`path`) or the defaults. With `host` (`policies.actor_critic.ActorCritic`) whose shared base
    is the judge's base (same quantization and autocast, same device), the judge runs on it: a
    `path` judge as the frozen `judge` adapter, a `model` judge as the base with the host's
    adapters off. Otherwise it loads a model of its own."""
    meta = read_judge_meta(cfg.path) if cfg.path is not None else None
    lm = None
    if host is not None and cfg.device in ("auto", host.device.type) and getattr(host, "base_path", None) is not None:
        base = meta.base_model if meta else cfg.base_model
        quantization = meta.quantization if meta else cfg.quantization
        revision = meta.revision if meta else None
        if host.can_host_adapter(resolve_model_path(base, revision), quantization, autocast_dtype(cfg.autocast, host.device)):
            lm = JudgeLM.on_host(host, Path(cfg.path) / "adapter" if cfg.path is not None else None)
    if lm is None:
        lm = JudgeLM.load(cfg.base_model, path=cfg.path, dtype=cfg.dtype, quantization=cfg.quantization, device=cfg.device,
                          autocast_mode=cfg.autocast, engine=cfg.engine)
    return GenRMJudge(
        lm,
        mode=cfg.mode or (meta.mode if meta else "direct"),  # type: ignore[arg-type]
        cot_samples=cfg.cot_samples,
        cot_sampling=cfg.cot_sampling,
        cot_aggregate=cfg.cot_aggregate,
        swap_order=cfg.swap_order,
        verdict_tokens=tuple(cfg.verdict_tokens or (meta.verdict_tokens if meta else VERDICT_TOKENS)),  # type: ignore[arg-type]
        min_mass=cfg.min_mass,
        batch_size=cfg.batch_size,
        max_prompt_tokens=cfg.max_prompt_tokens or (meta.max_prompt_tokens if meta else 512),
        max_completion_tokens=cfg.max_completion_tokens or (meta.max_completion_tokens if meta else 256),
        chat_template=meta.chat_template if meta else True,
        name=cfg.name or "genrm",
    )

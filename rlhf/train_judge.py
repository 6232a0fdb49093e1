"""`rlhf train-judge`: train a GenRM judge (Mahan et al. 2024, "Generative Reward Models").

The judge is a causal LM with a LoRA adapter that reads MT-Bench's pair-v2 prompt without the tie
(`rewards.judge_format.pairwise_messages`) and writes "[[A]]" or "[[B]]", in CoT mode after a
rationale. Three methods, one loop of iterations:

- `sft` (GenRM, direct mode; one iteration): each preference pair gives two examples, one per
  order: the chosen answer shown as A → "[[A]]", shown as B → "[[B]]". SFT with the loss on the
  verdict (and EOS) only.
- `star` (CoT-GenRM with STaR, Zelikman et al. 2022, Algorithm 1): per iteration, the current
  judge samples `star_samples` rationales for every training pair in both orders; those after
  which it reaches the label are kept (below); with `rationalize`, a task with none kept is
  sampled again with the right verdict given as a hint, and the hint is left out of the
  training prompt; then SFT on (judge prompt, rationale + "\\n\\n[[X]]").
- `star_dpo` (Mahan et al. 2024, STaR-DPO): per iteration, the same samples make DPO pairs
  (a rationale reaching the right verdict ≻ one reaching the wrong verdict, same judge prompt),
  trained with TRL's DPOTrainer; the reference is the starting adapter (the base model with a
  fresh LoRA), as a frozen copy that TRL keeps on the same base.

Every iteration trains a fresh adapter from the starting model on the data the previous
iteration's judge produced, as STaR does ("M_n ← train(M, D_n)": restarting from the original
model rather than fine-tuning the last one keeps errors from compounding across iterations,
Zelikman et al. 2022, §3.1). Iteration 0 is the starting model, evaluated zero-shot.

Which rationale counts as right: the one after which the judge reads the label, the way GenRM
reads a CoT verdict at inference (`judge_rationales`): the sample is cut at its first "[["
(`cut_rationale`) and the verdict is P(A ≻ B) at the token after rationale + "\\n\\n[[" (above ½:
A). Not the letter the sample wrote itself: small judges seldom write "[[A]]"/"[[B]]" before they
are trained (SmolLM2-135M wrote it in none of 8 samples of 64 tokens), so parsing would leave
STaR nothing to keep, and the read-out is the verdict the trained judge will be scored by. A
sample with nothing before its "[[", or after which p(A) + p(B) < min_mass, counts as neither.

What the judge reads in training is what `rewards.genrm.GenRMJudge` feeds it at inference: the
question clipped to its last `max_prompt_tokens` tokens, each answer to its first
`max_completion_tokens`, through `JudgeLM.clip`/`JudgeLM.render` (`judge_prompt`), and
judge.json records both limits so that `GenRMConfig(path=...)` clips the same way.

Run directory (every file written atomically; judge.json is written after its adapter):

    config.json, metrics.jsonl (one line per iteration), summary.json
    iter_0/result.json                    zero-shot held-out accuracy of the starting model
    iter_N/rationales.jsonl               STaR: each task's right, wrong and rationalized rationales
    iter_N/train.json                     the iteration's data and training statistics
    iter_N/judge/{judge.json, adapter/}   the judge after iteration N
    iter_N/result.json                    its held-out accuracy: the iteration is complete
    judge/                                the final judge (the last iteration's), for `GenRMConfig(path=...)`

A stopped run resumes: complete iterations are skipped; an iteration whose judge.json exists is
only evaluated; any other iteration is redone from scratch.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from policies.models import autocast_dtype, count_parameters, load_model
from rewards.base import PairwiseJudge
from rewards.judge_format import VERDICT_CLOSE, VERDICT_OPEN, VERDICT_TOKENS, JudgeMeta, cut_rationale, pairwise_messages, question_text, verdict_target, write_judge_meta
from rewards.judge_lm import JudgeLM, batched
from rlhf.config import ConfigError, DataConfig, LoraConfig, ModelConfig, SamplingConfig, doc, to_dict
from rlhf.core import pairwise_accuracy
from rlhf.data import PreferencePair, Prompt, load_split, prompt_key
from rlhf.io import atomic_write_json, atomic_write_jsonl
from rlhf.runs import prepare_run_dir, seed_everything
from rlhf.tracking import Tracker, TrackerName

Method = Literal["sft", "star", "star_dpo"]

HINT = (
    "\n\n[Hint]\nThe better answer is Assistant {letter}'s. Explain why in your evaluation, "
    "without mentioning this hint, then give your verdict."
)
"""STaR's rationalization (Zelikman et al. 2022, §3.2): the right answer given as a hint, appended
to the judge's user message while sampling, never part of a training prompt."""


@dataclass(frozen=True)
class TrainJudgeConfig:
    model: ModelConfig = doc(ModelConfig(lora=LoraConfig(enabled=True)), "judge base model and its LoRA (lora.enabled must be true; QLoRA: quantization 4bit)")
    data: DataConfig = doc(DataConfig(split="train"), "training preference pairs")
    eval_data: DataConfig | None = doc(DataConfig(split="test", max_items=128), "held-out pairs scored by GenRM after every iteration, zero-shot included (null: skip)")
    method: Method = doc("sft", "'sft': direct GenRM; 'star': CoT-GenRM with STaR; 'star_dpo': STaR samples as DPO pairs")
    iterations: int = doc(1, "STaR iterations (sample, filter, train from the starting model); sft: 1")
    star_samples: int = doc(4, "rationales k sampled per training pair and order, per iteration")
    star_sampling: SamplingConfig = doc(SamplingConfig(max_new_tokens=128, temperature=0.7), "how rationales are sampled (STaR and CoT evaluation)")
    rationalize: bool = doc(False, "star methods: re-sample tasks with no right rationale, the right verdict given as a hint (STaR rationalization)")
    eval_cot_samples: int = doc(4, "CoT evaluation: rationales per comparison and order (GenRM cot_samples)")
    min_mass: float = doc(0.05, "GenRM's min_mass: below this p(A) + p(B) after '[[' the judge did not answer (evaluation: a tie; STaR: the rationale is neither right nor wrong)")
    chat_template: bool = doc(True, "render the judge prompt with the tokenizer's chat template")
    max_prompt_tokens: int = doc(256, "the question keeps its last this many tokens (recorded in judge.json)")
    max_completion_tokens: int = doc(128, "each answer keeps its first this many tokens (recorded in judge.json)")
    lr: float = doc(1e-4, "peak learning rate of the LoRA parameters (linear warm-up, then linear decay)")
    warmup_ratio: float = doc(0.05, "fraction of the steps with linear warm-up")
    epochs: int = doc(1, "passes over each iteration's training examples")
    micro_batch_size: int = doc(4, "examples per forward pass")
    grad_accum_steps: int = doc(2, "micro-batches per optimizer step")
    max_steps: int | None = doc(None, "stop each iteration's training after this many optimizer steps")
    dpo_beta: float = doc(0.1, "star_dpo: DPO's β (strength of the implicit KL to the reference)")
    judge_batch_size: int = doc(8, "judge prompts per sampling / scoring batch")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 (TRL's bf16 mixed precision in training, autocast in the judge): 'auto' where the hardware has fast bf16")
    seed: int = doc(0, "random seed (sampling, data order, LoRA init)")
    output_dir: str = doc("runs/judge", "run directory; the judge goes to OUTPUT_DIR/judge")
    tracker: TrackerName = doc("none", "metrics.jsonl always; plus 'tensorboard' or 'wandb' (offline without an API key)")
    log_every: int = doc(5, "TRL logs the training loss every this many optimizer steps (iter_N/train.json)")

    def __post_init__(self) -> None:
        if not self.model.lora.enabled:
            raise ConfigError("model.lora.enabled must be true: a trained judge is saved as a LoRA adapter (judge.json + adapter/)")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if self.method == "sft" and self.iterations != 1:
            raise ConfigError(f"iterations must be 1 for method sft (only STaR methods iterate), got {self.iterations}")
        if self.rationalize and self.method == "sft":
            raise ConfigError("rationalize applies to method star or star_dpo, not sft (sft samples no rationales)")
        for key in ("star_samples", "eval_cot_samples", "max_prompt_tokens", "max_completion_tokens", "epochs",
                    "micro_batch_size", "grad_accum_steps", "judge_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or null), got {self.max_steps}")
        if not (self.lr > 0 and self.dpo_beta > 0):
            raise ConfigError(f"lr and dpo_beta must be positive, got lr={self.lr}, dpo_beta={self.dpo_beta}")
        if not 0.0 <= self.min_mass < 1.0:
            raise ConfigError(f"min_mass must lie in [0, 1), got {self.min_mass}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")

    @property
    def mode(self) -> Literal["direct", "cot"]:
        """What the judge is trained to write: the verdict alone (sft) or a rationale first."""
        return "direct" if self.method == "sft" else "cot"


# ----------------------------------------------------------------------------------------------
# Judge prompts: exactly what GenRM feeds the judge
# ----------------------------------------------------------------------------------------------


def judge_prompt(lm: JudgeLM, prompt: Prompt, first: str, second: str, cfg: TrainJudgeConfig, *, hint: str = "") -> str:
    """The rendered judge prompt comparing `first` (shown as A) with `second` (shown as B), the
    judge's turn opened: the text `GenRMJudge.prefer` renders for the same comparison (question
    clipped to its last max_prompt_tokens tokens, answers to their first max_completion_tokens).
    `hint` is appended to the user message (rationalization only)."""
    question = lm.clip(question_text(prompt), cfg.max_prompt_tokens, keep="last")
    a = lm.clip(first, cfg.max_completion_tokens)
    b = lm.clip(second, cfg.max_completion_tokens)
    messages = pairwise_messages(question, a, b)
    if hint:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + hint}
    return lm.render(messages, chat=cfg.chat_template)


@dataclass(frozen=True)
class JudgeTask:
    """One judge prompt with its label: a training pair shown in one order."""

    pair: int  # index of the training pair
    chosen_first: bool  # the label: True when the chosen answer is shown as A (the right verdict is "[[A]]")
    prompt: str  # the rendered judge prompt (`judge_prompt`)
    hint_prompt: str  # the same with the right verdict as a hint (rationalization)


def judge_tasks(lm: JudgeLM, pairs: Sequence[PreferencePair], cfg: TrainJudgeConfig) -> list[JudgeTask]:
    """Both orders of every pair: chosen as A (label A), then chosen as B (label B). Showing each
    pair both ways keeps the judge from learning a position (Zheng et al. 2023, §3.3)."""
    tasks = []
    for i, p in enumerate(pairs):
        for chosen_first in (True, False):
            first, second = (p.chosen, p.rejected) if chosen_first else (p.rejected, p.chosen)
            hint = HINT.format(letter=VERDICT_TOKENS[0] if chosen_first else VERDICT_TOKENS[1])
            tasks.append(JudgeTask(i, chosen_first, judge_prompt(lm, p.prompt, first, second, cfg),
                                   judge_prompt(lm, p.prompt, first, second, cfg, hint=hint) if cfg.rationalize else ""))
    return tasks


def direct_rows(tasks: Sequence[JudgeTask]) -> list[dict[str, str]]:
    """SFT examples in TRL's prompt-completion format: the judge prompt → "[[A]]" / "[[B]]"."""
    return [{"prompt": t.prompt, "completion": verdict_target(t.chosen_first)} for t in tasks]


# ----------------------------------------------------------------------------------------------
# STaR: sample rationales, keep the right ones
# ----------------------------------------------------------------------------------------------


def sample_rationales(lm: JudgeLM, texts: Sequence[str], sampling: SamplingConfig, batch_size: int) -> list[str]:
    """One sampled continuation per text, in batches of similar length (GenRM samples the same way)."""
    out = [""] * len(texts)
    for idx in tqdm(batched(len(texts), batch_size, [len(t) for t in texts]), desc="sample rationales", unit="batch", leave=False):
        for i, text in zip(idx, lm.sample([texts[i] for i in idx], sampling)):
            out[i] = text
    return out


def read_verdicts(lm: JudgeLM, texts: Sequence[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GenRM's verdict read-out after each text: P(A ≻ B) = p_A / (p_A + p_B) and the verdict mass
    p_A + p_B at the token after text + "[[" (`rewards.genrm.verdict_probability`; "[[" appended as
    ids, as GenRMJudge does). texts: judge prompt + rationale + "\\n\\n". Returns two (N,) tensors."""
    from rewards.genrm import verdict_probability

    open_ids = lm.tokenizer(VERDICT_OPEN, add_special_tokens=False)["input_ids"]
    id_a, id_b = lm.token_id(VERDICT_TOKENS[0]), lm.token_id(VERDICT_TOKENS[1])
    p, mass = torch.zeros(len(texts)), torch.zeros(len(texts))
    for idx in tqdm(batched(len(texts), batch_size, [len(t) for t in texts]), desc="read verdicts", unit="batch", leave=False):
        ids, attn = lm.encode([texts[i] for i in idx], append=[open_ids] * len(idx))
        p[idx], mass[idx] = verdict_probability(lm.last_logprobs(ids, attn, k=1)[:, -1], id_a, id_b)
    return p, mass


def sampled_verdict(text: str) -> bool | None:
    """The verdict a sample wrote itself: True for "[[A]]", False for "[[B]]", None when its first
    "[[" opens neither or there is none. A diagnostic only (`wrote_verdict_fraction`): small
    judges seldom write the format before they are trained (SmolLM2-135M: none of 8 samples of
    64 tokens), so STaR's filter uses the read-out instead (`judge_rationales`)."""
    _, opened, rest = text.partition(VERDICT_OPEN)
    if opened:
        for first_is_better, token in ((True, VERDICT_TOKENS[0]), (False, VERDICT_TOKENS[1])):
            if rest.startswith(token + VERDICT_CLOSE):
                return first_is_better
    return None


def judge_rationales(lm: JudgeLM, prompts: Sequence[str], samples: Sequence[str], cfg: TrainJudgeConfig) -> list[tuple[str, bool | None]]:
    """(rationale, verdict) per sample: the rationale is the sample cut at its first "[["
    (`cut_rationale`), its verdict what the judge reads after prompt + rationale, as GenRM does
    at inference: True (A) where P(A ≻ B) > ½, False where < ½, None where the sample has no
    rationale, the verdict mass is below min_mass, or P is exactly ½."""
    rationales = [cut_rationale(s) for s in samples]
    keep = [i for i, r in enumerate(rationales) if r]
    p, mass = read_verdicts(lm, [f"{prompts[i]}{rationales[i]}\n\n" for i in keep], cfg.judge_batch_size)
    verdicts: list[bool | None] = [None] * len(samples)
    for j, i in enumerate(keep):
        if mass[j] >= cfg.min_mass and p[j] != 0.5:
            verdicts[i] = bool(p[j] > 0.5)
    return list(zip(rationales, verdicts))


@dataclass
class TaskRationales:
    """What the samples of one task gave (distinct rationales, in sampling order)."""

    task: JudgeTask
    right: list[str]  # rationales after which the judge reads the label
    wrong: list[str]  # rationales after which it reads the other verdict
    rationalized: list[str]  # right rationales sampled with the hint (only where `right` is empty)
    undecided: int  # samples with no rationale, too little verdict mass, or P = ½
    wrote_verdict: int  # samples that wrote "[[A]]" or "[[B]]" themselves (diagnostic)

    @property
    def good(self) -> list[str]:
        return self.right or self.rationalized


def _sort(judged: Sequence[tuple[str, bool | None]], label: bool) -> tuple[list[str], list[str], int]:
    right = [r for r, v in judged if v is label]
    wrong = [r for r, v in judged if v is (not label)]
    return list(dict.fromkeys(right)), list(dict.fromkeys(wrong)), sum(v is None for _, v in judged)


def collect_rationales(lm: JudgeLM, tasks: Sequence[JudgeTask], cfg: TrainJudgeConfig) -> list[TaskRationales]:
    """STaR's sampling step: k rationales per task from `lm`, sorted right / wrong by the verdict
    `lm` reads after each. With `rationalize`, a task with no right rationale is sampled again
    with the hint (Zelikman et al. 2022, §3.2); a hinted rationale is kept when the verdict read
    after it *without* the hint (the context it is trained and used in) is the label."""
    k = cfg.star_samples
    prompts = [t.prompt for t in tasks for _ in range(k)]  # row n·k + j: sample j of task n
    samples = sample_rationales(lm, prompts, cfg.star_sampling, cfg.judge_batch_size)
    judged = judge_rationales(lm, prompts, samples, cfg)
    found = []
    for n, task in enumerate(tasks):
        right, wrong, undecided = _sort(judged[n * k:(n + 1) * k], task.chosen_first)
        wrote = sum(sampled_verdict(s) is not None for s in samples[n * k:(n + 1) * k])
        found.append(TaskRationales(task, right, wrong, [], undecided, wrote))
    if cfg.rationalize:
        missing = [f for f in found if not f.right]
        hinted = sample_rationales(lm, [f.task.hint_prompt for f in missing for _ in range(k)], cfg.star_sampling, cfg.judge_batch_size)
        judged = judge_rationales(lm, [f.task.prompt for f in missing for _ in range(k)], hinted, cfg)
        for n, f in enumerate(missing):
            f.rationalized = _sort(judged[n * k:(n + 1) * k], f.task.chosen_first)[0]
    return found


def star_rows(found: Sequence[TaskRationales]) -> list[dict[str, str]]:
    """STaR's SFT examples: the judge prompt (never the hint) → right rationale + "\\n\\n[[X]]"."""
    return [{"prompt": f.task.prompt, "completion": verdict_target(f.task.chosen_first, r)} for f in found for r in f.good]


def star_dpo_rows(found: Sequence[TaskRationales]) -> list[dict[str, str]]:
    """DPO pairs in TRL's format: for one judge prompt, a right rationale with the right verdict
    (chosen) against a wrong rationale with the wrong verdict (rejected). Each rationale is used
    once: the i-th right one with the i-th wrong one, so a task gives min(#right, #wrong) pairs."""
    rows = []
    for f in found:
        label = f.task.chosen_first
        for good, bad in zip(f.good, f.wrong):
            rows.append({"prompt": f.task.prompt, "chosen": verdict_target(label, good), "rejected": verdict_target(not label, bad)})
    return rows


def rationale_stats(found: Sequence[TaskRationales], k: int) -> dict[str, float]:
    n = max(1, len(found))
    return {
        "tasks": len(found),
        "right_fraction": sum(bool(f.right) for f in found) / n,  # tasks with a right rationale of their own
        "rationalized_fraction": sum(bool(f.rationalized) for f in found) / n,
        "undecided_fraction": sum(f.undecided for f in found) / (n * k),  # of the first-round samples
        "wrote_verdict_fraction": sum(f.wrote_verdict for f in found) / (n * k),
        "right_rationales": sum(len(f.right) for f in found),
        "wrong_rationales": sum(len(f.wrong) for f in found),
        "rationalized_rationales": sum(len(f.rationalized) for f in found),
    }


def _rationale_records(found: Sequence[TaskRationales]) -> list[dict[str, Any]]:
    return [{"pair": f.task.pair, "chosen_first": f.task.chosen_first, "right": f.right, "wrong": f.wrong,
             "rationalized": f.rationalized, "undecided": f.undecided, "wrote_verdict": f.wrote_verdict} for f in found]


# ----------------------------------------------------------------------------------------------
# Training through TRL
# ----------------------------------------------------------------------------------------------


def trl_prompt(tok: Any, text: str) -> str:
    """`text` as TRL must receive it to produce the ids the judge sees at inference.

    TRL tokenizes a plain-text prompt with the tokenizer's special tokens (`tok(text)`), while the
    judge encodes the rendered prompt without them (the chat template already wrote its BOS).
    Where the tokenizer adds a BOS of its own (Llama-3, Mistral), the template's leading BOS is
    dropped from the text so that the ids come out the same; SmolLM2 and Qwen add nothing."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok(text)["input_ids"] == ids:
        return text
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok(text[len(bos):])["input_ids"] == ids:
        return text[len(bos):]
    raise ValueError("the tokenizer adds special tokens other than a leading BOS to plain text: "
                     "TRL's tokenization of the judge prompt would differ from the judge's at inference")


def _trainer_args(cfg: TrainJudgeConfig, out_dir: Path, model: Any) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO: no checkpoints (an iteration is redone whole), no
    reporting (metrics.jsonl is ours), no TRL gradient checkpointing (model.gradient_checkpointing
    is applied by load_model, RLHF-style, when asked for)."""
    device = next(model.parameters()).device
    return dict(
        output_dir=str(out_dir), learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum_steps,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, weight_decay=0.0, logging_steps=cfg.log_every,
        save_strategy="no", report_to="none", bf16=autocast_dtype(cfg.autocast, device) is not None, fp16=False,
        use_cpu=device.type == "cpu", gradient_checkpointing=False, seed=cfg.seed, data_seed=cfg.seed,
        max_length=None,  # never truncate: the clipping in `judge_prompt` bounds every example
    )


def completion_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
    """TRL's SFT loss, −Σ log p(label) / (labelled tokens, or `num_items_in_batch` over the
    accumulated batch), computed with the LM head on the labelled tail of the rows only.

    Why not TRL's own: its fused LM head scores only the labelled positions where Triton runs
    (GPUs) and every position elsewhere (`add_fused_lm_head` in trl/trainer/utils.py: `compact =
    _use_triton(...)`). On the CPU a judge example is a few hundred prompt tokens and a verdict
    of five, so TRL's loss would project ~50x more positions through the 49k-word head than the
    loss uses. Here the model returns logits only from the first labelled column of the batch on
    (transformers' `logits_to_keep`); tests check the value equals TRL's."""
    labels = inputs["labels"]  # (B, T) -100 off the completion (TRL's labels)
    T = labels.shape[1]
    cols = (labels != -100).any(0).nonzero()
    start = int(cols[0]) if len(cols) else T - 1  # first labelled column; ≥ 1 since every prompt is non-empty
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    # logits at columns start−1 … T−1 predict the tokens at start … T (the last one predicts nothing)
    logits = model(**model_inputs, use_cache=False, logits_to_keep=T - start + 1).logits[:, :-1]  # (B, T − start, V)
    target = labels[:, start:]  # (B, T − start)
    total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    n = (target != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(n).clamp(min=1)


@functools.cache
def _completion_sft_trainer() -> type:
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer (data preparation, completion-only labels, collator, optimizer,
        schedule) with `completion_loss` as its loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            loss = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients over ranks
            return (loss, None) if return_outputs else loss

    return CompletionSFTTrainer


def sft_trainer(model: Any, tok: Any, rows: Sequence[dict[str, str]], cfg: TrainJudgeConfig, out_dir: Path) -> Any:
    """TRL's SFTTrainer on prompt-completion rows with the loss on the completion only: TRL
    appends EOS to each completion and sets the prompt tokens' labels to -100
    (`completion_only_loss`); the loss is TRL's, computed on those tokens only (`completion_loss`)."""
    from datasets import Dataset
    from trl import SFTConfig

    # group_by_length: batches of similar length, less padding (judge prompts vary by ~100 tokens)
    args = SFTConfig(**_trainer_args(cfg, out_dir, model), completion_only_loss=True, packing=False, train_sampling_strategy="group_by_length")
    data = Dataset.from_list([{"prompt": trl_prompt(tok, r["prompt"]), "completion": r["completion"]} for r in rows])
    return _completion_sft_trainer()(model=model, args=args, train_dataset=data, processing_class=tok)


def dpo_trainer(model: Any, tok: Any, rows: Sequence[dict[str, str]], cfg: TrainJudgeConfig, out_dir: Path) -> Any:
    """TRL's DPOTrainer on (prompt, chosen, rejected) rows. `model` is the PEFT model and no
    ref_model is given: TRL then keeps a frozen copy of the starting adapter as the reference
    ("ref" adapter on the same base), i.e. the starting model."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_trainer_args(cfg, out_dir, model), beta=cfg.dpo_beta, precompute_ref_log_probs=False)
    data = Dataset.from_list([{**r, "prompt": trl_prompt(tok, r["prompt"])} for r in rows])
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def run_trainer(trainer: Any) -> dict[str, Any]:
    """trainer.train(); its final loss, steps and log history."""
    out = trainer.train()
    return {"train_loss": float(out.training_loss), "steps": int(trainer.state.global_step), "log": trainer.state.log_history}


def judge_meta(cfg: TrainJudgeConfig) -> JudgeMeta:
    m = cfg.model
    return JudgeMeta(base_model=m.name, mode=cfg.mode, dtype=m.dtype, quantization=m.quantization, chat_template=cfg.chat_template,
                     max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens,
                     trust_remote_code=m.trust_remote_code, revision=m.revision)


def save_judge(model: Any, cfg: TrainJudgeConfig, judge_dir: Path) -> Path:
    """adapter/ (the trained "default" adapter only, safetensors), then judge.json: judge.json
    exists only once the adapter is complete."""
    model.save_pretrained(str(judge_dir / "adapter"), safe_serialization=True, selected_adapters=["default"])
    return write_judge_meta(judge_dir, judge_meta(cfg))


def train_adapter(cfg: TrainJudgeConfig, rows: Sequence[dict[str, str]], it_dir: Path) -> dict[str, Any]:
    """A fresh LoRA on the starting model, trained on `rows` (SFT, or DPO for star_dpo) and saved
    as the judge it_dir/judge. Returns the training statistics (also in it_dir/train.json)."""
    loaded = load_model(cfg.model)
    trainable, total = count_parameters(loaded.model)
    build = dpo_trainer if cfg.method == "star_dpo" else sft_trainer
    print(f"{'DPO' if cfg.method == 'star_dpo' else 'SFT'} on {len(rows):,} examples; {trainable:,} of {total:,} parameters trainable")
    trainer = build(loaded.model, loaded.tokenizer, rows, cfg, it_dir / "trainer")
    t0 = time.time()
    stats = run_trainer(trainer)
    stats["train_seconds"] = round(time.time() - t0, 1)
    stats["train_examples"] = len(rows)
    atomic_write_json(it_dir / "train.json", stats)
    save_judge(loaded.model, cfg, it_dir / "judge")
    shutil.rmtree(it_dir / "trainer", ignore_errors=True)  # TRL's output_dir: nothing we keep
    del trainer, loaded
    _free_memory()
    return {k: v for k, v in stats.items() if k != "log"}


# ----------------------------------------------------------------------------------------------
# Held-out accuracy
# ----------------------------------------------------------------------------------------------


def genrm_judge(lm: JudgeLM, cfg: TrainJudgeConfig) -> PairwiseJudge:
    """The judge as GenRM runs it (both orders averaged), with this run's prompt limits."""
    from rewards.genrm import GenRMJudge

    return GenRMJudge(lm, mode=cfg.mode, cot_samples=cfg.eval_cot_samples, cot_sampling=cfg.star_sampling, min_mass=cfg.min_mass, batch_size=cfg.judge_batch_size,
                      max_prompt_tokens=cfg.max_prompt_tokens, max_completion_tokens=cfg.max_completion_tokens, chat_template=cfg.chat_template)


def judge_accuracy(judge: PairwiseJudge, pairs: Sequence[PreferencePair], chunk: int = 32) -> dict[str, float]:
    """Held-out accuracy of P(chosen ≻ rejected): 1 above ½, ½ at ½, 0 below, averaged; its
    standard error std/√n. A comparison the judge could not answer (invalid) has P = ½ and so
    counts as a tie: a judge can't gain accuracy by not answering."""
    probs, valid = [], []
    for s in tqdm(range(0, len(pairs), chunk), desc="judge eval", unit="chunk", leave=False):
        part = pairs[s:s + chunk]
        res = judge.prefer([p.prompt for p in part], [p.chosen for p in part], [p.rejected for p in part])
        probs.append(res.prob_first)
        valid.append(res.valid)
    p, v = torch.cat(probs).double(), torch.cat(valid)
    score = torch.where(p > 0.5, 1.0, torch.where(p < 0.5, 0.0, 0.5))  # per pair, for the standard error
    n = len(score)
    return {
        "pairs": n,
        "accuracy": float(pairwise_accuracy(p - 0.5)),
        "accuracy_se": float(score.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
        "mean_prob_chosen": float(p.mean()),
        "invalid": int((~v).sum()),
    }


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def load_split_pairs(cfg: DataConfig) -> list[PreferencePair]:
    return load_split(kind="pairs", **dataclasses.asdict(cfg))


class _Judges:
    """The one judge LM held at a time: the starting model (None) or a trained judge directory."""

    def __init__(self, cfg: TrainJudgeConfig) -> None:
        self.cfg, self.key, self.lm = cfg, object(), None

    def get(self, judge_dir: Path | None) -> JudgeLM:
        if self.lm is None or self.key != judge_dir:
            self.release()
            m = self.cfg.model
            common = dict(device=m.device, autocast_mode=self.cfg.autocast, engine=m.engine)
            if judge_dir is None:
                self.lm = JudgeLM.load(m.name, dtype=m.dtype, quantization=m.quantization, trust_remote_code=m.trust_remote_code, revision=m.revision, **common)
            else:
                self.lm = JudgeLM.load(path=str(judge_dir), **common)
            self.key = judge_dir
        return self.lm

    def release(self) -> None:
        self.lm, self.key = None, object()
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _complete(run_dir: Path, it: int) -> bool:
    it_dir = run_dir / f"iter_{it}"
    return (it_dir / "result.json").is_file() and (it == 0 or (it_dir / "judge" / "judge.json").is_file())


def iteration_rows(cfg: TrainJudgeConfig, lm: JudgeLM, pairs: Sequence[PreferencePair], it_dir: Path) -> list[dict[str, str]]:
    """The iteration's training rows, made with the current judge `lm` (STaR: its rationales,
    recorded in it_dir/rationales.jsonl and counted in it_dir/star.json)."""
    tasks = judge_tasks(lm, pairs, cfg)
    if cfg.method == "sft":
        return direct_rows(tasks)
    found = collect_rationales(lm, tasks, cfg)
    atomic_write_jsonl(it_dir / "rationales.jsonl", _rationale_records(found))
    rows = star_rows(found) if cfg.method == "star" else star_dpo_rows(found)
    stats = rationale_stats(found, cfg.star_samples)
    atomic_write_json(it_dir / "star.json", stats)
    if not rows:
        raise RuntimeError(
            f"{it_dir.name}: the judge's samples gave no training example ({stats['right_rationales']} right, "
            f"{stats['wrong_rationales']} wrong, {stats['undecided_fraction']:.0%} undecided); "
            f"{'DPO needs a right and a wrong rationale for one prompt; ' if cfg.method == 'star_dpo' else ''}"
            f"try more star_samples, rationalize: true, or a lower min_mass")
    return rows


def _metrics_line(result: dict[str, Any]) -> dict[str, float]:
    line = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    line |= {f"eval_{k}": v for k, v in (result.get("eval") or {}).items()}
    line |= {f"star_{k}": v for k, v in (result.get("star") or {}).items()}
    return line


def _describe(result: dict[str, Any]) -> str:
    e = result.get("eval")
    what = "zero-shot" if result["iteration"] == 0 else f"{result.get('train_examples', '?')} examples, loss {result.get('train_loss', float('nan')):.3f}"
    acc = f"held-out accuracy {e['accuracy']:.3f} ± {e['accuracy_se']:.3f} ({e['pairs']} pairs, {e['invalid']} unanswered)" if e else "no eval_data"
    return f"iteration {result['iteration']} ({what}): {acc}"


def run(cfg: TrainJudgeConfig) -> dict:
    t0 = time.time()
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg.output_dir, to_dict(cfg))
    pairs = load_split_pairs(cfg.data)
    eval_pairs = load_split_pairs(cfg.eval_data) if cfg.eval_data is not None else []
    print(f"judge: {cfg.model.name}, method {cfg.method} ({cfg.mode} mode), {cfg.iterations} iteration(s); "
          f"{len(pairs):,} training pairs, {len(eval_pairs):,} held-out pairs")
    shared = {prompt_key(p.prompt) for p in pairs} & {prompt_key(p.prompt) for p in eval_pairs}
    if shared:
        print(f"warning: eval_data shares {len(shared):,} prompt(s) with the training data, so its accuracy is not held-out "
              f"(use the other side of the split, or offset to take disjoint slices of one side)")
    tracker = Tracker(run_dir, cfg.tracker, to_dict(cfg), name=Path(cfg.output_dir).name)
    done = 0  # iterations 0 .. done-1 are complete
    while done <= cfg.iterations and _complete(run_dir, done):
        done += 1
    tracker.truncate_after(done - 1)  # metrics of an iteration that did not finish are logged again

    judges = _Judges(cfg)
    results: list[dict[str, Any]] = []
    for it in range(cfg.iterations + 1):
        it_dir = run_dir / f"iter_{it}"
        judge_dir = it_dir / "judge" if it else None
        if it < done:
            results.append(_read_json(it_dir / "result.json"))
            print(f"{_describe(results[-1])} [resumed]")
            continue
        seed_everything(cfg.seed + it)  # an iteration redone after a stop samples and trains as the first try did
        result: dict[str, Any] = {"iteration": it}
        if it > 0:
            if not (judge_dir / "judge.json").is_file():  # not trained, or stopped mid-way: redo from scratch
                shutil.rmtree(it_dir, ignore_errors=True)
                it_dir.mkdir(parents=True)
                sampler = judges.get(run_dir / f"iter_{it - 1}" / "judge" if it > 1 else None)  # the previous iteration's judge
                rows = iteration_rows(cfg, sampler, pairs, it_dir)
                del sampler
                judges.release()  # the sampler's memory goes before the trainer's model loads
                train_adapter(cfg, rows, it_dir)
            stats = _read_json(it_dir / "train.json") or {}
            result |= {k: v for k, v in stats.items() if k != "log"} | {"judge_dir": str(judge_dir)}
            if cfg.method != "sft":
                result["star"] = _read_json(it_dir / "star.json") or {}
        if eval_pairs:
            result["eval"] = judge_accuracy(genrm_judge(judges.get(judge_dir), cfg), eval_pairs)
        atomic_write_json(it_dir / "result.json", result)
        tracker.log(_metrics_line(result), it)
        results.append(result)
        print(_describe(result))
    judges.release()

    final = run_dir / "judge"
    src = run_dir / f"iter_{cfg.iterations}" / "judge"
    tmp = run_dir / ".judge.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)

    summary: dict[str, Any] = {
        "method": cfg.method, "mode": cfg.mode, "train_pairs": len(pairs), "eval_pairs": len(eval_pairs),
        "iterations": results, "zero_shot": results[0].get("eval"), "final": results[-1].get("eval"),
        "judge_dir": str(final), "wall_seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    tracker.close()
    if summary["final"]:
        z, f = summary["zero_shot"], summary["final"]
        print(f"held-out accuracy {z['accuracy']:.3f} → {f['accuracy']:.3f} ({f['accuracy'] - z['accuracy']:+.3f})")
    print(f"saved judge to {final} ({summary['wall_seconds']}s); use it as reward: {{type: genrm, path: {final}}}")
    return summary

"""`rlhf ppo`: PPO for language models with a learned critic, against any reward provider.

Each update: rollout (sample completions) → score (reward provider) → advantages (per-token
KL penalty, score at the last token, GAE) → several epochs of clipped PPO on minibatches.
The choices follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) and
Ouyang et al. 2022; each is commented where it is made. The loop runs unchanged under
`accelerate launch` (DDP over processes; each process takes its own prompts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from policies.actor_critic import ActorCritic
from policies.models import adamw, autocast, autocast_dtype
from policies.packed import PromptPass
from policies.text import Encoded, render_prompt
from rewards.base import RewardProvider
from rewards.registry import RewardConfig, build_provider
from rewards.reward_model import RewardModelProvider, RewardModelProviderConfig
from rlhf.config import DataConfig, LoraConfig, ModelConfig, SamplingConfig, doc, required, to_dict
from rlhf.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.core import (
    AdaptiveKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    per_token_rewards,
    ppo_policy_loss,
    truncate_after_eos,
    whiten,
)
from rlhf.data import PromptRecord, load_split
from rlhf.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from rlhf.plots import plot_metrics
from rlhf.runs import heap_metrics, keep_freed_memory, prepare_run_dir
from rlhf.tracking import Tracker, TrackerName


@dataclass(frozen=True)
class KLConfig:
    estimator: Literal["k1", "k2", "k3"] = doc("k1", "per-token KL estimator in the reward penalty (k3 is always logged too)")
    coef: float = doc(0.05, "initial KL coefficient β")
    adaptive: bool = doc(False, "adapt β towards `target` (Ziegler et al. 2019 controller)")
    target: float = doc(6.0, "target KL per sequence for the adaptive controller")
    horizon: int = doc(10000, "controller horizon, in samples")


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    model: ModelConfig = doc(ModelConfig(lora=LoraConfig(enabled=True)), "the policy (and, in shared_lora, the critic's base)")
    layout: Literal["shared_lora", "separate"] = doc("shared_lora", "one base with policy/critic adapters (ref = adapters off), or separate full models")
    reward: RewardConfig = required("reward provider spec, e.g. {type: bt, path: runs/rm/model}")
    share_reward_base: bool = doc(True, "shared_lora: a LoRA reward model on the same base runs as a frozen adapter on the policy's base")
    value_head_init: str | None = doc(None, "initialise the value head from this reward model's linear head")
    critic_from_reward_adapter: bool = doc(True, "when value_head_init is the shared reward adapter's model, start the critic adapter as that adapter too (V starts as the reward model)")
    prompts: DataConfig = doc(DataConfig(split="train"), "training prompts (any prompt or preference file)")
    eval_prompts: DataConfig | None = doc(DataConfig(split="test", max_items=16), "held-out prompts scored before and after training (null: skip)")
    eval_batch_size: int | None = doc(None, "rows per evaluation batch (null: batch_size); larger batches sample faster, a decoding step reads the weights once for all rows")
    eval_samples_per_prompt: int = doc(1, "completions sampled per held-out prompt; the evaluation averages them per prompt (less sampling noise in the before/after change)")
    sampling: SamplingConfig = doc(SamplingConfig(max_new_tokens=32, temperature=0.7), "rollout sampling")
    max_prompt_tokens: int = doc(128, "prompts keep their last this many tokens")
    missing_eos_penalty: float | None = doc(None, "penalty for a completion that hits max_new_tokens without EOS")
    missing_eos_mode: Literal["subtract", "replace"] = doc("subtract", "subtract the penalty from the score, or replace the score with −penalty")
    kl: KLConfig = doc(KLConfig(), "KL penalty against the reference policy")
    normalize_reward: bool = doc(False, "divide scores by a running std (mean kept), Ziegler et al. 2019")
    reward_clip: float | None = doc(None, "clip (normalized) scores to ±this")
    gamma: float = doc(1.0, "discount γ")
    lam: float = doc(0.95, "GAE λ")
    whiten_advantages: bool = doc(True, "whiten advantages over each batch")
    batch_size: int = doc(8, "prompts per rollout, per process")
    num_minibatches: int = doc(1, "minibatches per PPO epoch")
    grad_accum_steps: int = doc(1, "micro-batches per minibatch (gradient accumulation)")
    ppo_epochs: int = doc(1, "passes over each rollout batch")
    updates: int = doc(10, "PPO updates (rollout + optimisation) in the run")
    lr: float = doc(1e-4, "learning rate (adapters or full models, and the value head)")
    max_grad_norm: float = doc(1.0, "gradient-norm clip")
    clip: float = doc(0.2, "policy ratio clip ε")
    value_clip: float = doc(0.2, "value clip ε_V")
    vf_coef: float = doc(0.1, "value-loss weight")
    sequential_backward: bool = doc(True, "one process: backpropagate the policy, then the critic in `critic_chunks` row chunks, so their activation graphs never coexist in full (same gradients, less peak memory)")
    critic_chunks: int | None = doc(None, "with sequential_backward: row chunks the critic's forward and backward run in (null: 1 for shared_lora, whose graphs are small, 4 for separate full models)")
    joint_forward: bool = doc(False, "shared_lora, unquantized: run the policy and the critic as one batched pass over the shared base (each half of the rows with its adapter) wherever their graphs coexist anyway: under DDP, without sequential_backward, and on the fused first step with critic_chunks 1. Same gradients up to rounding and about 0.2 s (5%) off the benchmark's training step, but 0.2-0.4 GB more peak RSS there (the allocator's heap fragments around the twice-as-large buffers), so off by default")
    keep_prompt_pass: bool | None = doc(None, "one process, fused first step (one minibatch, no accumulation), padding-free sampler, no activation checkpointing: the policy's pass over the prompts that sampling starts from keeps its graph, and the first training forward continues it over the completions instead of running the prompts again (same log-probs and gradients up to rounding). null: on for shared_lora (0.2-0.4 s less per update on the benchmark, same peak), off for separate full models (there the kept fp32 graph added 350 MB to the peak, and the pass runs slower than the sampler's prepacked prefill, for no clear gain)")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast where the hardware has fast bf16")
    prepack_frozen: bool = doc(True, "shared_lora on CPU: keep a copy of the frozen base's matmul weights in oneDNN's blocked layout for the forward passes (12% faster matmuls, one more copy of the base: 212 MB for SmolLM2-135M in bf16)")
    seed: int = doc(0, "random seed")
    output_dir: str = doc("runs/ppo", "run directory")
    tracker: TrackerName = doc("none", "metrics.jsonl always; plus 'tensorboard' or 'wandb'")
    checkpoint_every: int = doc(0, "checkpoint every N updates (0: only at the end)")
    resume: bool = doc(False, "continue from the latest checkpoint in output_dir (CLI: --resume RUN_DIR)")
    sample_every: int = doc(5, "log a table of sample completions every N updates")

    def __post_init__(self) -> None:
        if self.batch_size % (self.num_minibatches * self.grad_accum_steps):
            raise ValueError("batch_size must be divisible by num_minibatches × grad_accum_steps")
        if self.critic_chunks is not None and self.critic_chunks < 1:
            raise ValueError(f"critic_chunks must be at least 1, got {self.critic_chunks}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.eval_samples_per_prompt < 1:
            raise ValueError(f"eval_samples_per_prompt must be at least 1, got {self.eval_samples_per_prompt}")


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of experience (OpenRLHF's `Experience`). C = completion width.

    `logprobs`, `values`, `advantages` and `returns` need π_old and V_old. `collect_rollout`
    fills them from a no-grad forward, or leaves them None for `ppo_update` to fill from its
    first training forward (see `fuse_old_forward`)."""

    enc: Encoded  # (B, P + C) prompt (left-padded) + completion (right-padded)
    mask: torch.Tensor  # (B, C) 1 on completion tokens up to and including the first EOS
    ref_logprobs: torch.Tensor  # (B, C) log π_ref(a_t|s_t), at the sampling temperature
    scores: torch.Tensor  # (B,) the provider's reward after EOS penalty / normalisation
    raw_scores: torch.Tensor  # (B,) the provider's reward as returned
    valid: torch.Tensor  # (B,) bool: the provider judged the sample
    finished: torch.Tensor  # (B,) bool: the completion ended with EOS
    texts: list[str]
    kl_coef: float  # β at rollout time
    logprobs: torch.Tensor | None = None  # (B, C) log π_old(a_t|s_t), same temperature
    values: torch.Tensor | None = None  # (B, C) V_old(s_t)
    advantages: torch.Tensor | None = None  # (B, C) Â_t (whitened)
    returns: torch.Tensor | None = None  # (B, C) R_t = Â_t + V_old(s_t) before whitening
    prompt_pass: PromptPass | None = None  # the policy's pass over the prompts, with its graph (`keep_prompt_pass`); the first training forward takes it

    def advantages_and_returns(self, rows: Any, logprobs: torch.Tensor, values: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages (not whitened) and returns of the rollout's `rows`, given their π_old
        log-probs and V_old values (len(rows), C): the per-token rewards are the score at the
        last token − β·KL at every token. Row by row, so a chunk of rows gets what the whole
        batch would give it."""
        m = self.mask[rows].to(logprobs.device).float()
        logprobs, values = logprobs.detach().float() * m, values.detach().float() * m
        kl = kl_penalty(logprobs, self.ref_logprobs[rows].to(logprobs.device), cfg.kl.estimator)
        rewards = per_token_rewards(self.scores[rows].to(logprobs.device), kl, m, self.kl_coef)
        return gae(rewards, values, m, cfg.gamma, cfg.lam)

    def set_old(self, logprobs: torch.Tensor, values: torch.Tensor, cfg: PPOConfig) -> None:
        """Given π_old's log-probs and V_old's values (B, C), compute the per-token rewards,
        GAE advantages (whitened over the batch) and returns."""
        m = self.mask.to(logprobs.device).float()
        advantages, returns = self.advantages_and_returns(slice(None), logprobs, values, cfg)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, m)
        self.logprobs, self.values = (logprobs.detach().float() * m).cpu(), (values.detach().float() * m).cpu()
        self.advantages, self.returns = advantages.cpu(), returns.cpu()


def fuse_old_forward(cfg: PPOConfig) -> bool:
    """Whether π_old / V_old can come from the update's first training forward instead of a
    separate no-grad pass. That holds when the first optimizer step sees the whole batch at
    once (one minibatch, no accumulation): its forward runs with θ = θ_old on every sample, so
    the detached outputs *are* the old log-probs and values, bit for bit, and the advantages
    (whitened over the batch) are known before the loss is formed. Later epochs reuse them."""
    return cfg.num_minibatches == 1 and cfg.grad_accum_steps == 1


def keeps_prompt_pass(cfg: PPOConfig, num_processes: int) -> bool:
    """Whether the rollout keeps the policy's prompt pass for the first training forward
    (`keep_prompt_pass`): on the fused first step of one process, where the policy does not run
    in the joint pass (which runs the prompts itself). Under DDP a training step must be one
    forward of the wrapped module, which a pass made during sampling is not."""
    keep = cfg.keep_prompt_pass if cfg.keep_prompt_pass is not None else cfg.layout == "shared_lora"
    return keep and fuse_old_forward(cfg) and num_processes == 1 and not cfg.joint_forward


def critic_chunks(cfg: PPOConfig) -> int:
    """`critic_chunks`, or its default for the layout: 1 for shared_lora (the critic's graph fits
    beside the policy's; chunks cost about 0.25 s per update on the benchmark), 4 for separate
    full models (an fp32 critic's whole graph beside the policy's took the benchmark's peak from
    7.6 to 9.1 GiB, for no clear gain in speed)."""
    if cfg.critic_chunks is not None:
        return cfg.critic_chunks
    return 1 if cfg.layout == "shared_lora" else 4


class RunningMoments:
    """Running mean and std of scalars (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), float(x.mean()), float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
        delta, total = m - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


def encode_rollout(tok: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> Encoded:
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask, completion_mask], dim=1)
    comp = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
    return Encoded(ids, attn, comp, prompt_ids.shape[1])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run(cfg: PPOConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=cfg.model.device == "cpu" or not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    set_seed(cfg.seed + accelerator.process_index)  # different samples per process, reproducible
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, to_dict(cfg))
    t0 = time.time()

    amp = autocast_dtype(cfg.autocast, accelerator.device)
    ac = ActorCritic.build(dataclasses.replace(cfg.model, device=str(accelerator.device)), cfg.layout)
    ac.temperature = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
    if cfg.value_head_init:
        ac.init_value_head_from_reward_model(cfg.value_head_init)
    tok = ac.tokenizer
    provider = _build_reward(cfg, ac, amp, verbose=accelerator.is_main_process)
    shared_rm = getattr(getattr(provider, "model", None), "adapter_name", None) is not None
    if cfg.value_head_init and cfg.critic_from_reward_adapter and shared_rm and Path(cfg.value_head_init) == Path(cfg.reward.path):
        ac.init_critic_adapter_from_reward()
    ac.store_frozen_in(amp, prepack=cfg.prepack_frozen)  # after any reward adapter is attached, so it loads in full precision
    prompts = _load_prompt_texts(cfg.prompts, tok)
    eval_prompts = _load_prompt_records(cfg.eval_prompts) if cfg.eval_prompts else []

    params = [p for _, p in ac.trainable_named_parameters()]
    optimizer = adamw(params, lr=cfg.lr, eps=1e-5)  # eps 1e-5: Huang et al. 2022, "37 details", #3
    model, optimizer = accelerator.prepare(ac, optimizer)
    kl_ctl = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    moments = RunningMoments()
    named = ac.trainable_named_parameters()
    start = 0
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
        state = load_checkpoint(ckpt, named, optimizer, rank=accelerator.process_index)
        start, kl_ctl.value = state["update"], state["kl_coef"]
        moments.mean, moments.var, moments.count = state["reward_moments"]
        if accelerator.is_main_process:
            print(f"resuming from {ckpt} at update {start}")

    tracker = None
    if accelerator.is_main_process:
        tracker = Tracker(run_dir, cfg.tracker, to_dict(cfg), name=run_dir.name)
        tracker.truncate_after(start)  # drop lines a killed run logged after its last checkpoint
    before = _eval_before(ac, provider, eval_prompts, cfg, run_dir) if eval_prompts and accelerator.is_main_process else None
    bar = tqdm(range(start, cfg.updates), desc="ppo", unit="update", disable=not accelerator.is_main_process)
    for update in bar:
        t_update = time.time()
        # ---- 1. rollout ------------------------------------------------------------------------
        b_prompts = _batch_for(prompts, update, cfg.batch_size, accelerator.process_index, accelerator.num_processes)
        rollout = collect_rollout(ac, provider, b_prompts, cfg, kl_ctl.value, moments, amp, with_old=not fuse_old_forward(cfg),
                                  keep_prompt_pass=keeps_prompt_pass(cfg, accelerator.num_processes))
        kept = rollout.prompt_pass is not None
        t_train = time.time()
        # ---- 2. PPO epochs -----------------------------------------------------------------------
        stats = ppo_update(model, optimizer, accelerator, rollout, cfg, amp)
        t_done = time.time()
        # ---- 3. KL controller, metrics -----------------------------------------------------------
        seq_kl = (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * rollout.mask).sum(-1)  # (B,)
        if cfg.kl.adaptive:
            kl_ctl.update(float(accelerator.reduce(seq_kl.mean().to(accelerator.device), "mean")), cfg.batch_size * accelerator.num_processes)
        metrics = rollout_metrics(rollout, seq_kl) | stats | {
            "kl_coef": kl_ctl.value,
            "tokens_per_s": float(rollout.mask.sum()) / (t_done - t_update),
            "seconds_per_update": t_done - t_update,
            "time/rollout_s": t_train - t_update,  # generation, scoring, reference (and, unfused, old) log-probs
            "time/train_s": t_done - t_train,  # the PPO epochs
            "rollout/prompt_pass_kept": float(kept),  # the policy's prompt pass ran in the rollout, not the training step (keep_prompt_pass)
            "response/prompt_tokens": float(rollout.enc.attention_mask[:, : rollout.enc.prompt_width].sum(-1).float().mean()),
        } | heap_metrics()
        metrics = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean")) for k, v in metrics.items()}
        if tracker is not None:
            tracker.log(metrics, update + 1)
            if cfg.sample_every and (update + 1) % cfg.sample_every == 0:
                _log_samples(run_dir, update + 1, b_prompts, rollout)
            bar.set_postfix(reward=f"{metrics['reward/raw_mean']:.3f}", kl=f"{metrics['kl/k1']:.3f}")
        done = update + 1
        if done == cfg.updates or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            state = {"kl_coef": kl_ctl.value, "reward_moments": [moments.mean, moments.var, moments.count]}
            save_checkpoint(run_dir, done, named, optimizer, state, accelerator)

    summary: dict[str, Any] = {"updates": cfg.updates, "processes": accelerator.num_processes, "wall_seconds": round(time.time() - t0, 1)}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if eval_prompts:
            after = evaluate_policy(unwrapped, provider, eval_prompts, cfg)
            summary["eval_before"], summary["eval_after"] = before["summary"], after["summary"]
            summary["eval_change"] = paired_change(before["samples"], after["samples"])
            atomic_write_jsonl(run_dir / "eval_samples_before.jsonl", before["samples"])
            atomic_write_jsonl(run_dir / "eval_samples_after.jsonl", after["samples"])
        atomic_write_json(run_dir / "summary.json", summary)
        tracker.close()
        png = plot_metrics(run_dir / "metrics.jsonl", ["reward/raw_mean", "kl/k1", "kl/k3"], title=f"PPO: {run_dir.name}")
        atomic_write_bytes(run_dir / "reward_kl.png", png)
    accelerator.wait_for_everyone()
    return summary


def collect_rollout(ac: ActorCritic, provider: RewardProvider, b_prompts: list[tuple[Any, str]], cfg: PPOConfig, kl_coef: float, moments: RunningMoments, amp: torch.dtype | None, *, with_old: bool = True, keep_prompt_pass: bool = False) -> Rollout:
    """Sample, score and take the reference log-probs; with `with_old`, also π_old's log-probs
    and V_old's values and hence the advantages (else `ppo_update` fills them). With
    `keep_prompt_pass` (and not `with_old`), where the policy allows it, the policy's pass over
    the prompts keeps its graph for `ppo_update`'s first forward (`Rollout.prompt_pass`)."""
    tok = ac.tokenizer
    texts = [t for _, t in b_prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = batch["input_ids"][:, -cfg.max_prompt_tokens :], batch["attention_mask"][:, -cfg.max_prompt_tokens :]
    ac.eval()  # dropout off in every model: rollout and update log-probs must agree (Huang et al. 2024)
    prompt = None
    with autocast(ac.device, amp):
        if keep_prompt_pass and not with_old and ac.can_keep_prompt_pass(prompt_ids.shape[1], cfg.sampling):
            out, prompt = ac.generate_keeping_prompt_pass(prompt_ids, prompt_mask, cfg.sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        else:
            out = ac.generate(prompt_ids, prompt_mask, cfg.sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out = out.cpu()
    # Keep tokens up to the first EOS; later ones are padding and never scored or trained.
    completion, mask, finished = truncate_after_eos(out[:, prompt_ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
    completion_texts = tok.batch_decode(completion, skip_special_tokens=True)
    enc = encode_rollout(tok, prompt_ids, prompt_mask, completion, mask)

    result = provider.score([p for p, _ in b_prompts], completion_texts)
    raw = result.rewards.clone()
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        # A completion cut at max_new_tokens is penalised (Huang et al. 2024, detail on EOS trick):
        # subtract a penalty, or replace the score by −penalty; the choice is explicit.
        if cfg.missing_eos_mode == "subtract":
            scores = torch.where(finished, scores, scores - cfg.missing_eos_penalty)
        else:
            scores = torch.where(finished, scores, torch.full_like(scores, -cfg.missing_eos_penalty))
    if cfg.normalize_reward:
        if result.valid.any():  # a batch the provider could not judge at all leaves the moments alone
            moments.update(scores[result.valid])
        scores = (scores - moments.mean) / moments.std + moments.mean
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = torch.where(result.valid, scores, torch.zeros_like(scores))  # an unjudged sample earns 0

    m = mask.to(ac.device).float()
    with torch.no_grad(), autocast(ac.device, amp):
        ref_logprobs = ac.reference_logprobs(enc, split=prompt is not None).float() * m
        old = ac(enc.input_ids, enc.attention_mask, enc.prompt_width) if with_old else None
    ro = Rollout(enc, mask, ref_logprobs.cpu(), scores, raw, result.valid, finished, completion_texts, kl_coef, prompt_pass=prompt)
    if old is not None:
        ro.set_old(old.logprobs, old.values, cfg)
    return ro


def ppo_update(model: Any, optimizer: torch.optim.Optimizer, accelerator: Any, ro: Rollout, cfg: PPOConfig, amp: torch.dtype | None) -> dict[str, float]:
    unwrapped = accelerator.unwrap_model(model)
    B = ro.mask.shape[0]
    mb_size = B // cfg.num_minibatches
    micro = mb_size // cfg.grad_accum_steps
    sums: dict[str, float] = {}
    n = 0
    fused = ro.logprobs is None
    # Under DDP a step must be one forward and one backward of the wrapped module; one process
    # can run the policy and the critic one after the other (see _micro_step_sequential).
    sequential = cfg.sequential_backward and accelerator.num_processes == 1
    joint = cfg.joint_forward and unwrapped.can_run_jointly(ro.enc.input_ids.shape[1])
    if fused and not fuse_old_forward(cfg):
        raise ValueError("a rollout without old log-probs needs num_minibatches == grad_accum_steps == 1")
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B).tolist()
        for mb_start in range(0, B, mb_size):
            mb_idx = perm[mb_start : mb_start + mb_size]
            for mi in range(0, mb_size, micro):
                idx = mb_idx[mi : mi + micro]
                if ro.logprobs is None:  # the fused first step sees the whole batch: in rollout order, as a kept prompt pass is
                    idx = sorted(idx)
                # Under DDP, synchronise gradients only on the minibatch's last micro-batch.
                last = mi + micro >= mb_size
                # Sequential steps keep the two graphs apart, except on a fused first step with
                # the critic in one chunk: there the joint pass keeps no more, and is faster.
                if sequential and not (joint and ro.logprobs is None and critic_chunks(cfg) == 1):
                    out_stats = _micro_step_sequential(unwrapped, ro, idx, cfg, amp, accelerator)
                else:
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        out_stats = _micro_step(model, unwrapped, ro, idx, cfg, amp, accelerator, joint)
                for k, v in out_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            grad_norm = accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) * cfg.grad_accum_steps
    return {k: v / n for k, v in sums.items()}


def _take_prompt_pass(ro: Rollout, idx: list[int]) -> PromptPass | None:
    """The rollout's kept prompt pass for rows `idx`, taken off the rollout (it serves the first
    forward only: its graph is backpropagated once, and the step after changes the parameters)."""
    prompt, ro.prompt_pass = ro.prompt_pass, None
    return None if prompt is None else prompt.rows(idx)


def _micro_step(model: Any, unwrapped: ActorCritic, ro: Rollout, idx: list[int], cfg: PPOConfig, amp: torch.dtype | None, accelerator: Any, joint: bool = False) -> dict[str, float]:
    dev = unwrapped.device
    enc = ro.enc
    ids, attn = enc.input_ids[idx].to(dev), enc.attention_mask[idx].to(dev)
    m = ro.mask[idx].to(dev).float()
    prompt = _take_prompt_pass(ro, idx)
    with autocast(dev, amp):
        out = model(ids, attn, enc.prompt_width, joint=joint, prompt=prompt)
    del prompt  # its graph lives on in the outputs'; its own tensors can go
    logp, values = out.logprobs.float(), out.values.float()
    if ro.logprobs is None:  # the fused first step: θ = θ_old and idx is the whole batch
        ro.set_old(logp[torch.argsort(torch.tensor(idx))], values[torch.argsort(torch.tensor(idx))], cfg)
    pg = ppo_policy_loss(logp, ro.logprobs[idx].to(dev), ro.advantages[idx].to(dev), m, cfg.clip)
    vf_loss, vf_clip = clipped_value_loss(values, ro.values[idx].to(dev), ro.returns[idx].to(dev), m, cfg.value_clip)
    loss = pg.loss + cfg.vf_coef * vf_loss
    accelerator.backward(loss / cfg.grad_accum_steps)
    return {
        "loss/policy": float(pg.loss.detach()), "loss/value": float(vf_loss.detach()), "policy/clip_fraction": float(pg.clip_fraction),
        "policy/approx_kl": float(pg.approx_kl), "value/clip_fraction": float(vf_clip),
        "policy/entropy": float(masked_mean(out.entropy.detach().float(), m)),
        "value/explained_variance": float(explained_variance(ro.values[idx].to(dev), ro.returns[idx].to(dev), m)),
    }


def _micro_step_sequential(ac: ActorCritic, ro: Rollout, idx: list[int], cfg: PPOConfig, amp: torch.dtype | None, accelerator: Any) -> dict[str, float]:
    """`_micro_step` with the same loss and gradients, run so that the policy's and the critic's
    activation graphs never coexist in full: peak memory is about one model's graph instead of
    two, at no extra compute.

    The policy goes first. On a fused first step (π_old and V_old come from this forward) the
    policy loss needs advantages, which need V_old for every row, so the policy's graph waits
    while the critic runs chunk by chunk: each chunk's returns need only its own rows' π_old and
    V_old (GAE is per row), so its value loss is formed and backpropagated at once. Then the
    advantages are whitened over the batch and the policy loss is backpropagated. Otherwise
    (advantages known) the policy loss is backpropagated before the critic starts."""
    dev = ac.device
    enc = ro.enc
    P = enc.prompt_width
    ids, attn = enc.input_ids[idx].to(dev), enc.attention_mask[idx].to(dev)
    m = ro.mask[idx].to(dev).float()
    n_tokens = m.sum().clamp_min(1.0)
    scale = 1.0 / cfg.grad_accum_steps
    prompt = _take_prompt_pass(ro, idx)
    with autocast(dev, amp):
        logp, entropy = ac.policy_forward(ids, attn, P, prompt)
    del prompt  # its graph lives on in logp's; its own tensors can go
    logp = logp.float()
    fused = ro.logprobs is None

    def policy_backward() -> Any:
        pg = ppo_policy_loss(logp, ro.logprobs[idx].to(dev), ro.advantages[idx].to(dev), m, cfg.clip)
        accelerator.backward(pg.loss * scale)
        return pg

    pg = None if fused else policy_backward()
    vf_loss = vf_clip = 0.0
    values_old = torch.zeros_like(logp)
    for chunk in torch.arange(len(idx)).chunk(min(critic_chunks(cfg), len(idx))):
        rows = [idx[i] for i in chunk.tolist()]
        with autocast(dev, amp):
            values = ac.critic_forward(ids[chunk], attn[chunk], P).float()
        mc = m[chunk]
        if fused:  # V_old = V on this chunk; its returns need only its rows (GAE is per row)
            old_values = values.detach() * mc
            returns = ro.advantages_and_returns(rows, logp[chunk], values, cfg)[1]
            values_old[chunk] = old_values
        else:
            old_values, returns = ro.values[rows].to(dev), ro.returns[rows].to(dev)
        loss, clip_frac = clipped_value_loss(values, old_values, returns, mc, cfg.value_clip)
        weight = mc.sum() / n_tokens  # chunk means → the masked mean over all of idx
        accelerator.backward(cfg.vf_coef * loss * weight * scale)
        vf_loss += float(loss.detach()) * float(weight)
        vf_clip += float(clip_frac) * float(weight)
    if fused:  # θ = θ_old and idx is the whole batch
        order = torch.argsort(torch.tensor(idx))
        ro.set_old(logp[order], values_old[order], cfg)
        pg = policy_backward()
    return {
        "loss/policy": float(pg.loss.detach()), "loss/value": vf_loss, "policy/clip_fraction": float(pg.clip_fraction),
        "policy/approx_kl": float(pg.approx_kl), "value/clip_fraction": vf_clip,
        "policy/entropy": float(masked_mean(entropy.detach().float(), m)),
        "value/explained_variance": float(explained_variance(ro.values[idx].to(dev), ro.returns[idx].to(dev), m)),
    }


def rollout_metrics(ro: Rollout, seq_kl: torch.Tensor) -> dict[str, float]:
    k3 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k3") * ro.mask).sum(-1)
    return {
        "reward/raw_mean": float(ro.raw_scores[ro.valid].mean()) if ro.valid.any() else float("nan"),
        "reward/score_mean": float(ro.scores.mean()),
        "reward/invalid_fraction": float((~ro.valid).float().mean()),
        "kl/k1": float(seq_kl.mean()),
        "kl/k3": float(k3.mean()),
        "response/length": float(ro.mask.sum(-1).float().mean()),
        "response/no_eos_fraction": float((~ro.finished).float().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Prompts and evaluation
# ----------------------------------------------------------------------------------------------


def _eval_before(ac: ActorCritic, provider: RewardProvider, records: list[PromptRecord], cfg: PPOConfig, run_dir: Path) -> dict[str, Any]:
    """The starting policy's evaluation, computed once and kept, so a resumed run reports the
    same 'before' as an uninterrupted one."""
    import json

    path = run_dir / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate_policy(ac, provider, records, cfg)
    atomic_write_json(path, result)
    return result


def _build_reward(cfg: PPOConfig, ac: ActorCritic, amp: torch.dtype | None, *, verbose: bool) -> RewardProvider:
    """The reward provider; a LoRA reward model trained on the policy's own base becomes a frozen
    adapter on the shared base (shared_lora), so no second copy of the base is loaded."""
    r = cfg.reward
    if cfg.share_reward_base and isinstance(r, RewardModelProviderConfig) and r.path and r.device in ("auto", ac.device.type):
        if autocast_dtype(r.autocast, ac.device) == amp:
            rm = ac.attach_reward_model(r.path)
            if rm is not None:
                if verbose:
                    print(f"reward model {r.path}: a frozen adapter on the policy's base (no second copy)")
                return RewardModelProvider(rm, batch_size=r.batch_size, autocast_mode=r.autocast, name=r.name or r.type)
    return build_provider(r)


def _load_prompt_records(cfg: DataConfig) -> list[PromptRecord]:
    return load_split(kind="prompts", **dataclasses.asdict(cfg))


def _load_prompt_texts(cfg: DataConfig, tok: Any) -> list[tuple[Any, str]]:
    return [(r.prompt, render_prompt(tok, r.prompt)) for r in _load_prompt_records(cfg)]


def _batch_for(prompts: list[tuple[Any, str]], update: int, batch_size: int, rank: int, world: int) -> list[tuple[Any, str]]:
    """The prompts of `update` for process `rank`: a deterministic walk through a fixed shuffle,
    so a resumed run sees exactly the prompts an uninterrupted one would."""
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    start = (update * world + rank) * batch_size
    return [prompts[order[(start + i) % len(order)]] for i in range(batch_size)]


@torch.no_grad()
def evaluate_policy(ac: ActorCritic, provider: RewardProvider, records: list[PromptRecord], cfg: PPOConfig) -> dict[str, Any]:
    """Sample `eval_samples_per_prompt` completions per held-out prompt with the rollout settings
    (fixed seed, so the before/after comparison sees the same noise), score them with the
    provider, and measure each one's sequence KL Σ_t k1 from the reference. The summary's means
    are over all samples; `paired_change` averages each prompt's samples first."""
    k = cfg.eval_samples_per_prompt
    items = [(i, j, r.prompt, render_prompt(ac.tokenizer, r.prompt)) for i, r in enumerate(records) for j in range(k)]
    amp = autocast_dtype(cfg.autocast, ac.device)
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)  # the same sampling noise before and after training
    rewards, kls, samples = [], [], []
    size = cfg.eval_batch_size or cfg.batch_size
    for s in range(0, len(items), size):
        batch = items[s : s + size]
        ro = collect_rollout(ac, provider, [(p, text) for _, _, p, text in batch], cfg, 0.0, RunningMoments(), amp)
        seq_kl = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * ro.mask).sum(-1)
        rewards.append(ro.raw_scores)
        kls.append(seq_kl)
        samples += [{"prompt": p, "index": i, "sample": j, "completion": t, "reward": float(r), "kl": float(kl)}
                    for (i, j, p, _), t, r, kl in zip(batch, ro.texts, ro.raw_scores, seq_kl)]
    torch.random.set_rng_state(state)
    r, kl = torch.cat(rewards), torch.cat(kls)
    summary = {"reward_mean": float(r.mean()), "kl_mean": float(kl.mean()), "prompts": len(records), "samples_per_prompt": k}
    return {"summary": summary, "samples": samples}


def paired_change(before: list[dict], after: list[dict]) -> dict[str, float]:
    """The held-out reward change, after − before, over the same prompts: the mean over prompts
    of each prompt's change in mean reward (its samples averaged), and the standard error of
    that mean (paired, so prompt-to-prompt spread cancels)."""
    if len(before) != len(after) or any(b["prompt"] != a["prompt"] or b.get("index") != a.get("index") for b, a in zip(before, after)):
        raise ValueError("before/after evaluations must cover the same prompts in the same order")
    per_prompt: dict[int, list[float]] = {}
    for n, (b, a) in enumerate(zip(before, after)):
        per_prompt.setdefault(b.get("index", n), []).append(a["reward"] - b["reward"])
    d = torch.tensor([sum(v) / len(v) for v in per_prompt.values()], dtype=torch.float64)
    se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "prompts": len(d)}


def _log_samples(run_dir: Path, update: int, b_prompts: list[tuple[Any, str]], ro: Rollout) -> None:
    import json

    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for (p, _), text, score in zip(b_prompts, ro.texts, ro.raw_scores.tolist()):
            fh.write(json.dumps({"update": update, "prompt": p, "completion": text, "reward": score}, ensure_ascii=False) + "\n")


__all__ = ["PPOConfig", "KLConfig", "run", "collect_rollout", "ppo_update", "fuse_old_forward", "Rollout", "RunningMoments"]

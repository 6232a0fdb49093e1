"""`rlhf ppo`: PPO for language models with a learned critic, against any reward provider.

Each update, top to bottom: `collect_rollout` (sample completions, score them with the reward
provider, take the reference's log-probs) → `experience` (per-token KL penalty, score at the
last token, GAE advantages) → `ppo_update` (epochs of clipped PPO on minibatches, one
`ppo_loss` for every step) → KL controller and metrics. The choices follow "The N+
Implementation Details of RLHF with PPO" (Huang et al. 2024) and Ouyang et al. 2022; each is
commented where it is made. The loop runs unchanged under `accelerate launch` (DDP over
processes; each process takes its own prompts). How the models run (engine, memory tuning) is
`ActorCritic`'s business, set by the recipe's `model.engine` and `engine:` keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from policies.actor_critic import ActorCritic
from policies.models import adamw
from policies.text import Encoded, render_prompt
from rewards.base import RewardProvider, RewardResult
from rewards.registry import RewardConfig, build_provider
from rlhf.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.config import ConfigError, DataConfig, EngineConfig, LoraConfig, ModelConfig, SamplingConfig, doc, required, to_dict
from rlhf.core import AdaptiveKLController, clipped_value_loss, gae, kl_penalty, per_token_rewards, ppo_loss, truncate_after_eos, whiten
from rlhf.data import PromptRecord, load_split
from rlhf.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from rlhf.plots import plot_metrics
from rlhf.runs import prepare_run_dir
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
    share_reward_base: bool = doc(True, "shared_lora: a LoRA reward model or trained judge on the same base runs as a frozen adapter on the policy's base, and a judge that is the base model itself runs there with the adapters off (no second copy)")
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
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast where the hardware has fast bf16")
    engine: EngineConfig = doc(EngineConfig(), "how the models run: speed and memory only, never the results (docs/performance.md)")
    seed: int = doc(0, "random seed")
    output_dir: str = doc("runs/ppo", "run directory")
    tracker: TrackerName = doc("none", "metrics.jsonl always; plus 'tensorboard' or 'wandb'")
    checkpoint_every: int = doc(0, "checkpoint every N updates (0: only at the end)")
    resume: bool = doc(False, "continue from the latest checkpoint in output_dir (CLI: --resume RUN_DIR)")
    sample_every: int = doc(5, "log a table of sample completions every N updates")
    max_invalid_fraction: float = doc(0.5, "stop the run when more than this fraction of an update's samples could not be judged by the reward provider (a judge that gave no verdict); those samples are masked out of the losses, never trained as reward 0")

    def __post_init__(self) -> None:
        if self.batch_size % (self.num_minibatches * self.grad_accum_steps):
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by num_minibatches × grad_accum_steps ({self.num_minibatches} × {self.grad_accum_steps})")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.eval_samples_per_prompt < 1:
            raise ConfigError(f"eval_samples_per_prompt must be at least 1, got {self.eval_samples_per_prompt}")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ConfigError(f"max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}")


def fuse_old_forward(cfg: PPOConfig) -> bool:
    """Whether π_old and V_old come from the update's first training forward instead of a
    separate no-grad pass. That holds when the first optimizer step sees the whole batch at
    once (one minibatch, no accumulation): its forward runs with θ = θ_old on every sample, so
    the detached outputs *are* the old log-probs and values, bit for bit, and the advantages
    (whitened over the batch) are known before the loss is formed. Later epochs reuse them."""
    return cfg.num_minibatches == 1 and cfg.grad_accum_steps == 1


# ----------------------------------------------------------------------------------------------
# The batch containers
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch as sampled and scored (the first half of OpenRLHF's `Experience`).
    B rows, P prompt columns, C completion columns."""

    enc: Encoded  # (B, P + C) prompt (left-padded) + completion (right-padded)
    mask: torch.Tensor  # (B, C) 1 on completion tokens up to and including the first EOS
    ref_logprobs: torch.Tensor  # (B, C) log π_ref(a_t|s_t), at the sampling temperature, 0 off the mask
    scores: torch.Tensor  # (B,) the provider's reward after EOS penalty / normalisation / clipping
    raw_scores: torch.Tensor  # (B,) r(x, y) as the provider returned it
    valid: torch.Tensor  # (B,) bool: the provider judged the sample
    finished: torch.Tensor  # (B,) bool: the completion ended with EOS
    texts: list[str]  # the decoded completions
    kl_coef: float  # β at rollout time

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, C) the tokens PPO trains on: the completion mask with the rows the provider could
        not judge zeroed. Such a sample has no reward, and 0 would be a made-up one: it takes no
        part in the advantages, their whitening, or the policy and value losses."""
        return self.mask * self.valid.to(self.mask.dtype)[:, None]


@dataclass
class Experience:
    """π_old, V_old and what PPO derives from them for a `Rollout` (the second half of OpenRLHF's
    `Experience`); every tensor (B, C), 0 off the completion mask."""

    logprobs: torch.Tensor  # log π_old(a_t|s_t), at the sampling temperature
    values: torch.Tensor  # V_old(s_t): the state before token t
    advantages: torch.Tensor  # Â_t, whitened over the batch (`whiten_advantages`)
    returns: torch.Tensor  # R_t = Â_t + V_old(s_t), before whitening

    def at(self, rows: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(logprobs, values, advantages, returns) of `rows`, on `device`."""
        return tuple(t[rows].to(device) for t in (self.logprobs, self.values, self.advantages, self.returns))


def advantages_and_returns(ro: Rollout, rows: Any, logprobs: torch.Tensor, values: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (not whitened) and returns of the rollout's `rows`, given their π_old
    log-probs and V_old values (len(rows), C). The per-token rewards are −β·KL(π_old ‖ π_ref) at
    every token plus the score at the last one (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).
    Row by row, so a chunk of rows gets what the whole batch would give it. Rows the provider
    could not judge get zero advantages and returns (`Rollout.loss_mask`)."""
    m = ro.loss_mask[rows].to(logprobs.device).float()
    logprobs, values = logprobs.detach().float() * m, values.detach().float() * m
    kl = kl_penalty(logprobs, ro.ref_logprobs[rows].to(logprobs.device), cfg.kl.estimator)
    rewards = per_token_rewards(ro.scores[rows].to(logprobs.device), kl, m, ro.kl_coef)
    return gae(rewards, values, m, cfg.gamma, cfg.lam)


def experience(ro: Rollout, logprobs: torch.Tensor, values: torch.Tensor, cfg: PPOConfig) -> Experience:
    """The `Experience` of the whole rollout from π_old's log-probs and V_old's values (B, C);
    advantages are whitened over the batch's judged rows (Huang et al. 2024, detail on advantage
    whitening). Log-probs and values are kept on every completion token (the KL metrics use them)."""
    m = ro.mask.to(logprobs.device).float()
    advantages, returns = advantages_and_returns(ro, slice(None), logprobs, values, cfg)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, ro.loss_mask.to(logprobs.device).float())
    return Experience((logprobs.detach().float() * m).cpu(), (values.detach().float() * m).cpu(), advantages.cpu(), returns.cpu())


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


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run(cfg: PPOConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=cfg.model.device == "cpu" or not torch.cuda.is_available())
    set_seed(cfg.seed + accelerator.process_index)  # different samples per process, reproducible
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, to_dict(cfg))
    t0 = time.time()

    ac = ActorCritic.build(dataclasses.replace(cfg.model, device=str(accelerator.device)), cfg.layout, cfg.engine, cfg.autocast)
    ac.temperature = cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0
    if cfg.value_head_init:
        ac.init_value_head_from_reward_model(cfg.value_head_init)
    # state_dir: where a provider keeps what a resumed run must see again (a judge's references)
    provider = build_provider(cfg.reward, host=ac if cfg.share_reward_base else None, state_dir=run_dir)
    shared = provider.shared_adapter()
    if shared and accelerator.is_main_process:
        print(f"reward provider '{provider.name}': a frozen adapter on the policy's base ('{shared}', no second copy)")
    if cfg.value_head_init and cfg.critic_from_reward_adapter and shared and Path(cfg.value_head_init) == Path(getattr(cfg.reward, "path", "")):
        ac.init_critic_adapter_from(shared)
    ac.prepare_frozen()  # after any reward adapter is hosted, so that it loads in full precision
    prompts = _load_prompt_texts(cfg.prompts, ac.tokenizer)
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
    # Under DDP a training step must be one forward of the wrapped module; alone, the update's
    # first forward may continue work the rollout did on the same rows (`ActorCritic.generate`).
    rollout_feeds_first_step = fuse_old_forward(cfg) and accelerator.num_processes == 1
    bar = tqdm(range(start, cfg.updates), desc="ppo", unit="update", disable=not accelerator.is_main_process)
    for update in bar:
        t_update = time.time()
        b_prompts = _batch_for(prompts, update, cfg.batch_size, accelerator.process_index, accelerator.num_processes)
        rollout = collect_rollout(ac, provider, b_prompts, cfg, kl_ctl.value, moments, for_training=rollout_feeds_first_step)
        # every process stops together: the count is summed over processes first
        invalid = accelerator.reduce(torch.tensor([float((~rollout.valid).sum()), float(len(rollout.valid))], device=accelerator.device), "sum")
        check_invalid(int(invalid[0]), int(invalid[1]), cfg, update + 1, provider.name)
        t_train = time.time()
        b_exp, stats = ppo_update(model, ac, optimizer, accelerator, rollout, cfg)
        t_done = time.time()

        seq_kl = (kl_penalty(b_exp.logprobs, rollout.ref_logprobs, "k1") * rollout.mask).sum(-1)  # (B,)
        if cfg.kl.adaptive:
            kl_ctl.update(float(accelerator.reduce(seq_kl.mean().to(accelerator.device), "mean")), cfg.batch_size * accelerator.num_processes)
        metrics = rollout_metrics(rollout, b_exp, seq_kl) | stats | ac.metrics() | {
            "kl_coef": kl_ctl.value,
            "tokens_per_s": float(rollout.mask.sum()) / (t_done - t_update),
            "seconds_per_update": t_done - t_update,
            "time/rollout_s": t_train - t_update,  # generation, scoring, reference log-probs
            "time/train_s": t_done - t_train,  # the PPO epochs (and, unfused, the old log-probs)
        }
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
        if eval_prompts:
            after = evaluate_policy(ac, provider, eval_prompts, cfg)
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


# ----------------------------------------------------------------------------------------------
# 1. Rollout: sample, score, reference log-probs
# ----------------------------------------------------------------------------------------------


def collect_rollout(ac: ActorCritic, provider: RewardProvider, b_prompts: list[tuple[Any, str]], cfg: PPOConfig, kl_coef: float, moments: RunningMoments, *, for_training: bool = False) -> Rollout:
    """Sample a completion per prompt, score it, and take the reference's log-probs.
    `for_training`: the update's first training forward will run exactly these rows before any
    parameter changes (`ActorCritic.generate`)."""
    tok = ac.tokenizer
    batch = tok([t for _, t in b_prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = batch["input_ids"][:, -cfg.max_prompt_tokens :], batch["attention_mask"][:, -cfg.max_prompt_tokens :]
    ac.eval()  # dropout off in every model: rollout and update log-probs must agree (Huang et al. 2024)
    with ac.autocast():
        out = ac.generate(prompt_ids, prompt_mask, cfg.sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, for_training=for_training).cpu()
    # Keep tokens up to the first EOS; later ones are padding and never scored or trained.
    completion, mask, finished = truncate_after_eos(out[:, prompt_ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    enc = Encoded(torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, mask], 1), torch.cat([torch.zeros_like(prompt_mask), mask], 1), prompt_ids.shape[1])

    result = provider.score([p for p, _ in b_prompts], texts)
    scores = shaped_scores(result, finished, cfg, moments)
    with torch.no_grad(), ac.autocast():
        ref_logprobs = ac.reference_logprobs(enc).float().cpu() * mask
    return Rollout(enc, mask, ref_logprobs, scores, result.rewards.clone(), result.valid, finished, texts, kl_coef)


class TooManyInvalidError(RuntimeError):
    """The reward provider could not judge too many samples of an update."""


def check_invalid(invalid: int, total: int, cfg: PPOConfig, update: int, provider_name: str) -> None:
    """Stop the run when the provider could not judge more than `max_invalid_fraction` of an
    update's samples: training on what is left would follow a few samples, and the cause (a judge
    that does not answer in the expected format, a server that is down) needs fixing."""
    if invalid / max(total, 1) > cfg.max_invalid_fraction:
        raise TooManyInvalidError(
            f"update {update}: the reward provider '{provider_name}' could not judge {invalid} of {total} samples "
            f"(more than max_invalid_fraction = {cfg.max_invalid_fraction}); check the provider (for a judge: its verdict "
            f"mass, `min_mass`, its prompt) or raise max_invalid_fraction. Checkpoints written so far are kept."
        )


def shaped_scores(result: RewardResult, finished: torch.Tensor, cfg: PPOConfig, moments: RunningMoments) -> torch.Tensor:
    """The provider's rewards (B,) as PPO uses them: missing-EOS penalty, running-std
    normalisation, clipping. An unjudged sample's score is 0 here, a placeholder: PPO masks it
    out of the losses (`Rollout.loss_mask`)."""
    scores = result.rewards.clone()
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
    return torch.where(result.valid, scores, torch.zeros_like(scores))


# ----------------------------------------------------------------------------------------------
# 2. The update: epochs of minibatch steps
# ----------------------------------------------------------------------------------------------


def ppo_update(model: Any, ac: ActorCritic, optimizer: torch.optim.Optimizer, accelerator: Any, ro: Rollout, cfg: PPOConfig) -> tuple[Experience, dict[str, float]]:
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches of
    `grad_accum_steps` micro-batches, one optimizer step per minibatch. Returns the rollout's
    `Experience` and the steps' mean statistics."""
    B = ro.mask.shape[0]
    mb_size = B // cfg.num_minibatches
    micro = mb_size // cfg.grad_accum_steps
    # π_old and V_old: from the first training forward where that sees the whole batch with
    # θ = θ_old (`fuse_old_forward`), else from a no-grad pass now.
    b_exp = None if fuse_old_forward(cfg) else old_experience(ac, ro, cfg)
    sums: dict[str, float] = {}
    n = 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B).tolist()
        for mb_start in range(0, B, mb_size):
            mb_idx = perm[mb_start : mb_start + mb_size]
            for mi in range(0, mb_size, micro):
                idx = mb_idx[mi : mi + micro]
                if b_exp is None:  # the fused first step: the whole batch, in rollout order
                    idx = sorted(idx)
                # Under DDP, gradients synchronise on the minibatch's last micro-batch only.
                sync = mi + micro >= mb_size
                b_exp, stats = train_step(model, ac, accelerator, ro, b_exp, idx, cfg, sync)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
            grad_norm = accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) * cfg.grad_accum_steps
    assert b_exp is not None  # at least one step ran (batch_size ≥ 1)
    return b_exp, {k: v / n for k, v in sums.items()}


@torch.no_grad()
def old_experience(ac: ActorCritic, ro: Rollout, cfg: PPOConfig) -> Experience:
    """The rollout's `Experience` from a no-grad forward of the policy and the critic."""
    with ac.autocast():
        out = ac(ro.enc.input_ids, ro.enc.attention_mask, ro.enc.prompt_width)
    return experience(ro, out.logprobs.float(), out.values.float(), cfg)


def train_step(model: Any, ac: ActorCritic, accelerator: Any, ro: Rollout, b_exp: Experience | None, idx: list[int], cfg: PPOConfig, sync: bool) -> tuple[Experience, dict[str, torch.Tensor]]:
    """One micro-batch: forward, `ppo_loss`, backward (scaled for gradient accumulation).
    Without `b_exp`, this is the update's first forward, over the whole batch with θ = θ_old:
    its detached outputs are π_old and V_old, and the `Experience` is made from them here.

    Under DDP the policy and the critic run as one forward of the wrapped module and the loss
    has one backward. In one process the loss L = L_π(θ_π) + c_V·L_V(θ_V), whose two terms
    touch disjoint parameters, is backpropagated in parts, so that the two activation graphs
    never coexist in full: the critic's term chunk by chunk of rows (`_critic_step`), then the
    policy's. The gradients are those of one backward of L."""
    dev = ac.device
    ids, attn, P = ro.enc.input_ids[idx].to(dev), ro.enc.attention_mask[idx].to(dev), ro.enc.prompt_width
    m = ro.loss_mask[idx].to(dev).float()  # unjudged rows take no part in either loss
    scale = 1.0 / cfg.grad_accum_steps
    hyper = dict(clip=cfg.clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef)
    if accelerator.num_processes > 1:
        with ac.autocast():
            out = model(ids, attn, P)
        logp, values = out.logprobs.float(), out.values.float()
        if b_exp is None:
            b_exp = experience(ro, logp, values, cfg)
        loss, stats = ppo_loss(logp, values, *b_exp.at(idx, dev), m, entropy=out.entropy, **hyper)
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            accelerator.backward(loss * scale)
        return b_exp, stats
    if b_exp is not None:  # advantages known: the critic first, its graph gone before the policy's is built
        values = _critic_step(ac, accelerator, ro, b_exp, idx, (ids, attn, m), None, cfg, scale)
    with ac.autocast():
        logp, entropy = ac.policy_forward(ids, attn, P)
    logp = logp.float()
    if b_exp is None:  # the critic's returns need π_old, which is this forward's
        values = _critic_step(ac, accelerator, ro, None, idx, (ids, attn, m), logp.detach(), cfg, scale)
        b_exp = experience(ro, logp, values, cfg)
    # `values` are detached: this backward reaches the policy only; the critic's is done.
    loss, stats = ppo_loss(logp, values, *b_exp.at(idx, dev), m, entropy=entropy, **hyper)
    accelerator.backward(loss * scale)
    return b_exp, stats


def _critic_step(ac: ActorCritic, accelerator: Any, ro: Rollout, b_exp: Experience | None, idx: list[int], rows_on_device: tuple[torch.Tensor, ...], old_logprobs: torch.Tensor | None, cfg: PPOConfig, scale: float) -> torch.Tensor:
    """The critic's forward and the backward of its loss term c_V·L_V for rows `idx`, in row
    chunks (`ActorCritic.critic_row_chunks`) weighted to give the masked mean over all of `idx`
    (`rows_on_device`: their input ids, attention mask and completion mask, as `train_step`
    moved them); returns the values, detached (len(idx), C). Without `b_exp` (the first
    forward, φ = φ_old), V_old is these values, and each chunk's returns come from its own rows'
    π_old (`old_logprobs`) and V_old alone: GAE runs row by row."""
    dev, P = ac.device, ro.enc.prompt_width
    ids, attn, m = rows_on_device
    n_tokens = m.sum().clamp_min(1.0)
    out = torch.zeros_like(m)
    for chunk in ac.critic_row_chunks(len(idx)):
        rows = [idx[i] for i in chunk.tolist()]
        with ac.autocast():
            values = ac.critic_forward(ids[chunk], attn[chunk], P).float()
        mc = m[chunk]
        if b_exp is None:
            old_values = values.detach() * mc
            returns = advantages_and_returns(ro, rows, old_logprobs[chunk], old_values, cfg)[1]
        else:
            old_values, returns = b_exp.values[rows].to(dev), b_exp.returns[rows].to(dev)
        loss, _ = clipped_value_loss(values, old_values, returns, mc, cfg.value_clip)
        accelerator.backward(cfg.vf_coef * loss * (mc.sum() / n_tokens) * scale)
        out[chunk] = values.detach()
    return out


# ----------------------------------------------------------------------------------------------
# 3. Metrics
# ----------------------------------------------------------------------------------------------


def rollout_metrics(ro: Rollout, b_exp: Experience, seq_kl: torch.Tensor) -> dict[str, float]:
    k3 = (kl_penalty(b_exp.logprobs, ro.ref_logprobs, "k3") * ro.mask).sum(-1)
    return {
        "reward/raw_mean": float(ro.raw_scores[ro.valid].mean()) if ro.valid.any() else float("nan"),
        "reward/score_mean": float(ro.scores.mean()),
        "reward/invalid_fraction": float((~ro.valid).float().mean()),
        "reward/invalid_count": float((~ro.valid).sum()),
        "kl/k1": float(seq_kl.mean()),
        "kl/k3": float(k3.mean()),
        "response/length": float(ro.mask.sum(-1).float().mean()),
        "response/no_eos_fraction": float((~ro.finished).float().mean()),
        "response/prompt_tokens": float(ro.enc.attention_mask[:, : ro.enc.prompt_width].sum(-1).float().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Prompts and evaluation
# ----------------------------------------------------------------------------------------------


def _eval_before(ac: ActorCritic, provider: RewardProvider, records: list[PromptRecord], cfg: PPOConfig, run_dir: Path) -> dict[str, Any]:
    """The starting policy's evaluation, computed once and kept, so a resumed run reports the
    same 'before' as an uninterrupted one."""
    path = run_dir / "eval_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate_policy(ac, provider, records, cfg)
    atomic_write_json(path, result)
    return result


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
    (fixed seed, so the before/after comparison sees the same noise, and the run's own random
    state, CPU and GPU, is left as it was), score them with the provider, and measure each one's
    sequence KL Σ_t k1 from the reference. The summary's means are over all samples;
    `paired_change` averages each prompt's samples first."""
    k = cfg.eval_samples_per_prompt
    items = [(i, j, r.prompt, render_prompt(ac.tokenizer, r.prompt)) for i, r in enumerate(records) for j in range(k)]
    rewards, kls, valids, samples = [], [], [], []
    size = cfg.eval_batch_size or cfg.batch_size
    with torch.random.fork_rng(devices=[ac.device] if ac.device.type == "cuda" else []):
        torch.manual_seed(1234)  # the same sampling noise before and after training
        for s in range(0, len(items), size):
            batch = items[s : s + size]
            ro = collect_rollout(ac, provider, [(p, text) for _, _, p, text in batch], cfg, 0.0, RunningMoments())
            with ac.autocast():
                logp, _ = ac.policy_forward(ro.enc.input_ids, ro.enc.attention_mask, ro.enc.prompt_width)
            seq_kl = (kl_penalty(logp.float().cpu() * ro.mask, ro.ref_logprobs, "k1") * ro.mask).sum(-1)
            rewards.append(ro.raw_scores)
            kls.append(seq_kl)
            valids.append(ro.valid)
            samples += [{"prompt": p, "index": i, "sample": j, "completion": t, "reward": float(r) if v else None, "kl": float(kl)}
                        for (i, j, p, _), t, r, v, kl in zip(batch, ro.texts, ro.raw_scores, ro.valid.tolist(), seq_kl)]
    r, kl, valid = torch.cat(rewards), torch.cat(kls), torch.cat(valids)
    # a sample the provider could not judge has no reward: it is counted, not averaged in as 0
    summary = {"reward_mean": float(r[valid].mean()) if valid.any() else float("nan"), "kl_mean": float(kl.mean()),
               "prompts": len(records), "samples_per_prompt": k, "invalid": int((~valid).sum())}
    return {"summary": summary, "samples": samples}


def paired_change(before: list[dict], after: list[dict]) -> dict[str, float]:
    """The held-out reward change, after − before, over the same prompts: the mean over prompts
    of each prompt's change in mean reward (its samples averaged), and the standard error of
    that mean (paired, so prompt-to-prompt spread cancels). Samples the provider could not judge
    (reward None) on either side are left out; a prompt with none left is left out."""
    if len(before) != len(after) or any(b["prompt"] != a["prompt"] or b.get("index") != a.get("index") for b, a in zip(before, after)):
        raise ValueError("before/after evaluations must cover the same prompts in the same order")
    per_prompt: dict[int, list[float]] = {}
    for n, (b, a) in enumerate(zip(before, after)):
        if b["reward"] is not None and a["reward"] is not None:
            per_prompt.setdefault(b.get("index", n), []).append(a["reward"] - b["reward"])
    if not per_prompt:
        return {"mean": float("nan"), "se": float("nan"), "prompts": 0}
    d = torch.tensor([sum(v) / len(v) for v in per_prompt.values()], dtype=torch.float64)
    se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "prompts": len(d)}


def _log_samples(run_dir: Path, update: int, b_prompts: list[tuple[Any, str]], ro: Rollout) -> None:
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for (p, _), text, score, valid in zip(b_prompts, ro.texts, ro.raw_scores.tolist(), ro.valid.tolist()):
            fh.write(json.dumps({"update": update, "prompt": p, "completion": text, "reward": score if valid else None}, ensure_ascii=False) + "\n")


__all__ = ["PPOConfig", "KLConfig", "run", "collect_rollout", "ppo_update", "train_step", "fuse_old_forward", "Rollout", "Experience", "RunningMoments", "TooManyInvalidError"]

"""`rlhf train-rm`: train a Bradley-Terry or GRM reward model on preference pairs.

Why a loop of our own rather than TRL's RewardTrainer: GRM needs the response log-probs from
the LM head computed from the *same* hidden states as the reward (one backbone pass for both),
and its DPO regularizer needs the backbone with adapters disabled as the reference. TRL's
RewardTrainer trains a sequence-classification model whose score head replaces the LM head, so
neither is reachable through it. The loop below is short and reads top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from policies.models import autocast, autocast_dtype, count_parameters
from rewards.reward_model import HeadType, RewardModel, RewardModelProvider, new_reward_model
from rlhf.config import DataConfig, LoraConfig, ModelConfig, doc, to_dict
from rlhf.core import bt_loss, grm_loss, grm_regularizer, pairwise_accuracy
from rlhf.data import PreferencePair, load_split
from rlhf.evaluation import evaluate_pairs
from rlhf.io import atomic_write_json
from rlhf.runs import prepare_run_dir, seed_everything
from rlhf.tracking import Tracker, TrackerName


@dataclass(frozen=True)
class GRMConfig:
    regularizer: Literal["sft", "dpo", "dpo_noref"] = doc("sft", "text-generation regularizer on the shared hidden states")
    alpha: float = doc(0.01, "weight of the regularizer: L = (1 − α)·L_BT + α·L_reg (GRM paper default 0.01)")
    beta: float = doc(0.1, "β inside the regularizer's log-sigmoid (GRM paper default 0.1)")


@dataclass(frozen=True)
class TrainRMConfig:
    model: ModelConfig = doc(ModelConfig(lora=LoraConfig(enabled=True)), "backbone: full fine-tuning (lora.enabled false), LoRA, or QLoRA (quantization 4bit + LoRA)")
    head: HeadType = doc("linear", "reward head: 'linear' or the GRM paper's 'mlp'")
    objective: Literal["bt", "grm"] = doc("bt", "Bradley-Terry alone, or BT plus GRM's regularizer")
    grm: GRMConfig = doc(GRMConfig(), "GRM settings (used when objective is grm)")
    center_coef: float = doc(0.0, "reward-centering coefficient η: adds η·mean((r_c + r_r)²) to the loss")
    data: DataConfig = doc(DataConfig(split="train"), "training pairs; a pair's soft label (field `label` or `prob_chosen`) replaces the hard label 1")
    eval_data: DataConfig | None = doc(DataConfig(split="test"), "pairs evaluated after training (null: skip)")
    chat_template: bool = doc(True, "render prompts with the tokenizer's chat template")
    max_prompt_tokens: int = doc(192, "prompts keep their last this many tokens")
    max_completion_tokens: int = doc(64, "completions keep their first this many tokens")
    micro_batch_size: int = doc(4, "pairs per forward pass (chosen and rejected go through together)")
    grad_accum_steps: int = doc(2, "micro-batches per optimizer step")
    epochs: int = doc(1, "passes over the training pairs")
    max_steps: int | None = doc(None, "stop after this many optimizer steps")
    lr: float = doc(2e-4, "peak learning rate of the backbone (LoRA) parameters")
    head_lr: float | None = doc(None, "learning rate of the reward head (default: lr)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_ratio: float = doc(0.05, "fraction of steps with linear warm-up; then linear decay to 0")
    max_grad_norm: float = doc(1.0, "gradient-norm clip")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast: 'auto' uses it where the hardware has fast bf16")
    center_bias: bool = doc(True, "after training, shift the head bias so training-set rewards average zero")
    center_max_pairs: int | None = doc(None, "estimate that mean on the first this many training pairs (null: all)")
    seed: int = doc(0, "random seed (head init, data order)")
    output_dir: str = doc("runs/rm", "run directory; the model goes to OUTPUT_DIR/model")
    tracker: TrackerName = doc("none", "metrics.jsonl always; plus 'tensorboard' or 'wandb' (offline without an API key)")
    log_every: int = doc(5, "log metrics every this many optimizer steps")

    @property
    def uses_reference(self) -> bool:
        return self.objective == "grm" and self.grm.regularizer == "dpo"


def load_split_pairs(cfg: DataConfig) -> list[PreferencePair]:
    return load_split(kind="pairs", **dataclasses.asdict(cfg))


def pair_losses(rm: RewardModel, batch: list[PreferencePair], cfg: TrainRMConfig) -> dict[str, torch.Tensor]:
    """One forward over chosen and rejected rows (2B, stacked) → the loss and its parts."""
    B = len(batch)
    prompts = [p.prompt for p in batch] * 2
    enc = rm.encode(prompts, [p.chosen for p in batch] + [p.rejected for p in batch])
    hidden = rm.hidden_states(enc)  # (2B, T, D)
    r = rm.rewards_from_hidden(hidden, enc)  # (2B,)
    r_c, r_r = r[:B], r[B:]
    margin = label = None
    if any(p.margin is not None for p in batch):
        margin = torch.tensor([p.margin or 0.0 for p in batch], device=r.device)
    if any(p.label is not None for p in batch):
        # Soft labels P(chosen ≻ rejected) (an AI labeller's, `rlhf label-pairs`): cross-entropy
        # against them; a pair without one keeps the hard label 1.
        label = torch.tensor([1.0 if p.label is None else p.label for p in batch], device=r.device)
    out = {"bt": bt_loss(r_c, r_r, margin, cfg.center_coef, label), "margin": (r_c - r_r).detach()}
    if cfg.objective == "grm":
        logp = rm.completion_logps_from_hidden(hidden, enc)  # (2B,)
        ref = rm.reference_completion_logps(enc) if cfg.uses_reference else None
        reg = grm_regularizer(
            cfg.grm.regularizer,
            logp[:B],
            logp[B:],
            None if ref is None else ref[:B],
            None if ref is None else ref[B:],
            beta=cfg.grm.beta,
        )
        out["reg"] = reg
        out["loss"] = grm_loss(out["bt"], reg, cfg.grm.alpha)
    else:
        out["loss"] = out["bt"]
    return out


def run(cfg: TrainRMConfig) -> dict:
    t0 = time.time()
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg.output_dir, to_dict(cfg))
    pairs = load_split_pairs(cfg.data)
    rm = new_reward_model(
        cfg.model,
        cfg.head,
        objective=cfg.objective,
        chat_template=cfg.chat_template,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_completion_tokens=cfg.max_completion_tokens,
    )
    if cfg.uses_reference:
        rm.freeze_reference()  # full fine-tuning only; LoRA disables its adapters instead
    # BT depends on r_c − r_r only, so the head's final bias has an exactly zero gradient unless
    # the centering term is on. Left trainable, Adam would turn float round-off in that zero
    # into lr-sized random steps; `center_bias` sets it after training instead.
    rm.head.bias.requires_grad_(cfg.center_coef > 0)
    device, amp = rm.device, autocast_dtype(cfg.autocast, rm.device)
    trainable, total = count_parameters(rm)
    print(f"reward model: {cfg.model.name}, {cfg.head} head, {cfg.objective}"
          f"{'/' + cfg.grm.regularizer if cfg.objective == 'grm' else ''}; "
          f"{trainable:,} of {total:,} parameters trainable; {len(pairs):,} training pairs; "
          f"autocast {amp or 'off'} on {device}")

    head_params = [p for p in rm.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in rm.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    micro_per_epoch = math.ceil(len(pairs) / cfg.micro_batch_size)
    total_steps = max(1, micro_per_epoch * cfg.epochs // cfg.grad_accum_steps)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )

    tracker = Tracker(run_dir, cfg.tracker, to_dict(cfg), name=Path(cfg.output_dir).name)
    rm.train()  # the backbone of a causal LM has no active dropout here; the MLP head's 0.1 applies
    gen = torch.Generator().manual_seed(cfg.seed)
    step, micro, window = 0, 0, _Window()
    bar = tqdm(total=total_steps, desc="train-rm", unit="step")
    lengths = [len(str(p.prompt)) + len(p.chosen) + len(p.rejected) for p in pairs]
    while step < total_steps:
        for batch_idx in length_grouped_batches(lengths, cfg.micro_batch_size, gen):
            batch = [pairs[i] for i in batch_idx]
            with autocast(device, amp):
                out = pair_losses(rm, batch, cfg)
            (out["loss"] / cfg.grad_accum_steps).backward()
            window.add(out, len(batch))
            micro += 1
            if micro % cfg.grad_accum_steps:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = window.flush() | {"grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                                            "pairs_per_s": window.pairs_seen / (time.time() - t0)}
                tracker.log(metrics, step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if step >= total_steps:
                break
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    rm.eval()

    summary: dict = {"steps": step, "train_pairs": len(pairs), "train_seconds": round(time.time() - t0, 1)}
    provider = RewardModelProvider(rm, batch_size=cfg.micro_batch_size * 2, autocast_mode=cfg.autocast, name=cfg.objective)
    if cfg.center_bias:
        summary["bias_shift"] = center_head_bias(rm, provider, pairs[: cfg.center_max_pairs])
    model_dir = rm.save(run_dir / "model")
    summary["model_dir"] = str(model_dir)
    if cfg.eval_data is not None:
        eval_pairs = load_split_pairs(cfg.eval_data)
        summary["eval"] = evaluate_pairs(provider, eval_pairs)
        m = summary["eval"]["all"]
        print(f"eval on {m['pairs']} pairs ({cfg.eval_data.path}, {cfg.eval_data.split}): "
              f"accuracy {m['accuracy']:.3f}, mean margin {m['mean_margin']:.3f}, ECE {m['ece']:.3f}")
    summary["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(run_dir / "summary.json", summary)
    tracker.close()
    print(f"saved reward model to {model_dir} ({summary['wall_seconds']}s)")
    return summary


def length_grouped_batches(lengths: list[int], batch_size: int, gen: torch.Generator, group: int = 16) -> list[list[int]]:
    """Shuffled micro-batches of similar length: shuffle, sort by length inside windows of
    `group` batches, cut into batches, shuffle the batch order. Less padding, same randomness
    across epochs as a plain shuffle at the window level (HF Trainer's `group_by_length`)."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__, reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


@torch.no_grad()
def center_head_bias(rm: RewardModel, provider: RewardModelProvider, pairs: list[PreferencePair]) -> float:
    """Shift the head's bias so that the chosen and rejected rewards of `pairs` average zero.
    BT is shift-invariant, so this changes no preference; PPO then sees rewards centred on the
    training distribution (Ouyang et al. 2022, appendix C.2 normalizes the RM the same way)."""
    if not pairs:
        raise ValueError("center_bias needs at least one training pair (check center_max_pairs)")
    prompts = [p.prompt for p in pairs]
    rewards = torch.cat([provider.score(prompts, [p.chosen for p in pairs]).rewards,
                         provider.score(prompts, [p.rejected for p in pairs]).rewards])
    shift = float(rewards.mean())
    rm.head.bias.sub_(shift)
    return shift


class _Window:
    """Running sums of the training metrics between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.margins: list[torch.Tensor] = []
        self.pairs_seen = 0

    def add(self, out: dict[str, torch.Tensor], n_pairs: int) -> None:
        for k in ("loss", "bt", "reg"):
            if k in out:
                self.sums[k] = self.sums.get(k, 0.0) + float(out[k].detach())
        self.n += 1
        self.margins.append(out["margin"].float().cpu())
        self.pairs_seen += n_pairs

    def flush(self) -> dict[str, float]:
        margins = torch.cat(self.margins)
        metrics = {("bt_loss" if k == "bt" else "reg_loss" if k == "reg" else k): v / self.n for k, v in self.sums.items()}
        metrics |= {"accuracy": float(pairwise_accuracy(margins)), "mean_margin": float(margins.mean())}
        self.sums, self.n, self.margins = {}, 0, []
        return metrics

"""TRL 1.9.2 PPO baseline: seconds per PPO update on the same work as our PPO loop.

Run with the separate TRL virtualenv (created by bench/setup_trl_baseline.sh):

    .venv-trl192/bin/python bench/trl_ppo_baseline.py --mode full --updates 5
    .venv-trl192/bin/python bench/trl_ppo_baseline.py --mode lora --updates 5 --out runs/bench/trl_lora.json
    .venv-trl192/bin/python bench/trl_ppo_baseline.py --mode lora --bf16 --attn-implementation eager \
        --ppo-epochs 4 --num-mini-batches 4

Work per update (fixed by the benchmark, not by TRL defaults): 8 prompts, 32 sampled new
tokens, by default one PPO epoch over one minibatch of 8 (--ppo-epochs / --num-mini-batches:
TRL's own default is 4 epochs of 1 minibatch). SmolLM2-135M-Instruct serves as policy,
reference, reward and value model; reward and value are
AutoModelForSequenceClassification(num_labels=1) with a randomly initialised (seeded) score head,
which is fine for throughput.

Prompts: the token ids in bench/prompts.py's file (--prompts; built with .venv's python when
missing), the same ids our side takes: HH prompts rendered with SmolLM2's chat template by our
code, last 128 tokens. They go in as `input_ids`, unshuffled: PPOTrainer's own dataloader
(shuffle=True) is replaced by one that walks them in file order, update u taking rows
8u … 8u+7, and the rows each update collated are checked against the file after the run.

Modes:
  full  four separate fp32 models; policy and value are fully trained (AdamW over both).
  lora  TRL's own `peft_config` (LoRA r=16, alpha=32, all linear layers of the policy);
        ref_model=None, so TRL computes reference log-probs with the policy's adapter
        disabled (PPOTrainer.null_ref_context). The value model is still trained in full.

Precision and attention: fp32 and transformers' default attention (sdpa) unless --bf16 /
--attn-implementation eager (the kernel our side's transformers paths use on the CPU). TRL's
PPOConfig defaults to bf16=True; it is off here unless --bf16, see the quirk below.

Timing: a TrainerCallback stamps time.perf_counter() at on_train_begin and at every on_step_end;
sec_per_update[i] is the gap between consecutive stamps (rollout + scoring + PPO step + TRL's
own logging/gc), and the first --warmup updates are dropped. Peak RSS is the process's
ru_maxrss (KiB on Linux), which includes model loading; model parameter bytes are reported
separately.

Known TRL 1.9.2 + transformers 5.x quirk handled here: PPOTrainer builds its own
`Accelerator(gradient_accumulation_steps=...)` without passing `mixed_precision`, and
transformers 5 no longer exports `bf16=True` as ACCELERATE_MIXED_PRECISION, so `bf16=True`
alone is silently ignored (everything runs in fp32). With --bf16 we set
ACCELERATE_MIXED_PRECISION=bf16 before the trainer is built; the resulting precision is reported
as "accelerate_mixed_precision" in the output.

The output JSON also records the prompts' sha256 and the package versions, Python and CPU
(bench/envinfo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import envinfo  # noqa: E402  (bench/)
import prompts as bench_prompts  # noqa: E402  (bench/)

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "pluggable-rlhf" / "models" / "smollm2-135m-instruct"
BATCH = 8
RESPONSE_LENGTH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="full", help="four full models, or LoRA policy with adapter-disabled ref")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="converted SmolLM2 safetensors directory")
    p.add_argument("--prompts", type=Path, default=bench_prompts.DEFAULT_PATH, help="bench/prompts.py's file (built with .venv if missing)")
    p.add_argument("--updates", type=int, default=5, help="measured PPO updates (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="updates run first and not measured")
    p.add_argument("--ppo-epochs", type=int, default=1, help="num_ppo_epochs (TRL's default: 4)")
    p.add_argument("--num-mini-batches", type=int, default=1, help="num_mini_batches: minibatches of 8/N rows per epoch")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, TRL's default (TRL wraps only the training forward)")
    p.add_argument("--attn-implementation", choices=("default", "sdpa", "eager"), default="default",
                   help="attention kernel of all four models (default: transformers' choice, sdpa)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=3e-6, help="TRL PPOConfig default")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.updates < 1 or args.warmup < 0:
        p.error("--updates must be >= 1 and --warmup >= 0")
    if args.ppo_epochs < 1 or args.num_mini_batches < 1 or BATCH % args.num_mini_batches:
        p.error(f"--ppo-epochs must be >= 1 and --num-mini-batches divide {BATCH}")
    return args


# ------------------------------------------------------------------------------ main


def param_bytes(*models) -> int:
    """Bytes of distinct parameter and buffer storage over the given models (tied weights once)."""
    seen, total = set(), 0
    for m in models:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.bf16:
        # See module docstring: PPOTrainer's Accelerator only learns about bf16 from the env.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # use_cpu=True also for Accelerator()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    n_updates = args.warmup + args.updates
    n_prompts = BATCH * n_updates
    rows, header = bench_prompts.read(bench_prompts.ensure(args.prompts, n_prompts), n_prompts)
    prompt_ids = [r["input_ids"] for r in rows]

    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tok.pad_token is None:  # as TRL's example; SmolLM2 has <|endoftext|> (id 0), distinct from EOS
        tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id != tok.eos_token_id, "TRL masks pad ids as padding: pad must differ from EOS"
    assert (tok.pad_token_id, tok.eos_token_id) == (header["pad_token_id"], header["eos_token_id"]), "pad/EOS ids differ from our tokenizer's"
    # The ids go in as they are; for the record, whether this tokenizer reads the rendered texts the same way.
    tokenizer_agrees = all(tok(r["text"], add_special_tokens=False)["input_ids"][-header["max_prompt_tokens"]:] == r["input_ids"] for r in rows)
    train_dataset = Dataset.from_dict({"input_ids": prompt_ids})

    attn = {} if args.attn_implementation == "default" else {"attn_implementation": args.attn_implementation}

    def load(cls, **kw):
        transformers.set_seed(args.seed)  # the score heads of reward/value are random: same init each run
        return cls.from_pretrained(args.model_dir, dtype=torch.float32, **attn, **kw)

    policy = load(AutoModelForCausalLM)
    ref_policy = load(AutoModelForCausalLM) if args.mode == "full" else None
    reward_model = load(AutoModelForSequenceClassification, num_labels=1)
    value_model = load(AutoModelForSequenceClassification, num_labels=1)
    peft_config = None
    if args.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    out_dir = tempfile.mkdtemp(prefix="trl_ppo_baseline_")
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches,  # local_batch_size stays 8 (per_device × accumulation); minibatches of 8/N
        num_ppo_epochs=args.ppo_epochs,
        response_length=RESPONSE_LENGTH,
        total_episodes=BATCH * n_updates,
        local_rollout_forward_batch_size=BATCH,  # one rollout chunk (default 64 is also >= 8)
        learning_rate=args.learning_rate,
        stop_token="eos",
        missing_eos_penalty=1.0,  # as TRL's example scripts
        num_sample_generations=0,  # no generate_completions() debug samples
        use_cpu=True,
        bf16=args.bf16,
        # PPOConfig defaults gradient_checkpointing=True, but PPOTrainer never applies it (it does
        # not run Trainer.__init__); set False so the config says what actually runs.
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
    )

    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    # PPOTrainer's dataloader shuffles (seeded); walk the shared prompt file in order instead,
    # recording what each batch collated, so both sides see the same 8 prompts per update.
    from torch.utils.data import DataLoader

    collated: list[list[list[int]]] = []
    collator = trainer.data_collator

    def collate(features):
        collated.append([list(f["input_ids"]) for f in features])
        return collator(features)

    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(train_dataset, batch_size=trainer.local_dataloader_batch_size, shuffle=False, collate_fn=collate, drop_last=True))
    torch.manual_seed(trainer.local_seed)  # as PPOTrainer leaves it after preparing its own dataloader
    if trainer.local_dataloader_batch_size != BATCH:
        raise RuntimeError(f"TRL's rollout batch is {trainer.local_dataloader_batch_size}, not {BATCH}")
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    model_bytes = param_bytes(unwrapped.policy, trainer.ref_model, trainer.reward_model, unwrapped.value_model)
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    ref_kind = "separate model" if trainer.ref_model is not None else "policy with adapter disabled"
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    if [ids for batch in collated[:n_updates] for ids in batch] != prompt_ids:
        raise RuntimeError("TRL's updates did not take the shared prompt file's rows in order")
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    if len(durations) != n_updates:
        raise RuntimeError(f"expected {n_updates} on_step_end calls, got {len(durations)}")
    measured = durations[args.warmup :]
    opt_state_bytes = sum(
        t.numel() * t.element_size()
        for st in trainer.optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    result = {
        "impl": f"trl-{trl.__version__}",
        "mode": args.mode,
        "updates_per_s": len(measured) / sum(measured),
        "sec_per_update": [round(d, 3) for d in measured],
        "warmup_sec": [round(d, 3) for d in durations[: args.warmup]],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_param_mib": round(model_bytes / 2**20, 1),
        "optimizer_state_mib": round(opt_state_bytes / 2**20, 1),
        "trainable_params": trainable,
        "torch_threads": torch.get_num_threads(),
        "batch": BATCH,
        "response_length": RESPONSE_LENGTH,
        "num_ppo_epochs": args.ppo_epochs,
        "num_mini_batches": args.num_mini_batches,
        "prompts": {**bench_prompts.summary(rows, header), "ids_checked": True, "trl_tokenizer_agrees": tokenizer_agrees},
        "mean_prompt_tokens": round(sum(len(x) for x in prompt_ids) / len(prompt_ids), 2),
        "ref": ref_kind,
        "accelerate_mixed_precision": str(trainer.accelerator.mixed_precision),
        "attn_implementation": unwrapped.policy.config._attn_implementation,
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
        "environment": envinfo.environment(),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

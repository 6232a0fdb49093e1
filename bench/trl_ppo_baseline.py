"""TRL 1.9.2 PPO baseline: seconds per PPO update on the same work as our PPO loop.

Run with the separate TRL virtualenv (created by bench/setup_trl_baseline.sh):

    .venv-trl192/bin/python bench/trl_ppo_baseline.py --mode full --updates 5
    .venv-trl192/bin/python bench/trl_ppo_baseline.py --mode lora --updates 5 --out runs/bench/trl_lora.json

Work per update (fixed by the benchmark, not by TRL defaults): 8 HH prompts, 32 sampled new
tokens, one PPO epoch over one minibatch of 8. SmolLM2-135M-Instruct serves as policy, reference,
reward and value model; reward and value are AutoModelForSequenceClassification(num_labels=1)
with a randomly initialised (seeded) score head, which is fine for throughput.

Modes:
  full  four separate fp32 models; policy and value are fully trained (AdamW over both).
  lora  TRL's own `peft_config` (LoRA r=16, alpha=32, all linear layers of the policy);
        ref_model=None, so TRL computes reference log-probs with the policy's adapter
        disabled (PPOTrainer.null_ref_context). The value model is still trained in full.

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
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "pluggable-rlhf" / "models" / "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
BATCH = 8
RESPONSE_LENGTH = 32
ASSISTANT = "\n\nAssistant:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="full", help="four full models, or LoRA policy with adapter-disabled ref")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="converted SmolLM2 safetensors directory")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH preference file (.jsonl or .jsonl.gz)")
    p.add_argument("--updates", type=int, default=5, help="measured PPO updates (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="updates run first and not measured")
    p.add_argument("--num-prompts", type=int, default=None, help="first N HH prompts (default: 8 x (warmup + updates), each used once)")
    p.add_argument("--prompt-format", choices=("user", "messages"), default="user",
                   help="user: the HH transcript up to and including the last '\\n\\nAssistant:' as one user message; "
                        "messages: the transcript split into user/assistant turns (as rlhf.data does)")
    p.add_argument("--max-prompt-tokens", type=int, default=128,
                   help="keep the last this many prompt tokens (our PPOConfig.max_prompt_tokens default); 0 = no cut")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TRL wraps only the training forward)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=3e-6, help="TRL PPOConfig default")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.updates < 1 or args.warmup < 0:
        p.error("--updates must be >= 1 and --warmup >= 0")
    return args


# ------------------------------------------------------------------------------ prompts


def hh_prompt_text(row: dict) -> str:
    """Longest common prefix of chosen/rejected, cut after its last '\\n\\nAssistant:'.

    Cutting each side at its own last marker would be wrong where a response itself contains
    the marker (see rlhf.data._split_hh)."""
    chosen, rejected = row["chosen"], row["rejected"]
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' in the shared prefix")
    return common[: cut + len(ASSISTANT)]


def hh_messages(transcript: str) -> list[dict]:
    """'\\n\\nHuman: ..\\n\\nAssistant: ..' (ending with the bare Assistant marker) -> chat turns,
    same-speaker runs merged, as rlhf.data._hh_messages does."""
    import re

    body = transcript[: -len(ASSISTANT)] if transcript.endswith(ASSISTANT) else transcript
    parts = re.split(r"\n\n(Human|Assistant):", body)
    messages: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def load_prompt_ids(path: Path, n: int, tok, prompt_format: str, max_prompt_tokens: int) -> list[list[int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path}: only {len(rows)} rows, need {n}")
    out = []
    for row in rows:
        text = hh_prompt_text(row)
        messages = [{"role": "user", "content": text}] if prompt_format == "user" else hh_messages(text)
        # As TRL's ppo_tldr example: chat template, generation prompt, no padding (the
        # collator left-pads each batch).
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens > 0:
            ids = ids[-max_prompt_tokens:]
        out.append(ids)
    return out


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
    n_prompts = args.num_prompts or BATCH * n_updates

    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tok.pad_token is None:  # as TRL's example; SmolLM2 has <|endoftext|> (id 0), distinct from EOS
        tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id != tok.eos_token_id, "TRL masks pad ids as padding: pad must differ from EOS"
    prompt_ids = load_prompt_ids(args.data, n_prompts, tok, args.prompt_format, args.max_prompt_tokens)
    train_dataset = Dataset.from_dict({"input_ids": prompt_ids})

    def load(cls, **kw):
        transformers.set_seed(args.seed)  # the score heads of reward/value are random: same init each run
        return cls.from_pretrained(args.model_dir, dtype=torch.float32, **kw)

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
        num_mini_batches=1,
        num_ppo_epochs=1,
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
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    model_bytes = param_bytes(unwrapped.policy, trainer.ref_model, trainer.reward_model, unwrapped.value_model)
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    ref_kind = "separate model" if trainer.ref_model is not None else "policy with adapter disabled"
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

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
        "num_ppo_epochs": 1,
        "num_mini_batches": 1,
        "prompt_tokens_max": max(len(x) for x in prompt_ids),
        "prompt_tokens_mean": round(sum(len(x) for x in prompt_ids) / len(prompt_ids), 1),
        "prompt_format": args.prompt_format,
        "ref": ref_kind,
        "accelerate_mixed_precision": str(trainer.accelerator.mixed_precision),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

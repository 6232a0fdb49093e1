"""Load a causal LM from a `ModelConfig`: dtype, optional bitsandbytes 4-bit/8-bit, optional LoRA.

The same function serves every role (policy, reference, critic backbone, reward backbone):
roles differ in which adapters they carry, not in how the base is loaded (DESIGN.md,
"Single-GPU layout").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policies.hub import resolve_model_path
from policies.tokenizers import load_tokenizer
from rlhf.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any
    path: Path  # the local directory the base weights came from
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """'auto' → eager on the CPU, sdpa elsewhere: at RLHF lengths torch's CPU flash-attention
    kernel is slower than eager attention (docs/performance.md)."""
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" else "sdpa"


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any | None:
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        # NF4 + double quantization: the QLoRA recipe (Dettmers et al. 2023, section 3).
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg: ModelConfig, *, tokenizer: Any | None = None) -> LoadedModel:
    """Load tokenizer and model as `cfg` says. The model comes back in eval mode: dropout off,
    which RLHF needs so that log-probs recomputed during the update match the rollout's."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    quant = quantization_config(cfg.quantization, dtype)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, device),
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device) if device.type != "cuda" else (device.index or 0)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        if "safetensors" in str(err).lower() or not any(Path(path).glob("*.safetensors")):
            raise OSError(
                f"{path}: no safetensors weights found; pluggable-rlhf loads weights from safetensors "
                f"only (pickle checkpoints can run code). Convert with `model.save_pretrained(dir)`."
            ) from err
        raise
    if quant is None:
        model.to(device)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=quant is not None)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, path=Path(path), device=device)


def apply_lora(model: Any, cfg: LoraConfig, *, quantized: bool = False, adapter_name: str = "default") -> Any:
    """Wrap `model` in a trainable peft LoRA adapter: new, or loaded from `cfg.path`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Freezes the quantized base and upcasts the few non-quantized params (norms) to fp32
        # for stable training; checkpointing stays a separate, explicit choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.path is not None:
        adapter_dir = Path(cfg.path)
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{adapter_dir}: no adapter_model.safetensors (adapters load from safetensors only)"
            )
        return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=True)
    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    layers = None
    if cfg.last_layers is not None:
        n_layers = model.config.get_text_config().num_hidden_layers
        layers = list(range(max(0, n_layers - cfg.last_layers), n_layers))
        if targets == "all-linear":  # peft needs explicit names to restrict layers
            targets = _linear_leaf_names(model)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg, adapter_name=adapter_name)


def enable_activation_checkpointing(model: Any) -> int:
    """Recompute each decoder layer's activations during the backward pass instead of keeping
    them (torch.utils.checkpoint, non-reentrant): activation memory drops from every
    intermediate of every layer to each layer's input, for about one extra forward of compute.

    Unlike transformers' `gradient_checkpointing_enable`, this does not need train mode (RLHF
    keeps dropout off), and it is safe with several LoRA adapters on one base: the recompute
    runs with the adapter that was active in the forward, whichever one is active when the
    backward runs (ActorCritic switches between policy and critic adapters). It applies only
    while autograd records. Returns the number of layers wrapped."""
    import types

    from transformers.modeling_layers import GradientCheckpointingLayer

    def checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = type(self).forward
        if not torch.is_grad_enabled():
            return forward(self, *args, **kwargs)
        return run_checkpointed(self, lambda *a, **k: forward(self, *a, **k), *args, **kwargs)

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        # A bound method (not a closure), so that copy.deepcopy of the model rebinds it to the copy.
        layer.forward = types.MethodType(checkpointed_forward, layer)
        layer._rlhf_checkpointed = True  # the packed forward (policies.packed) checkpoints it too
    return len(layers)


def run_checkpointed(layer: torch.nn.Module, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) under non-reentrant activation checkpointing, recomputed in the backward
    with the LoRA adapters that were active in the forward (see enable_activation_checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    def adapter_state() -> list[tuple[Any, Any, Any]]:
        return [(m, m._active_adapter, m._disable_adapters) for m in layer.modules() if hasattr(m, "_disable_adapters")]

    def restore(state: list[tuple[Any, Any, Any]]) -> None:
        for m, active, disabled in state:
            m._active_adapter, m._disable_adapters = active, disabled

    at_forward = adapter_state()

    def run(*a: Any, **k: Any) -> Any:
        now = adapter_state()
        restore(at_forward)
        try:
            return fn(*a, **k)
        finally:
            restore(now)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def unwrap_causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself). peft's LoRA layers
    live inside it, so calling its parts still applies the active adapter."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_leaf_names(model: Any) -> list[str]:
    """Leaf names of the Linear layers inside the model's transformer blocks (what peft's
    'all-linear' selects): every nn.Linear (bitsandbytes layers subclass it) but the LM head."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})


def store_frozen_linears_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen weights of the model's matmuls (its Linear layers, LoRA adapters
    excepted) to `dtype`, once. Under autocast to that same dtype every forward casts them
    anyway, so the numbers are unchanged; what goes is the per-call cast (on every decoding
    step of generation) and half the memory of the base. Returns the elements cast.

    A frozen LM head tied to the input embeddings gets its own copy in `dtype` (the embeddings
    stay in full precision: they feed the residual stream, which autocast leaves in fp32).
    Autocast caches no cast of a frozen weight, so a tied fp32 head was cast on every call
    (docs/performance.md)."""
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    cast = 0
    if tied and not out_emb.weight.requires_grad and out_emb.weight.dtype == torch.float32:
        out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().to(dtype), requires_grad=False)
        cast += out_emb.weight.numel()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter is a floating tensor on the CPU or a
    GPU: the same update, one kernel instead of a loop of small ones (docs/performance.md)."""
    groups = list(params)
    flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(flat) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in flat)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 autocast
    runs several times faster than fp32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` ('auto', 'bfloat16', 'none') on `device`, or None for off."""
    if mode == "none":
        return None
    if mode == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `device`, or a no-op context when dtype is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

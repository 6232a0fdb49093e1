"""Which engine runs a model (`model.engine`): the one place that names them all."""

from __future__ import annotations

import sys
from typing import Any

import torch

from policies.engine import Engine, HFEngine
from policies.packed import PackedEngine, can_pack, configure_cpu_process
from rlhf.config import EngineConfig


def build_engine(name: str, model: Any, device: torch.device, settings: EngineConfig | None = None) -> Engine:
    """The engine `name` ('auto', 'hf', 'packed') for `model` on `device`. 'auto' is `packed` for
    Llama-family models (`can_pack`) on the CPU and `hf` elsewhere, CUDA included, until a GPU
    benchmark shows the packed path pays there. A packed engine on the CPU of a Linux process
    also sets that process's allocator and oneDNN cache (`configure_cpu_process`)."""
    device = torch.device(device)
    if name == "auto":
        name = "packed" if device.type == "cpu" and can_pack(model) else "hf"
    if name == "hf":
        return HFEngine()
    if name != "packed":
        raise ValueError(f"unknown engine {name!r}; expected 'auto', 'hf' or 'packed'")
    if not can_pack(model):
        arch = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(f"model.engine 'packed' runs Llama-family models with eager or sdpa attention; this model is {arch!r} (use 'hf' or 'auto')")
    settings = settings or EngineConfig()
    if device.type == "cpu" and sys.platform.startswith("linux"):
        configure_cpu_process()
    return PackedEngine(device, merge_weights=settings.merge_weights, prepack_frozen=settings.prepack_frozen)

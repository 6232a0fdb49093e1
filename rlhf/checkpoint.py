"""Training checkpoints that let an interrupted run resume without losing or repeating steps.

A checkpoint directory `checkpoints/update-000012/` holds:
    trainable.safetensors   every trained tensor (adapters, value head, or full models), by name
    optimizer.pt            optimizer state (tensors and numbers only; loaded with weights_only=True)
    state.json              update index, KL coefficient, running reward moments
    rng-RANK.pt             each process's python, numpy and torch RNG states (weights_only=True)
It is written to a temporary directory and renamed into place, so a killed run leaves either a
whole checkpoint or none; `latest` names the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.io import atomic_write_text


def save_checkpoint(run_dir: Path, update: int, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, state: dict[str, Any], accelerator: Any = None) -> Path:
    """Write checkpoint `update`. With several processes, every process calls this: each saves
    its own RNG state (`rng-RANK.pt`), the main process the rest, then renames it into place."""
    from safetensors.torch import save_file

    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    root = Path(run_dir) / "checkpoints"
    final = root / f"update-{update:06d}"
    tmp = root / f".tmp-update-{update:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    if is_main:
        save_file({n: p.detach().cpu().contiguous() for n, p in named_params}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"update": update, **state}, indent=2))
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore tensors, optimizer and RNG in place; return the saved state dict."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    names = {n for n, _ in named_params}
    if names != set(tensors):
        missing, extra = sorted(names - set(tensors))[:3], sorted(set(tensors) - names)[:3]
        raise ValueError(f"{path}: checkpoint does not match this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(tensors[n].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = path / f"rng-{rank}.pt"
    if not rng.is_file():
        raise ValueError(f"{path}: no RNG state for process {rank}; resume with the number of processes that saved it")
    _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "state.json").read_text())


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

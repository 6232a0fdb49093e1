"""Run directories and seeding, shared by every command that writes results."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.io import atomic_write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(path: str | Path, config: dict[str, Any]) -> Path:
    """Create the run directory and record the fully resolved config in it."""
    run_dir = Path(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config)
    return run_dir

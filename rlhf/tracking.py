"""Metric tracking: always a local `metrics.jsonl`; optionally TensorBoard or wandb.

wandb runs offline when no API key is configured, so a run never needs the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from rlhf.io import atomic_write_text

TrackerName = Literal["none", "tensorboard", "wandb"]


class Tracker:
    def __init__(self, run_dir: str | Path, backend: TrackerName = "none", config: dict[str, Any] | None = None, name: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append mode: a resumed run continues the same file. Each line is flushed, so an
        # interrupted run keeps every step it logged.
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        elif backend == "wandb":
            import wandb

            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                os.environ["WANDB_MODE"] = "offline"
            self._wandb = wandb.init(dir=str(self.run_dir), config=config or {}, name=name, reinit="finish_previous")

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl lines with a step above `step` (a resumed run logs them again)."""
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
        self._jsonl = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

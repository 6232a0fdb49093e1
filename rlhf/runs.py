"""Run directories and seeding, shared by every command that writes results."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks (up to its 32 MiB mmap ceiling) in the heap
    instead of returning them to the OS. A training step frees and re-allocates the same
    activation buffers every step; with the default thresholds each one comes back as fresh
    pages that fault in and get zeroed again. On this project's 2-core CPU this made a SmolLM2
    LoRA PPO training step about 10% faster (2.29 → 2.03 s). No-op where libc isn't glibc."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.lru_cache(maxsize=1)
def _mallinfo2() -> Any:
    try:
        fn = _libc().mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def heap_metrics() -> dict[str, float]:
    """The process's heap as glibc's allocator sees it, in MiB: `memory/heap_in_use_mib`, the
    bytes in live allocations (large mmapped blocks included), and `memory/heap_free_mib`, the
    freed bytes it keeps (`keep_freed_memory`). A live heap that grows from update to update is
    a leak or an unbounded cache; the free part is what fragmentation costs on top. Empty where
    libc isn't glibc 2.33 or newer."""
    fn = _mallinfo2()
    if fn is None:
        return {}
    info = fn()
    return {"memory/heap_in_use_mib": (info.uordblks + info.hblkhd) / 2**20, "memory/heap_free_mib": info.fordblks / 2**20}


def prepare_run_dir(path: str | Path, config: dict[str, Any]) -> Path:
    """Create the run directory and record the fully resolved config in it."""
    run_dir = Path(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config)
    return run_dir

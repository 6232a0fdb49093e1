"""What a benchmark result was measured with: package versions, Python, and the CPU. Both sides
of bench/compare.py (our .venv and TRL's .venv-trl192) record this in their JSON, and compare.py
prints it under its table, so a result can never be read without the versions it came from.

Plain standard library: it imports none of the packages it reports (their installed metadata is
read), so it runs in either environment.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "tokenizers", "safetensors", "numpy")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, object]:
    """The first processor's identity from /proc/cpuinfo (model name, family, model, stepping),
    whether it has native bf16 (avx512_bf16 / amx_bf16 flags), and the usable cores."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name") or platform.processor() or None,
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "stepping": fields.get("stepping"),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def environment() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": package_versions(),
        "cpu": cpu_info(),
    }


def describe_cpu(cpu: dict) -> str:
    return (f"{cpu.get('model_name')} (family {cpu.get('family')}, model {cpu.get('model')}, stepping {cpu.get('stepping')}; "
            f"{cpu.get('usable_cores')} usable cores; bf16 flags: {', '.join(cpu.get('bf16_flags') or []) or 'none'})")


if __name__ == "__main__":
    import json

    print(json.dumps(environment(), indent=2))

#!/usr/bin/env bash
# Creates .venv-trl192/ in the repo root: a separate virtualenv holding TRL 1.9.2, for the
# TRL PPO baseline (bench/trl_ppo_baseline.py). Kept apart from .venv, which has a newer TRL.
#
# Every package is held to the version `make setup` installs in .venv: pip runs with the repo's
# constraints.txt (generated from .venv's `pip freeze`), with only its trl line swapped for
# trl==1.9.2 (TRL 1.9.2 accepts those versions: transformers>=4.56.2, accelerate>=1.4,
# datasets>=4.7). So both sides of the benchmark run the same torch/transformers/peft/accelerate
# code. torch goes first, from the local CPU wheel.
#
# Idempotent: a stamp file records the constraints used; when it matches, nothing is done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-trl192}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"
STAMP="$VENV/.installed"
TRL_VERSION="1.9.2"
# What TRL's PPO needs (bitsandbytes is left out: nothing on the CPU path uses it).
PACKAGES="torch trl==$TRL_VERSION transformers accelerate datasets peft safetensors"

grep -q '^trl==' "$ROOT/constraints.txt" || { echo "setup_trl_baseline: no trl pin in $ROOT/constraints.txt" >&2; exit 1; }
PINS="$(sed "s/^trl==.*/trl==$TRL_VERSION/" "$ROOT/constraints.txt")
# packages: $PACKAGES"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" ]]; then
    echo "setup_trl_baseline: $VENV is complete; nothing to do."
    exit 0
fi

test -x "$PY" || "$PYTHON" -m venv "$VENV"
CONSTRAINTS="$VENV/constraints.txt"
printf '%s\n' "$PINS" > "$CONSTRAINTS"

"$PY" -m pip install -q -c "$CONSTRAINTS" --upgrade pip
"$PY" -m pip install -q -c "$CONSTRAINTS" torch
# shellcheck disable=SC2086  # word splitting of the package list is intended
"$PY" -m pip install -q -c "$CONSTRAINTS" $PACKAGES
"$PY" -m pip check

# Every package both environments hold must be at the same version, trl aside.
"$PY" - "$ROOT/.venv/bin/python" <<'PY'
import json, subprocess, sys

def freeze(python):
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}

mine = freeze(sys.executable)
try:
    theirs = freeze(sys.argv[1])
except (OSError, subprocess.CalledProcessError):
    theirs = {}
    print("setup_trl_baseline: no .venv to compare with (run `make setup`); versions come from constraints.txt alone")
differ = {n: (v, theirs[n]) for n, v in mine.items() if n in theirs and theirs[n] != v and n not in ("trl", "pluggable-rlhf")}
print(" | ".join(f"{n} {mine[n]}" for n in ("torch", "transformers", "trl", "accelerate", "datasets", "peft", "tokenizers", "safetensors", "numpy")))
assert mine["trl"] == "1.9.2", mine["trl"]
assert not differ, f"versions differ from .venv (.venv-trl192, .venv): {differ}"
PY
printf '%s' "$PINS" > "$STAMP"
echo "setup_trl_baseline: $VENV ready."

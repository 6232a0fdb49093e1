#!/usr/bin/env bash
# Creates .venv-trl192/ in the repo root: a separate virtualenv holding TRL 1.9.2, for the
# TRL PPO baseline (bench/trl_ppo_baseline.py). Kept apart from .venv, which has a newer TRL.
#
# Every other package is pinned to the version in .venv (checked with `.venv/bin/pip freeze`),
# so the two sides of the benchmark run the same torch/transformers code. torch goes first and
# is held by a constraints file: pip then takes the local CPU wheel and can never resolve a
# different (multi-GB) torch while installing TRL's dependencies.
#
# Idempotent: a stamp file records the pins; when it matches, nothing is done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-trl192}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"
STAMP="$VENV/.installed"

PINS="torch==2.13.0
trl==1.9.2
transformers==5.23.0
accelerate==1.15.0
datasets==5.2.0
peft==0.21.2
huggingface_hub==2.4.0
tokenizers==0.23.3
safetensors==0.8.0
numpy==2.4.6"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" ]]; then
    echo "setup_trl_baseline: $VENV is complete; nothing to do."
    exit 0
fi

test -x "$PY" || "$PYTHON" -m venv "$VENV"
CONSTRAINTS="$VENV/constraints.txt"
printf '%s\n' "$PINS" > "$CONSTRAINTS"

"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
# Only the packages TRL's PPO needs; -c keeps torch (and the rest) at the pinned versions.
"$PY" -m pip install -q -c "$CONSTRAINTS" \
    trl==1.9.2 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2
"$PY" -m pip check || true

"$PY" - <<'PY'
import torch, transformers, trl, accelerate, datasets, peft
print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__,
      "| accelerate", accelerate.__version__, "| datasets", datasets.__version__, "| peft", peft.__version__)
assert trl.__version__ == "1.9.2", trl.__version__
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
PY
printf '%s' "$PINS" > "$STAMP"
echo "setup_trl_baseline: $VENV ready."

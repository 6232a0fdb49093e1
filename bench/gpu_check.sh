#!/usr/bin/env bash
# GPU check (issue 18, item 7): on one H100 machine with no package registry, in at most 8 minutes:
#   1. setup    install the carried wheels (no index), print nvidia-smi, versions, a 4-bit
#               bitsandbytes round trip on the GPU
#   2. models   random Llama-shaped models built from a config (no hub there, and the embedded
#               SmolLM2 GGUF doesn't travel), saved as safetensors with SmolLM2's tokenizer:
#               SmolLM2-135M's shape for the quickstart, TinyLlama-1.1B's for the QLoRA update
#               (the tests build their own tiny ones from tests/assets/smollm2-tokenizer)
#   3. qlora_hf, qlora_packed
#               one 4-bit QLoRA PPO update of the ~1.1B model (plus a second, steady one) with
#               model.engine=hf, then packed (bench/gpu_ppo_update.py: seconds per update from
#               metrics.jsonl, peak GPU memory from torch.cuda.max_memory_allocated)
#   4. quickstart `rlhf pipeline recipes/quickstart.yaml` at the smoke size of
#               tests/test_recipes_real_model.py, on the 135M-shaped model
#   5. pytest   the non-slow tests (tests/conftest.py's `device` fixture picks CUDA when there
#               is one), with the time left
# Each stage has a time limit inside one overall budget and the next stage runs whatever
# happened; the tests run last so they can't starve the measurements. At the end every stage's
# result is printed and written to $OUT (8 files: summary.md, summary.json, env.log,
# qlora_hf.log, qlora_packed.log, quickstart.log, pytest.log, artifacts.tar.gz); the exit status
# is non-zero if any stage failed.
#
# Before (here, with PyPI):  bash bench/gpu_wheels.sh          # fills the git-ignored .whl/
# On the device:             bash bench/gpu_check.sh           # carry [".whl"], timeout_s 560
# Dry run here (CPU, tiny models, a few test files):  bash bench/gpu_check.sh --cpu-dry-run
#   (needs `PYVERS="3.12 3.11" bash bench/gpu_wheels.sh` for this machine's Python 3.11)
#
# Variables: GPU_CHECK_BUDGET_S (470 on the device, 1800 dry), GPU_CHECK_WORK (scratch, default
# /tmp/gpu_check[_dry]), GPU_CHECK_PYTEST_ARGS (extra pytest arguments; dry default: a quick
# file and one 4-bit test), GPU_CHECK_MAXFAIL (10), GPU_CHECK_QLORA_SHAPE (tinyllama-1.1b),
# GPU_CHECK_ENGINES ("hf packed"; "none" leaves model.engine unset), GPU_CHECK_PYTEST_WORKERS
# (pytest-xdist workers: 4 on the device, 0 dry), PY (python3; dry:
# .venv/bin/python), GPU_CHECK_SKIP_INSTALL=1 (use what is installed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DRY=0
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ "${GPU_CHECK_CPU_DRY_RUN:-0}" = 1 ] && DRY=1

if [ "$DRY" = 1 ]; then
  MODE="cpu-dry-run"
  PY=${PY:-$REPO/.venv/bin/python}
  WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_dry}
  OUT=${OUT:-$WORK/out}
  BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}
  QS_SHAPE=tiny QLORA_SHAPE=${GPU_CHECK_QLORA_SHAPE:-small} MODEL_DEVICE=cpu MODEL_DTYPE=float32
  PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-tests/test_config.py tests/test_models.py::test_4bit_lora_forward_backward_on_cpu}
  LIMIT_SETUP=300 LIMIT_MODELS=300 LIMIT_QLORA=600 LIMIT_QUICKSTART=600
  # Small and on the CPU: the same code path with the device's settings shrunk.
  QLORA_EXTRA=(--set model.device=cpu --set model.dtype=float32 --set batch_size=4 --set sampling.max_new_tokens=8
               --set max_prompt_tokens=64 --set ppo_epochs=1 --set num_minibatches=1 --set grad_accum_steps=1)
else
  MODE="gpu"
  PY=${PY:-python3}
  WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
  OUT=${OUT:-$REPO/runs/gpu_check}
  BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
  QS_SHAPE=smollm2-135m QLORA_SHAPE=${GPU_CHECK_QLORA_SHAPE:-tinyllama-1.1b} MODEL_DEVICE=cuda MODEL_DTYPE=bfloat16
  PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-}
  LIMIT_SETUP=90 LIMIT_MODELS=100 LIMIT_QLORA=110 LIMIT_QUICKSTART=110
  QLORA_EXTRA=()
fi
SITE=$WORK/site
[ -d "$WORK" ] && chmod -R u+w "$WORK" 2>/dev/null
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT" || exit 2
echo "$MODE" > "$WORK/mode"
: > "$WORK/stages.tsv"
export REPO PY WORK OUT SITE DRY MODEL_DEVICE MODEL_DTYPE QS_SHAPE QLORA_SHAPE PYTEST_ARGS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 WANDB_MODE=offline
export RLHF_CACHE_DIR=$WORK/cache  # empty: every stage names its model directory (the GGUF isn't there)
START=$(date +%s)
FAILED=0

now() { date +%s.%N; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }
record() {  # record NAME STATUS RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >> "$WORK/stages.tsv"
  [ "$2" = pass ] || FAILED=1
  printf '=== [%s] %s (rc %s) in %ss%s\n' "$1" "$2" "$3" "$4" "${6:+: $6}"
}
# stage NAME LIMIT LOG FUNCTION: run an exported function under `timeout` (which signals the
# whole process group), capped by what is left of the budget; append a row to stages.tsv.
stage() {
  local name=$1 limit=$2 log=$3 fn=$4 left t0 rc secs status note=""
  left=$(( $(remaining) - 15 ))  # leave time for the summary
  if (( left < 20 )); then
    record "$name" skipped "" 0 "$limit" "out of time (budget ${BUDGET_S}s)"; return 1
  fi
  (( limit > left )) && limit=$left
  echo "=== [$name] start $(date +%T), limit ${limit}s, $(remaining)s of the budget left; log: $(basename "$log")"
  echo "=== [$name] $(date +%T) limit ${limit}s" >> "$log"
  t0=$(now)
  timeout -k 10 "$limit" bash -c "$fn" >> "$log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}')
  case $rc in
    0) status=pass ;;
    124|137) status=timeout; note="killed after ${limit}s" ;;
    *) status=fail ;;
  esac
  [ "$status" = pass ] || note="${note:+$note; }$(grep -E 'RESULT|Error|error|FAILED|PROBLEM' "$log" | tail -n 1 | cut -c1-240)"
  record "$name" "$status" "$rc" "$secs" "$limit" "$note"
  [ "$status" = pass ] || { echo "--- last lines of $(basename "$log"):"; tail -n 25 "$log"; }
  [ "$status" = pass ]
}

# ---------------------------------------------------------------------------------------------
# 1. setup: in this shell (PYTHONPATH etc. must outlive it), each command under its own timeout
# ---------------------------------------------------------------------------------------------
ENVLOG=$OUT/env.log
echo "=== [setup] start $(date +%T) ($MODE, budget ${BUDGET_S}s, repo $REPO, work $WORK)"
t_setup=$(now)
setup_ok=1 setup_note=""
{
  echo "mode $MODE; repo $REPO; python $(command -v "$PY" || echo "$PY: not found")"
  if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi; else echo "nvidia-smi: not found"; fi
} >> "$ENVLOG" 2>&1
command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYV=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>>"$ENVLOG") || { setup_ok=0; setup_note="no python at $PY"; }
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
  echo "GPU_CHECK_SKIP_INSTALL=1: using what is installed" | tee -a "$ENVLOG"
elif ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  setup_ok=0; setup_note=".whl/ not here: run 'bash bench/gpu_wheels.sh' where PyPI is reachable and pass carry [\".whl\"]"
  echo "$setup_note" | tee -a "$ENVLOG"
else
  wheels=("$REPO"/.whl/*.whl)
  if ls "$REPO/.whl/py$PYV"/*.whl >/dev/null 2>&1; then
    wheels+=("$REPO/.whl/py$PYV"/*.whl)
  else
    echo "warning: no wheels for Python $PYV in .whl/py$PYV (multiprocess, for datasets): rerun 'PYVERS=$PYV bash bench/gpu_wheels.sh'" | tee -a "$ENVLOG"
    setup_note="no .whl/py$PYV"
  fi
  echo "installing ${#wheels[@]} wheels into $SITE (no index)" >> "$ENVLOG"
  if ! timeout 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "${wheels[@]}" >> "$ENVLOG" 2>&1; then
    echo "pip install failed; unpacking the wheels instead" | tee -a "$ENVLOG"
    timeout 120 "$PY" - "$SITE" "${wheels[@]}" >> "$ENVLOG" 2>&1 <<'EOF' || { setup_ok=0; setup_note="could not install the wheels"; }
import sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
for w in wheels:  # purelib/platlib content only; these wheels have no scripts or data that matter here
    with zipfile.ZipFile(w) as z:
        z.extractall(site, [n for n in z.namelist() if ".data/" not in n.split("/")[0] + "/"])
print(f"unpacked {len(wheels)} wheels into {site}")
EOF
  fi
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Data: the tests read $REPO/../shared/data; only the repo travels, so the copy in .whl/ is
# linked there when it is missing.
DATA=$REPO/../shared/data
if [ ! -f "$DATA/hh-rlhf/harmless-base/test.jsonl.gz" ] && [ -d "$REPO/.whl/shared-data/hh-rlhf" ]; then
  if [ ! -e "$DATA" ] && mkdir -p "$REPO/../shared" 2>/dev/null && ln -s "$REPO/.whl/shared-data" "$DATA" 2>/dev/null; then
    echo "linked $DATA -> .whl/shared-data" | tee -a "$ENVLOG"
  else
    DATA=$REPO/.whl/shared-data
    echo "warning: could not link ../shared/data; the tests that read it will fail (the stages use $DATA)" | tee -a "$ENVLOG"
  fi
fi
DATA=$(cd "$DATA" 2>/dev/null && pwd -P) || DATA=""
HH=$DATA/hh-rlhf/harmless-base/test.jsonl.gz
[ -f "$HH" ] || { setup_ok=0; setup_note="${setup_note:+$setup_note; }no shared data (hh-rlhf test.jsonl.gz)"; echo "no shared data found" | tee -a "$ENVLOG"; }
TOK=""
for d in "$REPO/tests/assets/smollm2-tokenizer" "$REPO/.whl/smollm2-tokenizer"; do
  [ -f "$d/tokenizer.json" ] && { TOK=$d; break; }
done
[ -n "$TOK" ] || { setup_ok=0; setup_note="${setup_note:+$setup_note; }no tokenizer: tests/assets/smollm2-tokenizer is missing (and no .whl/smollm2-tokenizer)"; }
echo "data: ${DATA:-none}; tokenizer: ${TOK:-none}" | tee -a "$ENVLOG"
export DATA HH TOK
timeout 150 "$PY" "$REPO/bench/gpu_report.py" env "$WORK/env.json" 2>&1 | tee -a "$ENVLOG"
[ "${PIPESTATUS[0]}" = 0 ] || { setup_ok=0; setup_note="${setup_note:+$setup_note; }$(grep PROBLEM "$ENVLOG" | head -n 3 | tr '\n' ' ')"; }
secs=$(awk -v a="$t_setup" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}')
record setup "$([ $setup_ok = 1 ] && echo pass || echo fail)" "$((1 - setup_ok))" "$secs" "$LIMIT_SETUP" "$setup_note"
WANDB_MISSING=$("$PY" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["packages"].get("wandb") is None))' "$WORK/env.json" 2>/dev/null || echo 1)

# ---------------------------------------------------------------------------------------------
# 2. models
# ---------------------------------------------------------------------------------------------
models() {
  set -e
  [ -n "$TOK" ] || { echo "error: no tokenizer (tests/assets/smollm2-tokenizer)"; exit 1; }
  "$PY" "$REPO/bench/gpu_make_model.py" --shape "$QLORA_SHAPE" --tokenizer "$TOK" --out "$WORK/model-1b" --device "$MODEL_DEVICE" --dtype "$MODEL_DTYPE"
  "$PY" "$REPO/bench/gpu_make_model.py" --shape "$QS_SHAPE" --tokenizer "$TOK" --out "$WORK/model-qs" --device "$MODEL_DEVICE" --dtype "$MODEL_DTYPE"
}
export -f models
stage models "$LIMIT_MODELS" "$ENVLOG" models

# ---------------------------------------------------------------------------------------------
# 3. one 4-bit QLoRA PPO update of the ~1.1B model, per engine
# ---------------------------------------------------------------------------------------------
export QLORA_EXTRA_STR=""
(( ${#QLORA_EXTRA[@]} )) && QLORA_EXTRA_STR=$(printf '%q ' "${QLORA_EXTRA[@]}")
qlora() {  # qlora ENGINE
  local extra=()
  eval "extra=($QLORA_EXTRA_STR)"
  "$PY" "$REPO/bench/gpu_ppo_update.py" --model "$WORK/model-1b" --engine "$1" --out "$WORK/run-qlora-$1" \
    --prompts "$HH" --updates 2 --result "$WORK/qlora_$1.json" "${extra[@]}"
}
export -f qlora
for engine in ${GPU_CHECK_ENGINES:-hf packed}; do  # 'none': leave model.engine unset (a tree without it)
  stage "qlora_$engine" "$LIMIT_QLORA" "$OUT/qlora_$engine.log" "qlora $engine"
  grep '^RESULT' "$OUT/qlora_$engine.log" | tail -n 1
done

# ---------------------------------------------------------------------------------------------
# 4. the quickstart at smoke size (tests/test_recipes_real_model.py::test_quickstart_recipe_smoke's overrides)
# ---------------------------------------------------------------------------------------------
quickstart() {
  set -e
  local run="$WORK/quickstart" m="$WORK/model-qs"
  "$PY" -m rlhf pipeline recipes/quickstart.yaml "run_dir=$run" "rm.output_dir=$run/rm" \
    "rm.model.name=$m" "ppo.model.name=$m" \
    "rm.data.path=$HH" "rm.eval_data.path=$HH" "ppo.prompts.path=$HH" "ppo.eval_prompts.path=$HH" \
    rm.max_steps=1 rm.data.max_items=8 rm.eval_data.max_items=8 rm.micro_batch_size=4 rm.grad_accum_steps=1 \
    "ppo.reward.path=$run/rm/model" "ppo.value_head_init=$run/rm/model" "ppo.output_dir=$run/ppo" \
    ppo.updates=2 ppo.batch_size=4 ppo.eval_prompts.max_items=4 ppo.sampling.max_new_tokens=8 \
    ppo.checkpoint_every=1 ppo.sample_every=1
  "$PY" "$REPO/bench/gpu_report.py" quickstart "$run"
}
export -f quickstart
stage quickstart "$LIMIT_QUICKSTART" "$OUT/quickstart.log" quickstart

# ---------------------------------------------------------------------------------------------
# 5. the non-slow tests, with the time left
# ---------------------------------------------------------------------------------------------
export KFILTER=""
[ "$WANDB_MISSING" = 1 ] && KFILTER="not wandb"  # wandb isn't carried (see bench/gpu_wheels.sh)
export PYTEST_WORKERS=${GPU_CHECK_PYTEST_WORKERS:-$([ "$DRY" = 1 ] && echo 0 || echo 4)}
pytests() {
  local k=() x=()
  [ -n "$KFILTER" ] && k=(-k "$KFILTER") && echo "wandb is not installed: deselecting -k '$KFILTER'"
  # Spread over workers (6 min serial on 2 CPU cores); whole files per worker, so a file's
  # session fixtures and order stay as in a serial run.
  if (( PYTEST_WORKERS > 0 )) && "$PY" -c "import xdist" 2>/dev/null; then
    x=(-p xdist -n "$PYTEST_WORKERS" --dist loadfile)
  elif (( PYTEST_WORKERS > 0 )); then
    echo "pytest-xdist not importable: running serially"
  fi
  # No -x: one device run should report every failure, not the first (and a module that fails
  # to import doesn't stop the others); --maxfail bounds a cascade.
  # shellcheck disable=SC2086
  "$PY" -m pytest -m "not slow" -q -rfE --durations=20 -p no:cacheprovider --maxfail="${GPU_CHECK_MAXFAIL:-10}" \
    --continue-on-collection-errors \
    --junitxml="$WORK/pytest.xml" "${x[@]}" "${k[@]}" $PYTEST_ARGS
}
export -f pytests
stage pytest "$(remaining)" "$OUT/pytest.log" pytests &&
grep -E '^(=+ .*(passed|failed|error).* =+|[0-9]+ (passed|failed))' "$OUT/pytest.log" | tail -n 1

# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
echo "=== summary after $(( $(date +%s) - START ))s"
"$PY" "$REPO/bench/gpu_report.py" summary "$WORK" "$OUT" || FAILED=1
( cd "$WORK" && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.tsv' -o -name '*.xml' -o -name mode \) \
    -not -path './site/*' -not -path './cache/*' -not -path './out/*' -not -name 'tokenizer*.json' -not -name 'model.safetensors*' -print0 \
  | tar -czf "$OUT/artifacts.tar.gz" --null -T - ) 2>/dev/null
echo "outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$FAILED"

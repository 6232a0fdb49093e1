#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_check.sh needs on the GPU machine, which has no
# package registry. Run HERE, where PyPI is reachable:   bash bench/gpu_wheels.sh
# Then run the check there with `.whl` carried (see bench/gpu_check.sh's header).
#
# The device image (its python 3.12, torch 2.11 + CUDA 13, transformers, accelerate, and the
# packages listed for it: numpy, safetensors, pyyaml, tqdm, huggingface_hub, tokenizers,
# matplotlib, pandas, pyarrow, xxhash, psutil, jinja2, tensorboard, pygments, packaging ...)
# lacks, or may hold other versions of, the ones carried here, pinned to the versions this
# project is tested with (README "Tested versions"):
#   bitsandbytes 0.50.2  4-bit QLoRA. The manylinux wheel is 41 MiB because it ships a library
#                        per CUDA version; it is repacked here keeping only the CPU, CUDA 12.8 and
#                        13.x libraries (torch 2.11+cu130 loads libbitsandbytes_cuda130.so; 12.8 in
#                        case the image's torch is a CUDA 12 build), ~14 MiB.
#   peft 0.21.2          LoRA (the image may hold another version)
#   trl 1.16.0           one non-slow test runs a real GRPO step through it
#   datasets 5.2.0       tests of the save_to_disk layout, and trl; + dill, multiprocess, fsspec
#                        (multiprocess's wheel is per Python version: one per PYVERS, in .whl/pyX.Y/)
#   pytest 9.2.0         + pluggy, iniconfig (the image's may be older; its plugins are not loaded),
#                        and pytest-xdist 3.8.0 + execnet: the non-slow suite takes 6 min on 2 CPU
#                        cores, so the check spreads it over 4 workers
# Not carried, and why:
#   transformers 5.25 / huggingface_hub 2.x / accelerate / tokenizers / safetensors: the image's are
#       used. transformers 5.25 needs huggingface_hub>=2.4, which needs httpx2 and its own chain,
#       and hub/kernels wheels are per Python version: more to carry and more to go wrong than
#       running on the image's transformers (5.17 when last read), whose version the check prints.
#   gguf: only converts the embedded SmolLM2 GGUF, which doesn't travel; the check builds random
#       Llama-shaped models from a config instead.
#   wandb: a 20+ MiB binary wheel plus pydantic, sentry-sdk, gitpython ...; the one test that
#       writes a wandb run is deselected on the device when wandb isn't importable.
#   matplotlib, tensorboard, pandas, pyarrow, xxhash: in the image (pyarrow alone is ~40 MiB);
#       matplotlib is imported lazily, only to draw the run's PNGs.
# Beside the wheels, .whl/ gets a copy of ../shared/data (2 MiB: the tests and the quickstart
# read it, and only the repo travels) and of the SmolLM2 tokenizer (a fallback, should
# tests/assets/smollm2-tokenizer be missing there).
#
# Variables: PYVERS (device Python versions, default "3.12"; add 3.11 to dry-run here),
# DEST (default .whl), PY (python with pip, default .venv/bin/python), SHARED_DATA,
# KEEP_CUDA (bitsandbytes CUDA libraries to keep, default "128 130 132").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEST=${DEST:-.whl}
PYVERS=${PYVERS:-3.12}
KEEP_CUDA=${KEEP_CUDA:-128 130 132}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SHARED_DATA=${SHARED_DATA:-$REPO/../shared/data}
[ -d "$SHARED_DATA" ] || SHARED_DATA=/work/shared/data
LIMIT_MIB=64  # the device tool's limit on everything that travels (tree + carried paths)

COMMON=(bitsandbytes==0.50.2 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-xdist==3.8.0 execnet==2.1.2)
PER_PY=(multiprocess==0.70.19)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

[ -d "$DEST" ] && chmod -R u+w "$DEST"
rm -rf "$DEST"
mkdir -p "$DEST"
dl() {  # dl PYVER DIR SPEC...
  local pyver=$1 dir=$2; shift 2
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${PLATFORMS[@]}" -d "$dir" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
first_py=${PYVERS%% *}
dl "$first_py" "$DEST" "${COMMON[@]}"
for v in $PYVERS; do
  mkdir -p "$DEST/py$v"
  dl "$v" "$DEST/py$v" "${PER_PY[@]}"
done
# Every common wheel must be Python-version independent (py3-none-*), or it belongs in PER_PY.
for w in "$DEST"/*.whl; do
  case "$(basename "$w")" in *-py3-none-*|*-py2.py3-none-*) ;; *) echo "not version-independent: $w (move it to PER_PY)" >&2; exit 1 ;; esac
done

# Slim bitsandbytes: keep its CPU library and the CUDA 13.x ones; RECORD is rewritten to match.
"$PY" - "$DEST" $KEEP_CUDA <<'EOF'
import pathlib, re, sys, zipfile
dest, keep = pathlib.Path(sys.argv[1]), set(sys.argv[2:])
(whl,) = dest.glob("bitsandbytes-*.whl")
tmp = whl.with_suffix(".tmp")
dropped = 0
with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    def dropped_name(name):
        m = re.search(r"libbitsandbytes_(cuda\d+|rocm\d+|xpu\d+)\.(so|dll|dylib)$", name)
        return m is not None and m.group(1).removeprefix("cuda") not in keep
    for info in zin.infolist():
        if dropped_name(info.filename):
            dropped += info.file_size
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = [l for l in data.decode().splitlines() if not dropped_name(l.split(",")[0])]
            data = ("\n".join(lines) + "\n").encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    kept = sorted(n for n in zin.namelist() if re.search(r"libbitsandbytes_\w+\.so$", n) and not dropped_name(n))
tmp.replace(whl)
if not any("cuda13" in n for n in kept):
    sys.exit(f"bitsandbytes wheel has no CUDA 13 library left: {kept}")
print(f"bitsandbytes slimmed: dropped {dropped / 2**20:.0f} MiB of libraries; kept {', '.join(n.split('/')[-1] for n in kept)}")
EOF

# Data and the tokenizer fallback.
if [ -d "$SHARED_DATA" ]; then
  mkdir -p "$DEST/shared-data" && cp -r "$SHARED_DATA"/. "$DEST/shared-data/" && chmod -R u+w "$DEST/shared-data"
else
  echo "warning: no shared data at $SHARED_DATA; the device run needs it for the tests and the quickstart" >&2
fi
TOK_SRC=$REPO/tests/assets/smollm2-tokenizer
CACHE_TOK=${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pluggable-rlhf}/models/smollm2-135m-instruct
if [ -f "$TOK_SRC/tokenizer.json" ]; then
  mkdir -p "$DEST/smollm2-tokenizer" && cp "$TOK_SRC"/* "$DEST/smollm2-tokenizer/"
elif [ -f "$CACHE_TOK/tokenizer.json" ]; then
  mkdir -p "$DEST/smollm2-tokenizer"
  for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
    [ -f "$CACHE_TOK/$f" ] && cp "$CACHE_TOK/$f" "$DEST/smollm2-tokenizer/"
  done
else
  echo "warning: no SmolLM2 tokenizer found (tests/assets/smollm2-tokenizer or $CACHE_TOK); the device run needs tests/assets/smollm2-tokenizer" >&2
fi

# Manifest and sizes.
( cd "$DEST" && find . -name '*.whl' | sort | xargs stat -c '%s %n' | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}' ) | tee "$DEST/MANIFEST.txt"
carried=$(du -sb "$DEST" | cut -f1)
tree=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$((carried + tree))
awk -v d="$DEST" -v c="$carried" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {printf "%s: %.1f MiB carried; working tree that travels: %.1f MiB; total %.1f MiB (limit %d MiB)\n", d, c / 1048576, t / 1048576, (c + t) / 1048576, l}' | tee -a "$DEST/MANIFEST.txt"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "over the ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
echo "carry: [\"$DEST\"]"

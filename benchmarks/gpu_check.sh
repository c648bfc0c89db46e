#!/usr/bin/env bash
# One GPU run of a few minutes: the CUDA tests (fp16/bf16 included, compiled kernels,
# no interpreter), the self-check and the quick benchmarks. Everything lands in
# benchmarks/results/<date>_<card>/ (logs, JSON, text tables); commit that folder with
# the card's name and date. Usage: bash benchmarks/gpu_check.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to do (on a CPU run the README's commands)" >&2
  exit 2
fi
card=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
out="benchmarks/results/$(date -u +%Y-%m-%d)_${card}"
mkdir -p "$out"
export TRITON_INTERPRET=0
status=0

step() {  # step NAME TIMEOUT_S CMD...: run, tee the log, remember failures, keep going
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
step tests 200 python -m pytest -q -x -p no:cacheprovider tests "$@"
step selfcheck 60 python -m fastpeft.selfcheck --no-bench
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  step "$name" 150 python "$bench" --quick --json "$out/$name.json"
done
python - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common
print(json.dumps(common.device_info()))
PY
echo "results in $out (exit $status)"
exit $status

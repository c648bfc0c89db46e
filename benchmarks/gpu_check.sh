#!/usr/bin/env bash
# One GPU run of a few minutes: the CUDA tests (fp16/bf16 included, compiled kernels,
# no interpreter), the self-check and the quick benchmarks. Everything lands in
# benchmarks/results/<date>_<card>/ (logs, JSON, summary); commit that folder, it names
# the card and the date. Usage: bash benchmarks/gpu_check.sh [pytest args replacing the
# default test selection]
#
# GPU_CHECK_DRY_RUN=1 rehearses the same steps on a machine without a GPU (Triton
# interpreter, results under a temporary folder): test the script there before spending
# GPU time on it.
set -uo pipefail
cd "$(dirname "$0")/.."

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=0
  card=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
  out="benchmarks/results/$(date -u +%Y-%m-%d)_${card}"
elif [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  export TRITON_INTERPRET=1
  out=$(mktemp -d /tmp/gpu_check_dry.XXXXXX)
  # The interpreter is far slower than a GPU: the test steps only collect their tests
  # (the selection and every import are rehearsed; CI runs the tests themselves) and the
  # other steps get their limits times GPU_CHECK_DRY_SCALE.
  scale=${GPU_CHECK_DRY_SCALE:-5}
  pytest_mode=(--collect-only)
  echo "gpu_check: dry run without a GPU (interpreter) into $out; tests collected, not run; limits x$scale"
else
  echo "gpu_check: no CUDA GPU visible to torch; nothing to do (on a CPU run the README's commands," \
       "or rehearse with GPU_CHECK_DRY_RUN=1)" >&2
  exit 2
fi
mkdir -p "$out"
status=0
: "${scale:=1}"
[ -n "${pytest_mode+set}" ] || pytest_mode=()
# The tuner's picks (kernels/tuning_cache.py) land beside the results: which variant won
# for each shape (tests use a cache of their own).
export FASTPEFT_CACHE="$out/tuning_cache"

# The package maps kernels/ to fastpeft.kernels, so it must be installed (editable, no
# downloads: the GPU machine has no network and already has torch, triton and friends).
if ! python -c "import fastpeft.kernels.lora" 2>/dev/null || \
   [ "$(python -c 'import fastpeft, os; print(os.path.realpath(os.path.dirname(fastpeft.__file__)))')" != "$(realpath fastpeft)" ]; then
  pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: pip install -e . failed" >&2; exit 3; }
fi

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log, remember failures, go on
  local name=$1 limit=$(( $2 * scale )); shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

# Budget: about 7 minutes in all, so that a 15-minute device session (start-up included)
# has room for it. Each benchmark writes its JSON after every point, so one cut short by
# its limit keeps what it measured.
python -c "import sys; sys.path.insert(0, 'benchmarks'); import common, json; print(json.dumps(common.device_info()))" \
  | tee "$out/device.json"
# The kernel tests (fp16/bf16 on the compiled kernels) come first; the model-level tests
# run the same kernels on CPU-sized models and are covered by CI, so they run last.
kernel_tests=$(ls tests/test_*kernel*.py tests/test_*_module.py 2>/dev/null)
if [ "$#" -gt 0 ]; then
  step tests 240 python -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" "$@"
else
  step kernel_tests 150 python -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" $kernel_tests
fi
step selfcheck 30 python -m fastpeft.selfcheck --no-bench
step bench_lora 120 python benchmarks/bench_lora.py --quick --json "$out/bench_lora.json"
step bench_train 90 python benchmarks/bench_train.py --quick --json "$out/bench_train.json"
step bench_adapters 60 python benchmarks/bench_adapters.py --quick --json "$out/bench_adapters.json"
step bench_multi 60 python benchmarks/bench_multi.py --quick --json "$out/bench_multi.json"
step bench_decode 60 python benchmarks/bench_decode.py --quick --json "$out/bench_decode.json"
step bench_adalora 45 python benchmarks/bench_adalora.py --quick --json "$out/bench_adalora.json"
step bench_dora 60 python benchmarks/bench_dora.py --quick --json "$out/bench_dora.json"
# Fine-tuning step time on Llama-3.2-1B's shapes (random weights, no download), fastpeft
# against PEFT, same data and settings; each JSON holds mean_step_s. GPU only.
if [ "$TRITON_INTERPRET" = "0" ]; then
  ft="examples/finetune.py --model llama-1b-config --steps 15 --warmup-steps 5 --batch-size 4 --seq-len 512"
  step finetune_fastpeft 120 python $ft --json "$out/finetune_fastpeft.json"
  step finetune_peft 120 python $ft --peft --json "$out/finetune_peft.json"
  python - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, os, sys
runs = {lib: os.path.join(sys.argv[1], f"finetune_{lib}.json") for lib in ("fastpeft", "peft")}
if all(os.path.exists(p) for p in runs.values()):
    t = {lib: json.load(open(p))["mean_step_s"] for lib, p in runs.items()}
    print(f"finetune 1B step: fastpeft {t['fastpeft']:.4f} s, peft {t['peft']:.4f} s, "
          f"fastpeft/peft {t['fastpeft'] / t['peft']:.3f}")
PY
fi
if [ "$#" -eq 0 ]; then
  step other_tests 60 python -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" tests \
    $(printf -- '--ignore=%s ' $kernel_tests)
fi
echo "results in $out (exit $status)"
exit $status

#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: checks the CUDA path and benchmarks it.
#   scripts/gpu_check.sh            (writes logs and JSON under $OUT, or ./gpu-out)
#   QUICK=1 scripts/gpu_check.sh    (only the cuda-marked tests, the benchmarks, no profile)
# The whole run stays under BUDGET_S seconds (default 470, under 8 minutes): each step's
# timeout is cut to what is left, and a step with under 20 s left is skipped.
# The device image has its own torch; carry the pinned timm as a wheel in .whl/ (ignored):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl timm==1.0.31
set -uo pipefail
OUT="${OUT:-./gpu-out}"; mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
    nvidia-smi -L
    python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

limited() {  # cap_seconds, command...: run under min(cap, time left), or skip
    local cap=$1; shift
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then echo "  skipped: the ${BUDGET_S:-470} s budget is spent" >&2; return 124; fi
    timeout $((cap < left ? cap : left)) "$@"
}

echo "== CUDA tests"
if [ -n "${QUICK:-}" ]; then
    selection=(-m cuda tests/test_reference.py tests/test_engine.py tests/test_gpu_input.py)
else
    selection=(tests/test_reference.py tests/test_engine.py tests/test_model.py tests/test_optim.py
        tests/test_gpu_input.py)
fi
limited 240 python3 -m pytest -q -x -p no:cacheprovider "${selection[@]}" 2>&1 | tail -15 \
    | tee "$OUT/tests.txt"

bench() {  # name, args...
    local name=$1; shift
    echo "== bench $name: $*"
    limited "${BENCH_TIMEOUT:-200}" python3 -m spark_core.bench --device cuda "$@" --json \
        > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.err"
    python3 - "$OUT/bench-$name.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  failed:", e); sys.exit()
for v in r["results"].values():
    print(f"  {v['name']:<10} {v['images_per_sec']:8.1f} img/s  {v['step_ms']:7.1f} ms  spread {100*v['spread']:.0f}%  {v['tflops']:6.1f} TFLOPS")
for k, v in r["ratios"].items():
    print(f"  {k:<16} {v:.2f}x")
PY
    tail -3 "$OUT/bench-$name.err"
}

bench_input() {  # args...: the input pipeline, DataLoader (PIL) vs decoded on the GPU
    echo "== bench input: $*"
    limited 150 python3 -m spark_core.bench --data --device cuda "$@" --json \
        > "$OUT/bench-data.json" 2> "$OUT/bench-data.err"
    python3 - "$OUT/bench-data.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  failed:", e); sys.exit()
s = r["settings"]
print(f"  {s['images']} JPEGs {s['width']}x{s['height']} q{s['quality']}, mean {s['mean_file_kb']:.1f} KB, {s['cpus']} CPUs, torchvision {s['torchvision']}")
for v in r["results"].values():
    print(f"  {v['name']:<14} {v['images_per_sec']:8.1f} img/s  {v['batch_ms']:7.1f} ms/batch")
PY
    tail -3 "$OUT/bench-data.err"
}

# Most telling first: each later one is a variant of the compiled step, to keep or drop.
bench compiled --variants spark --compile --warmup 3
bench_input --data-workers 8,16 --device-workers 4
bench eager --variants spark,reference,dense --no-compile
[ -n "${QUICK:-}" ] && exit 0
bench compiled-lamb --variants spark --compile --compile-optimizer --warmup 3
bench compiled-no-autotune --variants spark --compile --no-cudnn-benchmark --warmup 3
echo "== profile (compiled)"
limited 200 python3 -m spark_core.bench --device cuda --profile --compile --iters 3 \
    > "$OUT/profile.txt" 2>&1
grep -v "^ *$" "$OUT/profile.txt" | cut -c1-60,100-200 | head -40
echo "== done in $SECONDS s"

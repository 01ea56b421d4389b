#!/usr/bin/env bash
# The benchmarks and the core tests on a GPU machine, in one call of a few minutes.
#
# Run from the repository root on a machine whose python3 has jax (with CUDA), flax, optax,
# chex, scipy, scikit-learn, hypothesis and pytest. Wheels of what it lacks (POT, ott-jax,
# jaxopt) may sit in .whl/ and are installed into /tmp/site first. Every section has its own
# time limit, so one slow part cannot eat the rest; logs and JSON go to $OUT (8 files at
# most: the device tool returns no more).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_check.sh     # tiny sizes: checks the script itself
set -u
OUT=${OUT:-/tmp/affjax-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 POT_BACKEND_DISABLE_TENSORFLOW=1 POT_BACKEND_DISABLE_PYTORCH=1
# Each benchmark runs several JAX processes in turn; none may take the GPU's memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
section() { echo; echo "=== $(date +%T) $*"; }

if [ -n "${QUICK:-}" ]; then
    COMPILE=(--n 256 --d 16)
    SCORE=(--n 256 --d 16 --no-headlines --repeats 1)
    SIG=(--batch 64 --repeats 1 --modes grouped published --mode-timeout 60)
    SOLVERS=(--n 64 128 --batch 1 2 --repeats 1)
    TESTS=(tests/test_building_blocks.py)
    LIMIT=(60 60 60 60 60)
else
    # Sized for one call of 560 s (2026-11-27 on an H100: the first call of a score shape
    # compiled for 5-26 s, so rows that compile many shapes get their own limits).
    COMPILE=(--n 2048 --d 64 512)
    SCORE=(--n 2048 8192 --d 64 512 2048 --repeats 3 --budget-seconds 10 --breakdown)
    SIG=(--batch 512 --repeats 3 --modes forward grouped published fused --mode-timeout 70)
    SOLVERS=(--n 64 256 1024 --batch 1 4 --repeats 3)
    TESTS=(tests/test_building_blocks.py)
    LIMIT=(90 170 150 50 60)
fi

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY - <<'EOF'
import importlib.metadata as md
import jax
for name in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "scipy", "pot", "ott-jax"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing")
print("backend", jax.default_backend(), jax.devices())
EOF

section "compile_times ${COMPILE[*]}"
timeout "${LIMIT[0]}" $PY benchmarks/compile_times.py "${COMPILE[@]}" 2>&1 | tee "$OUT/compile.log"

section "bench_score ${SCORE[*]}"
timeout "${LIMIT[1]}" $PY benchmarks/bench_score.py "${SCORE[@]}" --wait-idle 0 \
    --json "$OUT/score.json" 2>&1 | tee "$OUT/score.log" | grep -v "^  "

section "bench_signature ${SIG[*]}"
timeout "${LIMIT[2]}" $PY benchmarks/bench_signature.py "${SIG[@]}" --json "$OUT/signature.json" \
    2>&1 | tee "$OUT/signature.log"

section "bench_solvers ${SOLVERS[*]}"
timeout "${LIMIT[3]}" $PY benchmarks/bench_solvers.py "${SOLVERS[@]}" 2>&1 | tee "$OUT/solvers.log"

section "pytest ${TESTS[*]}"
timeout "${LIMIT[4]}" $PY -m pytest -p no:cacheprovider -rfE "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -5
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
section "done"

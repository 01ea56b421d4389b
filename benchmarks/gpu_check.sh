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
    ASSIGN=(--quick)
    ZOO=(--model resnet18 --n 64 --size 32 --repeats 1)
    SOLVERS=(--n 64 128 --batch 1 2 --repeats 1)
    TESTS=(tests/test_assignment.py -k "random or batch")
    LIMIT=(60 60 60 60 60 60)
else
    # Sized for one call of at most 8 minutes on one H100 (the device tool lends 15 minutes
    # a session): compile times twice (with and without XLA's GEMM autotuning), the
    # assignment corpus, resnet50's whole signature at n = 2048 and 224 px (cold, warm, and
    # cold again from the persistent compilation cache), the solver table, the core tests.
    COMPILE=(--n 2048 --d 64 512)
    ASSIGN=(--n 512 2048 --repeats 3 --budget 20)
    ZOO=(--model resnet50 --n 2048 --size 224 --repeats 3)
    SOLVERS=(--n 256 1024 2048 --batch 1 8 --repeats 3)
    TESTS=(tests/test_assignment.py tests/test_building_blocks.py)
    LIMIT=(60 60 120 150 40 50)
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
section "compile_times without GEMM autotuning"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout "${LIMIT[1]}" \
    $PY benchmarks/compile_times.py "${COMPILE[@]}" 2>&1 | tee -a "$OUT/compile.log"

section "bench_assignment ${ASSIGN[*]}"
timeout "${LIMIT[2]}" $PY benchmarks/bench_assignment.py "${ASSIGN[@]}" \
    --json "$OUT/assignment.json" 2>&1 | tee "$OUT/assignment.log"

section "bench_zoo_signature ${ZOO[*]} (cold, warm; then cold from the persistent cache)"
rm -rf /tmp/affjax-jax-cache
timeout "${LIMIT[3]}" $PY benchmarks/bench_zoo_signature.py "${ZOO[@]}" \
    --cache /tmp/affjax-jax-cache 2>&1 | tee "$OUT/zoo.log"
timeout "${LIMIT[3]}" $PY benchmarks/bench_zoo_signature.py "${ZOO[@]}" --solvers auto \
    --cache /tmp/affjax-jax-cache 2>&1 | tee -a "$OUT/zoo.log"

section "bench_solvers ${SOLVERS[*]}"
timeout "${LIMIT[4]}" $PY benchmarks/bench_solvers.py "${SOLVERS[@]}" 2>&1 | tee "$OUT/solvers.log"

section "pytest ${TESTS[*]}"
timeout "${LIMIT[5]}" $PY -m pytest -p no:cacheprovider -rfE "${TESTS[@]}" >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -5
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
section "done"

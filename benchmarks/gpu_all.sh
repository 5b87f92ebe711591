#!/usr/bin/env bash
# Every benchmark for the GPU machine, in under 9 minutes. From the repo root:
#
#     OUT=/path/to/folder bash benchmarks/gpu_all.sh
#
# Writes to "$OUT" (5 files, under the device tool's 8-file limit):
#   step_gpu.md          benchmarks/step.py --preset gpu (every row, PEFT included)
#   compile_time_gpu.md  benchmarks/compile_time.py (depths 6, 12, 24, 48)
#   methods_step_gpu.md  benchmarks/methods_step.py --jaxpr
#   quant_gpu.md         benchmarks/quant.py
#   gpu_all.log          the environment, then each script's output and exit status
# Each script runs under its own time cap, cut to what is left of the budget, and a
# failure is logged without stopping the others. The exit status is the number of
# scripts that failed. QUICK=1 runs the tiny shapes instead (a smoke test on a CPU).
#
# Python packages: the GPU image has jax, equinox, optax, torch and peft but not quax.
# Carry wheels in .whl/ (git-ignored), made here with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux2014_x86_64 -d .whl \
#         quax==0.4.6 plum-dispatch==2.10.1 beartype==0.23.1
# (all three are pure Python wheels); this script installs whatever is in .whl/ into
# /tmp/site. lora_jax itself is imported from the checkout.

set -u
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_all.log"
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-530} # seconds for the whole run: 8m50s
START=$SECONDS

export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; torch runs in the same process in
# step.py and needs the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
# NVLink multicast stays off (the machine's rule; one GPU here, but keep it set).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

SITE=/tmp/site
mkdir -p "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 ||
        echo "pip install of .whl/ failed (see above)" >>"$LOG"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# lora_jax reads its version from installed metadata; a bare checkout has none, so
# give it a stub with the version of pyproject.toml.
if ! "$PY" -c "import importlib.metadata as m; m.version('lora_jax')" 2>/dev/null; then
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
    dist="$SITE/lora_jax-${version:-0.0.0}.dist-info"
    mkdir -p "$dist"
    printf 'Metadata-Version: 2.1\nName: lora_jax\nVersion: %s\n' "${version:-0.0.0}" \
        >"$dist/METADATA"
fi

{
    echo "# gpu_all.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    git rev-parse --short HEAD 2>/dev/null || echo "(no git)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib.metadata as m
for name in ("jax", "jaxlib", "equinox", "quax", "optax", "lora_jax", "torch", "peft"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
import jax
print("jax devices:", jax.devices())
import lora_jax
print("lora_jax from", lora_jax.__file__)
EOF
} >>"$LOG" 2>&1 || echo "environment check failed: see above" >>"$LOG"

failed=0
# run NAME CAP_SECONDS COMMAND...: COMMAND under `timeout`, at most CAP seconds and
# no more than what is left of the budget.
run() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "## $name: skipped, ${left}s of the budget left" >>"$LOG"
        failed=$((failed + 1))
        return
    fi
    echo "## $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "## $name: exit status $rc after $((SECONDS - t0))s" >>"$LOG"
    if ((rc != 0)); then
        failed=$((failed + 1))
    fi
}

if [[ ${QUICK:-0} == 1 ]]; then # a smoke test of this script on a CPU machine
    step=(--preset tiny) compile=(--quick) methods=(--runs 1) quant=(--rounds 1)
else
    step=(--preset gpu --rounds 20) compile=(--repeats 2) methods=(--runs 30) quant=(--rounds 30)
fi
run step 300 "$PY" benchmarks/step.py "${step[@]}" --out "$OUT/step_gpu.md"
# Writes its table after every depth, so a run cut short keeps what it measured.
run compile_time 160 "$PY" benchmarks/compile_time.py "${compile[@]}" \
    --out "$OUT/compile_time_gpu.md"
run methods_step 60 "$PY" benchmarks/methods_step.py "${methods[@]}" --jaxpr \
    --out "$OUT/methods_step_gpu.md"
run quant 60 "$PY" benchmarks/quant.py "${quant[@]}" --out "$OUT/quant_gpu.md"

echo "## done in $((SECONDS - START))s; $failed failed" >>"$LOG"
exit "$failed"

#!/usr/bin/env bash
# The CUDA path in one go, for a lent GPU machine (the workplace's `device` tool): the tests that need CUDA,
# then the GPU benchmarks. Each part has its own time limit so one hang cannot take the rest; logs go to $OUT.
#
#   bash benchmarks/cuda_checks.sh [parts...]    parts: tests overhead throughput gpt2 mfu suite (default: all)
#
# Expects python3 with a CUDA torch. flowtrain's own dependencies may come as wheels in .whl/ (installed into
# /tmp/site); the benchmark corpus at ../shared/data/tinyshakespeare.txt, or in .devdata/ (copied there).
set -uo pipefail
OUT=${OUT:-/tmp/cuda_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore FLOWTRAIN_BENCH_CACHE=/tmp/flowtrain-bench-cache
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
    export PYTHONPATH=$PWD/src:$PWD
fi
if [ -f .devdata/tinyshakespeare.txt ] && [ ! -f ../shared/data/tinyshakespeare.txt ]; then
    mkdir -p ../shared/data && cp .devdata/tinyshakespeare.txt ../shared/data/
fi
parts=${*:-tests overhead throughput gpt2 mfu suite}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, flowtrain; print('torch', torch.__version__, 'flowtrain', flowtrain.__version__)" \
    | tee -a "$OUT/machine.txt"

part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    case " $parts " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^(tokenize|train):" | tail -40
    echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)"
}

part tests 240 python3 -m pytest -q -p no:cacheprovider tests/flow/test_cuda.py tests/train/test_cuda.py
part overhead 120 python3 benchmarks/flow_overhead.py --device cuda --blocks 30 --block 10 --intervals 1 auto \
    --big --big-blocks 20 --big-block 5
part throughput 180 python3 benchmarks/throughput.py --device cuda --config gpt2-124m \
    --variants bfloat16 bfloat16+compile --steps 4 --rounds 2 --warmup 3
part gpt2 150 python3 benchmarks/flow_overhead.py --device cuda --config gpt2-124m --blocks 4 --block 2 --warmup 3
# issue 23: compiled gpt2-124m with the microscope at auto once it has chosen (its first choice: step 64 with
# no every-step phase); monitored steps run eagerly, the others compiled
part mfu 300 python3 benchmarks/throughput.py --device cuda --config gpt2-124m --variants bfloat16+compile \
    --warmup 70 --steps 20 --rounds 1 flow.full_steps=0
# the CPU suite under this machine's torch (GPU hidden), on all cores where pytest-xdist is installed
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n $(nproc)")
part suite 100 env CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider $workers -x \
    --deselect tests/train/test_cuda.py --deselect tests/flow/test_cuda.py

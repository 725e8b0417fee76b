#!/usr/bin/env bash
# One call on a GPU machine, under 8 minutes: bench synthetic-sdxl in float16 (512x512 Turbo/LCM/LCM-LoRA, 1024x1024
# all four; eager, then compiled), check the fp16 path end to end, and write the JSON docs/benchmarks.md is built from.
#
#     bash benchmarks/gpu.sh                   # JSON and markdown into $OUT, else docs/bench/gpu
#     python benchmarks/tables.py              # then rebuild docs/benchmarks.md's tables from docs/bench/
#
# Nothing is downloaded: the synthetic family is the real architectures with random weights, built on the GPU.
# Each step has a share of the time left and leaves its JSON when it finishes; a step that runs out is named in
# failures.txt, and the steps after it still run. The compiled runs come last: they are the ones that may not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/gpu}  # elsewhere: copy its JSON files into docs/bench/gpu/ before benchmarks/tables.py
BUDGET=${BUDGET:-450}  # seconds for everything, leaving room under 8 minutes for start-up and the copy back
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# 1. What it needs: installed from requirements.txt only when an import fails (these machines may have no network).
if ! python -c "import torch, diffusers, transformers, peft, accelerate, tqdm" 2>/dev/null; then
    pip install -q -r requirements.txt || { echo "cannot install the requirements" >&2; exit 1; }
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true

# step NAME SHARE ARGS...: one bench run with at most SHARE percent of the seconds still left.
step() {
    local name=$1 share=$2; shift 2
    local left=$((BUDGET - SECONDS)) limit
    limit=$((left * share / 100))
    if ((limit < 30)); then echo "$name: skipped, ${left}s left" | tee -a "$OUT/failures.txt"; return; fi
    echo "== $name (up to ${limit}s)"
    timeout "$limit" python -m fastgen bench --family synthetic-sdxl --device cuda --dtype float16 \
        --json "$OUT/$name.json" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    cat "$OUT/$name.md"
    if ((rc != 0)); then echo "$name: exit $rc (124: out of time); see $name.log" | tee -a "$OUT/failures.txt"; fi
}

rm -f "$OUT/failures.txt"
# 2. Eager, with the fp16 check on the warm-up run: every module's output finite, the VAE decoding upcast.
step eager-512 25 --methods turbo,lcm,lcm-lora --size 512x512 --repeats 5 --check-finite
step eager-1024 35 --methods turbo,lcm,lcm-lora,baseline --size 1024x1024 --repeats 3 --check-finite
# 3. What the four methods hold with sharing, counted on the meta device (no GPU memory).
timeout 60 python -m fastgen bench --family synthetic-sdxl --meta --dtype float16 --json "$OUT/sharing.json" \
    > "$OUT/sharing.md" 2> "$OUT/sharing.log" || echo "sharing: failed" | tee -a "$OUT/failures.txt"
# 4. Compiled (torch.compile of each UNet, paid in the warm-up run).
step compiled-512 50 --methods turbo,lcm,lcm-lora --size 512x512 --repeats 5 --compile
step compiled-1024 90 --methods turbo,lcm,lcm-lora,baseline --size 1024x1024 --repeats 3 --compile
echo "done in ${SECONDS}s; results in $OUT"

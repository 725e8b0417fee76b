#!/usr/bin/env bash
# One call on a GPU machine, under 10 minutes: bench synthetic-sdxl in float16 (512x512 and 1024x1024; eager, with CUDA
# graphs, then regionally compiled), check the fp16 path end to end (every module finite, the VAE decoding
# safely, a memory budget smaller than the family evicting and reloading), and write the JSON docs/benchmarks.md is
# built from.
#
#     bash benchmarks/gpu.sh                   # JSON, markdown and logs into $OUT, else docs/bench/gpu
#     python benchmarks/tables.py              # then rebuild docs/benchmarks.md's tables from docs/bench/
#
# Nothing is downloaded: the synthetic family is the real architectures with random weights, built on the GPU.
# Each step has a share of the time left and leaves its JSON when it finishes; a step that runs out is named in
# failures.txt, and the steps after it still run. The compiled runs come last: they are the ones that may not fit.
# A machine without network: put the wheels of what is missing in .whl/ and set PYTHONPATH to where they are
# installed (pip install --no-index --target DIR .whl/*.whl); PYTHON names the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/gpu}  # elsewhere: copy its JSON files (not sharing.json: docs/bench/sharing/ has it) into
                           # docs/bench/gpu/ before benchmarks/tables.py
BUDGET=${BUDGET:-540}  # seconds for everything, leaving room for start-up and the copy back
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# 1. What it needs: installed from requirements.txt only when an import fails.
if ! $PY -c "import torch, diffusers, transformers, peft, accelerate, tqdm" 2>/dev/null; then
    $PY -m pip install -q -r requirements.txt || { echo "cannot install the requirements" >&2; exit 1; }
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true

# step NAME SHARE ARGS...: one bench run with at most SHARE percent of the seconds still left.
step() {
    local name=$1 share=$2; shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="3-graphs-512 sharing": just those
    local left=$((BUDGET - SECONDS)) limit
    limit=$((left * share / 100))
    if ((limit < 30)); then echo "$name: skipped, ${left}s left" | tee -a "$OUT/failures.txt"; return; fi
    echo "== $name (up to ${limit}s)"
    timeout "$limit" $PY -m fastgen bench --family synthetic-sdxl --device cuda --dtype float16 \
        --json "$OUT/$name.json" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    cat "$OUT/$name.md"
    if ((rc != 0)); then
        echo "$name: exit $rc (124: out of time); see $name.log" | tee -a "$OUT/failures.txt"
        tail -5 "$OUT/$name.log"
    fi
}

rm -f "$OUT/failures.txt"
# 2. Eager, with the fp16 check on the warm-up run: every module's output finite, the VAE decoding upcast.
step 1-eager-512 20 --methods turbo,lcm,lcm-lora --size 512x512 --repeats 5 --check-finite
step 2-eager-1024 30 --methods turbo,lcm,lcm-lora,baseline --size 1024x1024 --repeats 3 --check-finite
# 3. The same with the UNets and text encoders replayed as CUDA graphs (no pixel changes; captured in the warm-up).
step 3-graphs-512 25 --methods turbo,lcm,lcm-lora,baseline --size 512x512 --repeats 5 --cuda-graphs
step 4-graphs-1024 35 --methods turbo,lcm,lcm-lora,baseline --size 1024x1024 --repeats 3 --cuda-graphs
# 4. A memory budget smaller than the family (three 5.1 GB UNets, 1.6 GB of text encoders): methods evict each
# other, and the overhead runs reload Turbo's UNet.
step 5-budget-512 15 --methods turbo,lcm,lcm-lora,baseline --size 512x512 --repeats 1 --steps baseline=4 \
    --memory-budget 10GB
# 5. What the four methods hold with sharing, counted on the meta device (no GPU memory).
if [[ -z ${ONLY:-} || " $ONLY " == *" sharing "* ]]; then
    timeout 60 $PY -m fastgen bench --family synthetic-sdxl --meta --dtype float16 --json "$OUT/sharing.json" \
        > "$OUT/sharing.md" 2> "$OUT/sharing.log" || echo "sharing: failed" | tee -a "$OUT/failures.txt"
fi
# 6. Compiled (each UNet's repeated blocks, paid in the warm-up run), then channels_last on top.
step 6-compiled-512 40 --methods turbo,lcm,lcm-lora --size 512x512 --repeats 5 --compile
step 7-compiled-1024 70 --methods turbo,lcm,lcm-lora,baseline --size 1024x1024 --repeats 3 --compile
step 8-compiled-cl-1024 90 --methods turbo,baseline --size 1024x1024 --repeats 3 --compile --channels-last
echo "done in ${SECONDS}s; results in $OUT"

#!/usr/bin/env bash
# The performance issues' device check: one prepared run for a session that is lent a GPU.
#
#   OUT=some/dir bash benchmarks/gpu_check.sh speed     # one device call (the default part)
#   OUT=some/dir bash benchmarks/gpu_check.sh serve     # a second call
#   OUT=some/dir bash benchmarks/gpu_check.sh all       # both: over one call's 10 minutes
#
# speed: gpu.txt, step_overhead_gpu.txt, model_speed_gpu.txt (training and inference examples/s
# at batch 256 in bf16, CUDA graphs and torch.compile). serve: serve_load_gpu.txt, `ban serve`
# at the paper's size (random weights) on the GPU, one question per forward against batched, at
# concurrency 1, 4 and 16. Default OUT: benchmarks/results. Needs python3 with a CUDA build of
# torch, numpy, h5py, safetensors and PyYAML, and for serve also fastapi, uvicorn, pydantic and
# Pillow (it says so and skips where they are missing); ban is read from this checkout. Each
# command has its own time limit (under the device tool's 10 minutes a call), and whatever a
# killed command printed stays.
set -uo pipefail
out="${OUT:-benchmarks/results}"
part="${1:-speed}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
PY
if [[ "$part" == all || "$part" == speed ]]; then
    timeout 90 python3 benchmarks/step_overhead.py --device cuda 2>&1 | tee "$out/step_overhead_gpu.txt"
    timeout 420 python3 benchmarks/model_speed.py --device cuda --batch 256 --amp bf16 --graph \
        --compile --steps 10 2>&1 | tee "$out/model_speed_gpu.txt"
fi
if [[ "$part" == all || "$part" == serve ]]; then
    if python3 -c "import fastapi, uvicorn, pydantic, PIL" 2>/dev/null; then
        timeout 300 python3 benchmarks/serve_load.py --paper --device cuda --concurrency 1,4,16 \
            --requests 300,1000,2000 --modes one-at-a-time,batched,batched+cache 2>&1 \
            | tee "$out/serve_load_gpu.txt"
    else
        echo "serve: skipped, fastapi/uvicorn/pydantic/Pillow are not installed here" \
            | tee "$out/serve_load_gpu.txt"
    fi
fi

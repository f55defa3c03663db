#!/usr/bin/env bash
# The performance issue's device check: one prepared run for a session that is lent a GPU.
#
#   OUT=some/dir bash benchmarks/gpu_check.sh        # default OUT: benchmarks/results
#
# Writes gpu.txt, step_overhead_gpu.txt and model_speed_gpu.txt. Needs python3 with a CUDA build
# of torch, numpy, h5py, safetensors and PyYAML (the device machines have them); ban is read from
# this checkout. Each command has its own time limit (together under the device tool's 10 minutes
# a call), and whatever a killed command printed stays.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
PY
timeout 90 python3 benchmarks/step_overhead.py --device cuda 2>&1 | tee "$out/step_overhead_gpu.txt"
timeout 480 python3 benchmarks/model_speed.py --device cuda --batch 256 --amp bf16 --graph \
    --compile --steps 10 2>&1 | tee "$out/model_speed_gpu.txt"

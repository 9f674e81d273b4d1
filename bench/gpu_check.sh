#!/usr/bin/env bash
# The one-GPU check: a machine with one CUDA GPU and torch installed, no network, < 5 minutes.
#   bash bench/gpu_check.sh          # on the GPU
#   bash bench/gpu_check.sh --cpu    # tiny sizes on the CPU (what tests/test_step_overhead.py runs)
# 1-3: bench/gpu_check.py (parity with the CPU on the device, 1.1B bf16 step vs HF with MFU, peak
# memory vs the memory model); 4 (GPU only): the per-step sync and op counts of
# tests/test_step_overhead.py, whose training iterations then run on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
python3 bench/gpu_check.py "$@" || status=$?
if [[ " $* " != *" --cpu "* ]]; then
    echo "4. syncs per training iteration on CUDA"
    python3 -m pytest -q -p no:cacheprovider tests/test_step_overhead.py -k training_iteration \
        || status=1
fi
exit $status

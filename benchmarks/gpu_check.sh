#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU:
#   1. pytest -m gpu: every entry point in float16 at the full SD 1.5 / DDPM-256 / ADM-256 topologies,
#      with torch.cuda.set_sync_debug_mode("error") inside the hot loops (tests/test_gpu.py);
#   2. the full-scale benchmark on CUDA in float16 (the paper's step counts), which writes
#      OUT_DIR/cuda-float16.json and .md (GPU model and date included) and the plots.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: benchmarks/runs). The log goes to OUT_DIR/gpu_check.log.
# Then quote the figures in benchmarks/results.md and the README's benchmark table.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/runs}"
mkdir -p "$out"
log="$out/gpu_check.log"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); install a CUDA build of" \
         "torch on a machine with an NVIDIA GPU. Without one, DIFFSEG_GPU_SELFTEST=1 pytest -m gpu" \
         "tests/test_gpu.py checks the GPU tests themselves on the CPU." >&2
    exit 2
fi
{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$log"
status=0
HF_HUB_OFFLINE=1 python -m pytest -m gpu tests/test_gpu.py -q 2>&1 | tee -a "$log" || status=1
HF_HUB_OFFLINE=1 python benchmarks/run_all.py --device cuda --dtype float16 --out-dir "$out" 2>&1 | tee -a "$log" || status=1
echo "gpu_check: done (exit $status); log in $log" | tee -a "$log"
exit $status

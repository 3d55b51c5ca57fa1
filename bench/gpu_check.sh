#!/usr/bin/env bash
# The GPU check (issue 14), for when a CUDA device is at hand; under 8 minutes on an
# H100 / H200. Run from anywhere: bash bench/gpu_check.sh [extra bench/gpu.py args]
#  1. the Triton kernels' tests on CUDA tensors (compiled kernels, not the interpreter),
#  2. lib_gguf / lib_lora tests that run on any device (CPU here: a sanity pass),
#  3. bench/gpu.py --quick, then the layer table in full for Q8_0 and Q4_K at 4096 tokens
#     (set COMFYUI_GGUF_DEQUANT=/path/to/ComfyUI-GGUF/dequant.py for that column).
# Writes bench/gpu_rule.json (the measured fused-or-not rule; LIB_GGUF_FUSED_RULE).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
step() { echo; echo "== $*"; }

step "device"
$PY -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" || exit 2

step "Triton kernels on CUDA (tests/test_triton.py)"
LIB_GGUF_TRITON_DEVICE=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py || status=1

step "lib_gguf / lib_lora tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_dequant.py tests/test_layers.py tests/test_lora.py tests/test_compile.py || status=1

step "bench/gpu.py --quick (writes bench/gpu_rule.json)"
timeout 150 $PY bench/gpu.py --quick --write-rule bench/gpu_rule.json "$@" || status=1

step "bench/gpu.py layers, Q8_0 and Q4_K, 4096 tokens"
timeout 120 $PY bench/gpu.py --formats Q8_0,Q4_K --skip dequant,blocks,rule --repeat 10 "$@" || status=1

echo
[ $status -eq 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: a step FAILED (see above)"
exit $status

#!/usr/bin/env bash
# The CUDA RoIAlign kernel on a GPU, without TensorFlow: what a machine with nvcc, a CUDA driver,
# PyTorch and torchvision (and, optionally, compute-sanitizer) can check in a few minutes.
#
#   bash custom_ops/gpu_check.sh [LOG_DIR]
#
# 1. standalone_test: the CUDA kernels against the CPU kernel's code (float32, float16, bfloat16),
#    on the default problem and on a Mask R-CNN-sized one (2 images of 800 x 800, 256 channels,
#    1000 boxes), with timings;
# 2. compare_torchvision_cuda.py: the same inputs through torchvision's CUDA roi_align (an
#    independent implementation), forward and map gradients, with torchvision's timings;
# 3. compute-sanitizer memcheck and initcheck on a small problem (out-of-bounds and uninitialised
#    reads), when compute-sanitizer is installed.
# Exit status: 0 when every step passed.
set -u
cd "$(dirname "$0")"
log_dir=${1:-/tmp/roi_align_gpu_check}
mkdir -p "$log_dir"
status=0
step() {  # step NAME COMMAND...: run, tee to LOG_DIR/NAME.log, remember a failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$log_dir/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true
# Build here (the toolkit of this machine); a binary built elsewhere is the fallback.
make -B standalone || [ -x roi_align/standalone_test ] || exit 1
small=$(mktemp -d)
large=$(mktemp -d)
step standalone roi_align/standalone_test --dump "$small"
step standalone_large roi_align/standalone_test --boxes 1000 --channels 256 --image 800 --dump "$large"
step torchvision python3 compare_torchvision_cuda.py "$small"
step torchvision_large python3 compare_torchvision_cuda.py "$large"
if command -v compute-sanitizer > /dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 roi_align/standalone_test --boxes 64
  step initcheck compute-sanitizer --tool initcheck --error-exitcode 3 roi_align/standalone_test --boxes 64
else
  echo "compute-sanitizer not found: memcheck/initcheck not run"
fi
rm -rf "$small" "$large"
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status

#!/usr/bin/env bash
# The CUDA checks in one run: the rehearsal of every command of the paper's model (base) and the
# torchrun path on the GPU (benchmarks/rehearse.py), the attention benchmark in bf16
# for each sparse implementation against dense SDPA (FlashAttention), a short training run under
# bf16 autocast on the synthetic data, and the model's cost table with the base preset's step
# time measured on the GPU. Each command runs even if one before it fails; the exit status says
# whether any failed.
#
#     bash benchmarks/cuda.sh 2>&1 | tee runs/cuda.log
set -u
cd "$(dirname "$0")/.."
status=0
run() {
    echo "\$ $*"
    "$@" || { echo "FAILED ($?): $*"; status=1; }
}
run python benchmarks/rehearse.py --device cuda
for impl in sdpa bmm flex; do
    run python benchmarks/attention.py --device cuda --dtype bfloat16 --repeats 20 --impl "$impl"
done
run python train.py --frames 4 --max-steps 20 --no-eval --device cuda --output-dir runs/cuda-check
run python benchmarks/cost.py --timing-preset base --device cuda
exit $status

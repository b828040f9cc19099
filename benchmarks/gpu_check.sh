#!/usr/bin/env bash
# The CUDA checks of issue #4 in one pass, for a machine with a GPU (311 s on one H200, measured 2026-12-04):
#   the gpu-marked tests (training at fp32/bf16/fp16, `train --gpus N` under torchrun with NCCL, the fused
#   mask loss, CUDA RNG capture, solver.cuda_graphs against eager training incl. two DDP ranks), then the
#   train-step benchmark against transformers (fp32 and bf16; ours eager and with CUDA graphs), the
#   inference benchmark against transformers (R50 and Swin-T, fp32 and bf16: forward, post-processing, image ->
#   labels), `maskformer predict` over a folder against a transformers loop, and the fused-vs-plain mask-loss
#   benchmark at COCO-like size. At most 8 log files (what the device tool brings back). Logs go to $OUT (default ./gpu_check).
# Run from the repository root with the project importable (`pip install -e ".[test]"`, or PYTHONPATH=. where
# the dependencies are already installed). Exit status: non-zero if any step failed.
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
py=${PYTHON:-python3}
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$out/gpu.txt" 2>&1
timeout 400 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_checkpoint.py \
    tests/test_distributed.py tests/test_cuda_graphs.py 2>&1 | tee "$out/pytest_gpu.txt" || rc=1
for precision in fp32 bf16; do
    # bf16 also prints where each implementation's step spends its GPU time (torch.profiler)
    timeout 240 "$py" benchmarks/bench_train_step.py --device cuda --steps 10 --cuda-graphs --precision "$precision" \
        $([ "$precision" = bf16 ] && echo --profile) 2>&1 \
        | grep -v "Writing model shards" | tee "$out/bench_train_step_$precision.txt" || rc=1
done
for backbone in r50 swin_tiny; do
    timeout 180 "$py" benchmarks/bench_inference.py --device cuda --rounds 10 --backbone "$backbone" 2>&1 \
        | grep -v "Writing model shards" | tee "$out/bench_inference_$backbone.txt" || rc=1
done
timeout 180 "$py" benchmarks/bench_inference.py --device cuda --mode predict --images 16 --rounds 3 2>&1 \
    | grep -v "Writing model shards" | tee "$out/bench_predict.txt" || rc=1
timeout 120 "$py" benchmarks/bench_mask_loss.py --device cuda --size 1024 --masks 50 2>&1 \
    | tee "$out/bench_mask_loss.txt" || rc=1
exit $rc

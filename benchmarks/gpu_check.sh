#!/usr/bin/env bash
# The one prepared GPU check: on a GPU machine (torch + triton + nvcc already installed there),
# build the extension, run the GPU tests (bf16 included) and the benchmarks, and write
# everything under OUTDIR. Meant to finish well inside 10 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh OUTDIR        (default: $OUT, else ./gpu_out)
#
# Files written (8, the most the device tool brings back): env.txt, tests.log,
# bench_gpu_fp32_compile.md, bench_gpu_fp32.md, bench_gpu_bf16.md, sample_timing.txt, summary.txt,
# logs.tar.gz (build and benchmark logs). Worst case about 9.5 minutes.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_out}}"
mkdir -p "$out"
cd "$root"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" YODA_SPARSE_REQUIRE_EXT=1 YODA_SPARSE_NO_JIT=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
status=0
step() { echo "== $1: $(date +%T)" | tee -a "$out/summary.txt"; }

step env
{ nvidia-smi; "$py" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1

step build   # editable install, no dependency resolution (the machine has no network)
if ! "$py" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$out/summary.txt"; status=1
fi

step tests   # every kernel test, GPU ones included; bf16 runs on the GPU only
timeout 150 "$py" -m pytest -q -x -p no:cacheprovider \
  tests/test_extension_build.py tests/test_cpp_kernels.py tests/test_triton_kernels.py tests/test_ops_reference.py \
  tests/test_diffusion.py > "$out/tests.log" 2>&1 || status=1
tail -n 3 "$out/tests.log" | tee -a "$out/summary.txt"

# Benchmarks in three runs, each side by side within itself; torch.compile costs a compile per
# shape, so it runs on the four larger shapes only.
step bench-fp32-compile
timeout 150 "$py" benchmarks/bench_gpu_ops.py --dtype float32 --batches 4 16 --sizes 256 512 \
  --out "$out/bench_gpu_fp32_compile.md" > "$out/bench_fp32_compile.log" 2>&1 || status=1
step bench-fp32
timeout 75 "$py" benchmarks/bench_gpu_ops.py --dtype float32 --backends eager triton cuda_ext \
  --out "$out/bench_gpu_fp32.md" > "$out/bench_fp32.log" 2>&1 || status=1
step bench-bf16
timeout 45 "$py" benchmarks/bench_gpu_ops.py --dtype bfloat16 --backends eager triton cuda_ext --batches 4 16 \
  --out "$out/bench_gpu_bf16.md" > "$out/bench_bf16.log" 2>&1 || status=1

step sample-timing   # a whole YODA run of the demo checkpoint on the GPU, dense vs YODA
timeout 45 "$py" - > "$out/sample_timing.txt" 2>&1 <<'PY' || status=1
import time, torch
from pathlib import Path
from yoda_sparse.diffusion import load_diffusion
ckpts = sorted(Path("yoda_sparse/checkpoints").glob("*.safetensors"))
for ck in ckpts:
    diff, cfg, _ = load_diffusion(ck, map_location="cuda")
    lr = torch.rand(4, 3, 64, 64, device="cuda")
    attn = torch.rand(4, 1, 256, 256, device="cuda")
    for label, a in (("dense", None), ("yoda", attn)):
        for seed in (0, 1):  # the first run warms up
            torch.cuda.synchronize(); t0 = time.perf_counter()
            diff.sample(lr, a, steps=100, seed=seed, progress=False)
            torch.cuda.synchronize(); dt = time.perf_counter() - t0
        print(f"{ck.name} {label}: {dt:.3f} s for 100 steps, batch 4, 256x256 ({torch.cuda.get_device_name()})")
PY
step done
echo "exit status $status" | tee -a "$out/summary.txt"
# the device tool brings back at most 8 files: pack the raw logs into one
( cd "$out" && tar czf logs.tar.gz build.log bench_*.log 2>/dev/null && rm -f build.log bench_*.log )
exit $status

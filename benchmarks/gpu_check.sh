#!/usr/bin/env bash
# The one prepared GPU check: on a GPU machine (torch + triton + nvcc already installed there),
# build the extension in place, run the GPU tests (bf16, CUDA graphs, torch.compile and the
# CPU/CUDA noise identity included) and the benchmarks, and write everything under OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR        (default: $OUT, else ./gpu_out)
#
# Files written (8, the most the device tool brings back), each as soon as its step ends, so a
# run cut short still returns what it did: summary.txt, env.txt, build.log, tests.log,
# bench_gpu_fp32.md, bench_gpu_bf16.md, bench.log (both benchmarks' raw output, rows printed as
# measured), sample_timing.txt. About 5 minutes on an H200; at most about 10.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_out}}"
mkdir -p "$out"
cd "$root"
py="${PYTHON:-python3}"
# The machine's own torch is used as it is (no network there): build the extension in place and
# put the checkout first on the import path instead of pip-installing it.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# yoda_sparse.kernels is the top-level kernels/ folder, mapped there by setup.py's package_dir;
# without an install a link puts it in place (removed again on exit).
link_made=0
if [ ! -e yoda_sparse/kernels ]; then ln -s ../kernels yoda_sparse/kernels && link_made=1; fi
trap '[ "$link_made" = 1 ] && rm -f yoda_sparse/kernels' EXIT
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" YODA_SPARSE_REQUIRE_EXT=1 YODA_SPARSE_NO_JIT=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
status=0
step() { echo "== $1: $(date +%T)" | tee -a "$out/summary.txt"; }

step env
{ nvidia-smi; "$py" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1

step build
if ! timeout 120 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$out/summary.txt"; status=1
fi

step tests   # the GPU tests (CPU CI runs the rest): CUDA kernels, Triton compiled, graphs, compile
# In three runs, so that one cut short by its limit keeps the others' summaries; the Triton file
# compiles every kernel variant it tests (over 2 minutes on an H200 with a cold cache).
timeout 60 "$py" -m pytest -q -rfE --maxfail=20 -p no:cacheprovider \
  tests/test_extension_build.py tests/test_cuda_graphs.py > "$out/tests.log" 2>&1 || status=1
timeout 45 "$py" -m pytest -q -rfE --maxfail=20 -p no:cacheprovider -m gpu tests/test_cpp_kernels.py >> "$out/tests.log" 2>&1 || status=1
timeout 170 "$py" -m pytest -q -rfE --maxfail=20 -p no:cacheprovider tests/test_triton_kernels.py >> "$out/tests.log" 2>&1 || status=1
tail -n 3 "$out/tests.log" | tee -a "$out/summary.txt"

# Benchmarks side by side within each run. torch.compile compiles twice per op (the first
# shape, then once with dynamic shapes), so it runs at every shape in fp32.
step bench-fp32
timeout 120 "$py" benchmarks/bench_gpu_ops.py --dtype float32 \
  --out "$out/bench_gpu_fp32.md" >> "$out/bench.log" 2>&1 || status=1
step bench-bf16
timeout 45 "$py" benchmarks/bench_gpu_ops.py --dtype bfloat16 --backends eager triton cuda_ext \
  --out "$out/bench_gpu_bf16.md" >> "$out/bench.log" 2>&1 || status=1

step sample-timing   # a whole YODA run of the demo checkpoints on the GPU, dense vs YODA
timeout 30 "$py" - > "$out/sample_timing.txt" 2>&1 <<'PY' || status=1
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
exit $status

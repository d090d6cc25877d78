#!/usr/bin/env bash
# The one prepared GPU check: on a GPU machine (torch + triton + nvcc already installed there),
# build the extension in place, run the GPU tests (bf16, CUDA graphs, torch.compile and the
# CPU/CUDA noise identity included) and the benchmarks, and write everything under OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR        (default: $OUT, else ./gpu_out)
#
# Files written, each as soon as its step ends, so a run cut short still returns what it did:
# summary.txt, env.txt, build.log, tests.log, bench_gpu_fp32.md, bench_gpu_bf16.md, bench.log
# (the op benchmarks' raw output), diagnose.txt; for the sparse work: sparse_tests.log,
# bench_sparse_conv_*.md (tile-sparse convolution vs cuDNN), bench_sparse_sampling/ (dense vs
# sparse SR3 sampling, bf16, batch 4, 256x256) and sparse.log.
# The default STEPS are the sparse ones (the op steps ran on earlier GPU sessions; name them to
# re-run): about 8 minutes on an H100/H200 with their limits adding up to about 10.
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

# STEPS picks a subset for a re-run (default: all, in this order).
steps=" ${STEPS:-env build tests-sparse bench-sparse-conv bench-sparse-sampling} "
want() { [[ "$steps" == *" $1 "* ]]; }

if want env; then
step env
{ nvidia-smi; "$py" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
fi

if want build; then
step build
if ! timeout 120 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$out/summary.txt"; status=1
fi
fi

if want diagnose; then
step diagnose   # the last H200 run saw a segfault where the extension throws on bad input
{
  command -v g++ && g++ --version | head -n 1
  "$py" -c "import torch; print(torch.__config__.show())" | grep -iE "gcc|cxx|abi" | head -n 5
  echo "CXX=${CXX:-unset}"
  "$py" -c "from yoda_sparse.ops import extension; print('link flags:', extension.link_flags())"
  ldd yoda_sparse/_C*.so
  echo "__cxa_throw defined in _C: $(nm -D --defined-only yoda_sparse/_C*.so | grep -c __cxa_throw)"
  for dev in cpu cuda; do
    timeout 30 "$py" -X faulthandler - "$dev" <<'PY'
import sys, torch
from yoda_sparse.ops import extension
print("extension:", extension.load() or "loaded")
dev = sys.argv[1]
z = torch.randn(1, 3, 4, 4, device=dev)
try:
    torch.ops.yoda_sparse.ext_masked_l1_fwd(z, z, torch.ones(1, 3, 4, 4, dtype=torch.bool, device=dev), 0)
    print(dev, "no error raised")
except RuntimeError as e:
    print(dev, "raised RuntimeError:", str(e).splitlines()[0])
PY
    echo "$dev: exit $?"
  done
} > "$out/diagnose.txt" 2>&1
tail -n 2 "$out/diagnose.txt" | tee -a "$out/summary.txt"
fi

# The GPU tests (CPU CI runs the rest), in separate runs so that one cut short by its limit keeps
# the others' summaries: CUDA extension and graphs; torch.compile (cold inductor compiles); the
# Triton file (compiles every kernel variant it tests; pytest-xdist, where installed, spreads that
# over the CPU cores).
tests() {  # name, limit (s), pytest arguments...
  local name=$1 limit=$2; shift 2
  step "$name"
  timeout "$limit" "$py" -m pytest -q -rfE --maxfail=20 -p no:cacheprovider "$@" >> "$out/tests.log" 2>&1 || status=1
  tail -n 1 "$out/tests.log" | tee -a "$out/summary.txt"
}
if want tests-ext; then
  tests tests-ext 60 tests/test_extension_build.py tests/test_cuda_graphs.py -k "not torch_compile"
  tests tests-ext-kernels 60 -m gpu tests/test_cpp_kernels.py
fi
want tests-compile && tests tests-compile 150 tests/test_cuda_graphs.py -k torch_compile
xdist=""; "$py" -c "import xdist" 2>/dev/null && xdist="-n 8"
want tests-triton && tests tests-triton 150 $xdist tests/test_triton_kernels.py

# Benchmarks side by side within each run. torch.compile compiles twice per op (the first
# shape, then once with dynamic shapes), so it runs at every shape in fp32.
if want bench-fp32; then
step bench-fp32
timeout 120 "$py" benchmarks/bench_gpu_ops.py --dtype float32 \
  --out "$out/bench_gpu_fp32.md" >> "$out/bench.log" 2>&1 || status=1
fi
if want bench-bf16; then
step bench-bf16
timeout 45 "$py" benchmarks/bench_gpu_ops.py --dtype bfloat16 --backends eager triton cuda_ext \
  --out "$out/bench_gpu_bf16.md" >> "$out/bench.log" 2>&1 || status=1
fi

# The sparse convolution and engine: GPU tests (Triton and CUDA-extension backends against the
# float64 reference in fp32/fp16/bf16, a captured CUDA graph, the engine on CUDA tensors), then
# the benchmarks of issue 11 (bf16 and fp32, batch 1 and 4, cuDNN dense alongside) and 12 (SR3
# 16->128 at 256x256, batch 4, bf16: gaussian, edge, all-ones).
if want tests-sparse; then
  step tests-sparse
  timeout 240 "$py" -m pytest -q -rfE --maxfail=20 -p no:cacheprovider tests/test_sparse_gpu.py \
    >> "$out/sparse_tests.log" 2>&1 || status=1
  tail -n 1 "$out/sparse_tests.log" | tee -a "$out/summary.txt"
fi
if want bench-sparse-conv; then
  step bench-sparse-conv
  for cfg in "bfloat16 4" "bfloat16 1" "float32 4"; do
    set -- $cfg
    timeout 90 "$py" benchmarks/bench_sparse_conv.py --device cuda --dtype "$1" --batch "$2" --tiles 8 16 \
      --shapes 128x128 128x256 256x64 256x128 512x32 --masks blob random --rounds 10 --no-reference \
      --out "$out" >> "$out/sparse.log" 2>&1 || status=1
  done
  ls "$out"/sparse_conv_cuda_* 2>/dev/null | tee -a "$out/summary.txt"
fi
if want bench-sparse-sampling; then
  step bench-sparse-sampling
  timeout 240 "$py" -m yoda_sparse.cli bench --device cuda --dtype bfloat16 --batch 4 --size 256 --steps 20 \
    --sources gaussian edge:astronaut edge:coffee ones --no-progress --out "$out/bench_sparse_sampling" \
    >> "$out/sparse.log" 2>&1 || status=1
  tail -n 6 "$out/sparse.log" | tee -a "$out/summary.txt"
fi

step done
echo "exit status $status" | tee -a "$out/summary.txt"
exit $status

#!/usr/bin/env bash
# Run the test suite against another torch release than the pinned one, e.g. the one a GPU
# machine or a user has. pyproject.toml admits torch>=2.6; this is how a release is checked.
#
#   bash scripts/test_torch.sh 2.11.0 [pytest args]
#
# It sets up .venv-torch<version>/ (torch from PyPI: a few GB the first time), copies the working
# tree (tracked and untracked, not ignored files) to .venv-torch<version>/src, installs that
# copy without the prebuilt extension and runs pytest there. The C++ ops are then built just in
# time for that torch (CPU kernels; the cache lies in the venv). A copy, not the checkout:
# the checkout's yoda_sparse/_C*.so is built for the pinned torch and must not be picked up.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:?usage: bash scripts/test_torch.sh TORCH_VERSION [pytest args]}"
shift
venv="$root/.venv-torch$version"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[test_torch] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.installed"
if [ ! -f "$stamp" ]; then
  echo "[test_torch] installing torch==$version and the test requirements"
  # torchvision (timm needs it) and triton come as torch's matching releases. numpy < 2.3:
  # Triton's interpreter before triton 3.8 calls int() on one-element arrays, which newer
  # numpy rejects ("only 0-dimensional arrays can be converted to Python scalars").
  # setuptools < 82: older torch releases require it.
  others=$(grep -Ev '^(#|$|torch|torchvision|triton|numpy)' "$root/requirements-pinned.txt")
  "$venv/bin/python" -m pip install -q "torch==$version" torchvision "numpy<2.3" "setuptools>=69,<82" wheel $others
  touch "$stamp"
fi

src="$venv/src"
rm -rf "$src"
mkdir -p "$src"
(cd "$root" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$src"
YODA_SPARSE_NO_EXT=1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$src[metrics,dev]"

cd "$src"
"$venv/bin/python" -c "import torch, triton; print(f'[test_torch] torch {torch.__version__}, triton {triton.__version__}')"
export TORCH_EXTENSIONS_DIR="$venv/torch_extensions"
unset YODA_SPARSE_REQUIRE_EXT  # no prebuilt extension here: tests that check one skip
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"

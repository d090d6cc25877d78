#!/usr/bin/env bash
# Set up (or reuse) .venv and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
# the install must build the C++/CUDA extension (a compile error fails), and the tests check it
export YODA_SPARSE_REQUIRE_EXT="${YODA_SPARSE_REQUIRE_EXT:-1}"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"

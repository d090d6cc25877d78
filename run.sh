#!/usr/bin/env bash
# Set up (or reuse) .venv and run the main job: the YODA demo (see README). Extra arguments
# go to `yoda-sparse demo`.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/yoda-sparse" demo "$@"

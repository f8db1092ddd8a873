#!/usr/bin/env bash
# The test suite on CPU: system packages (Slurm for the launch test), the venv, then pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup_env.sh
if [ -x scripts/install_system_deps.sh ] || [ -f scripts/install_system_deps.sh ]; then
  bash scripts/install_system_deps.sh
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

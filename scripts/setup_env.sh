#!/usr/bin/env bash
# Builds .venv (Python 3.12, pinned packages, this project editable) when missing or stale.
# Re-running is cheap: it reinstalls only when requirements.lock or pyproject.toml changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.ratplus-installed"
want=$(cat "$root/requirements.lock" "$root/requirements-nodeps.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x "$venv/bin/python" ]; then
  py=$("$root/scripts/find_python312.sh")
  echo "creating $venv with $py"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
"$venv/bin/python" -m pip install -q --no-cache-dir -r "$root/requirements.lock"
"$venv/bin/python" -m pip install -q --no-cache-dir --no-deps -r "$root/requirements-nodeps.lock"
"$venv/bin/python" -m pip install -q --no-cache-dir --no-deps -e "$root"
echo "$want" > "$stamp"
echo "environment ready: $venv"

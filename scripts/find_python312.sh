#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter: PATH first, then pyenv's versions folder.
set -u
for cand in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root 2>/dev/null)/versions"/3.12*/bin/python3.12 \
            "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
  [ -n "$cand" ] || continue
  if path=$(command -v "$cand" 2>/dev/null) && "$path" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$path"; exit 0
  fi
done
echo "error: no Python 3.12 interpreter found (looked on PATH and in pyenv's versions); install Python 3.12" >&2
exit 1

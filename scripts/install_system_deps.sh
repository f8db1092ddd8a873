#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv: Slurm (slurm-wlm: slurmctld, slurmd,
# client commands) and munge, for the one-node Slurm cluster of tests/test_slurm.py and the
# quickstart (scripts/local_slurm.sh). Debian/Ubuntu, apt-get, run as root (as in CI).
# Idempotent and quick when everything is installed already (no apt-get update then).
set -euo pipefail

need=()
for cmd in slurmctld slurmd sbatch munged; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps.sh: missing ${need[*]} and no apt-get here: install Slurm (slurm-wlm) and munge yourself" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install_system_deps.sh: missing ${need[*]}; run as root (apt-get install slurm-wlm munge)" >&2
    exit 1
  fi
else
  SUDO=
fi

echo "install_system_deps.sh: installing slurm-wlm and munge (missing: ${need[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts would start munge/slurmctld/slurmd as system services (and fail
# without a slurm.conf in containers): forbid service starts during the install, as Debian's
# policy-rc.d interface allows; scripts/local_slurm.sh starts the daemons itself.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from install_system_deps.sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
# --no-install-recommends: the daemons and client commands only (no docs, no mail server).
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  slurm-wlm munge >/dev/null
echo "install_system_deps.sh: $(dpkg-query -W -f='slurm-wlm ${Version}, ' slurm-wlm)$(dpkg-query -W -f='munge ${Version}' munge)" >&2

#!/usr/bin/env bash
# Install what the local one-machine Slurm (and the MPI path) needs: Debian's slurm-wlm 22.05, munge,
# Open MPI and shellcheck. Idempotent: does nothing when every command is already there.
# Needs root (or sudo) and the Debian package archive.
set -euo pipefail

need=()
for cmd in slurmctld slurmd sinfo munged mpirun shellcheck; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "slurm/local/install.sh: everything is installed already"
    exit 0
fi
echo "slurm/local/install.sh: missing ${need[*]}; installing"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install.sh: run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# apt-get update only when the package lists are missing or the first try fails (offline mirrors).
if ! $SUDO apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge openmpi-bin shellcheck; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge openmpi-bin shellcheck
fi
# The Debian packages try to start services; a container has no init, and start.sh runs its own daemons.
echo "slurm/local/install.sh: done"

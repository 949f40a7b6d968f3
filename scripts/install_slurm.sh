#!/usr/bin/env bash
# Install what the scale-out tests need from Debian: Slurm (slurmctld, slurmd,
# client commands), munge, and iproute2 (network namespaces).
#
# Idempotent: does nothing when the commands are already there. Needs root and
# apt-get; exits 0 without installing anything otherwise (the tests then skip
# and say why).
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v ip >/dev/null 2>&1 || need+=(iproute2)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: missing ${need[*]}; installing them needs root and apt-get" >&2
  exit 0
fi

echo "install_slurm.sh: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# An install from stale package lists fails with 404s: update only when needed.
if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

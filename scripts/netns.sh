#!/usr/bin/env bash
# Two simulated nodes on one Linux host: two network namespaces joined by a
# veth pair, each with its own address and nothing else (no route out).
#
#   scripts/netns.sh up NAME [SUBNET]   create NAME-0 and NAME-1 (SUBNET default 10.213.7)
#   scripts/netns.sh down NAME          remove them (and with them the veth pair)
#
# Node 0 is NAME-0 with SUBNET.1 on interface NAME-v0, node 1 is NAME-1 with
# SUBNET.2 on NAME-v1. Run a command "on" a node with
#   ip netns exec NAME-0 COMMAND
# The namespaces share the file system, so both nodes see the same checkout,
# virtual environment and output folder, as nodes with shared storage do.
# NAME must be at most 12 characters (interface names are limited to 15).
# Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2.
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }

up() {
  local name=$1 subnet=${2:-10.213.7} i
  [ ${#name} -le 12 ] || { echo "netns.sh: NAME longer than 12 characters: $name" >&2; exit 2; }
  ip netns add "$name-0"
  ip netns add "$name-1"
  ip link add "$name-v0" type veth peer name "$name-v1"
  for i in 0 1; do
    ip link set "$name-v$i" netns "$name-$i"
    ip -n "$name-$i" addr add "$subnet.$((i + 1))/24" dev "$name-v$i"
    ip -n "$name-$i" link set "$name-v$i" up
    ip -n "$name-$i" link set lo up
  done
}

down() {
  local name=$1 i
  for i in 0 1; do
    if ip netns list | grep -qw "$name-$i"; then
      # Processes still inside would keep the namespace alive: end them first.
      ip netns pids "$name-$i" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      ip netns del "$name-$i"
    fi
  done
  # Deleting a namespace deletes its end of the pair, and with it the pair.
  ip link del "$name-v0" 2>/dev/null || true
}

case "${1:-}" in
  up) [ $# -ge 2 ] || usage; up "$2" "${3:-}" ;;
  down) [ $# -eq 2 ] || usage; down "$2" ;;
  *) usage ;;
esac

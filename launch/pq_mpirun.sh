#!/usr/bin/env bash
# mpirun wrapper for pipequant (and anything else): starts N ranks with the flags a workstation, a container
# or a cluster allocation needs.
#
#   launch/pq_mpirun.sh -np N PROGRAM [ARGS...]      (also: -n N, or a bare N as first argument)
#
# mpirun runs with --oversubscribe --bind-to none (and --allow-run-as-root when run as root). The ranks are not
# pinned because pipequant itself picks what each rank uses: its CPU threads (the cores of the node divided
# among the ranks on it; --threads N overrides) and its GPU (node-local rank modulo the visible devices). So
# this script sets neither OMP_NUM_THREADS nor CUDA_VISIBLE_DEVICES; to keep ranks off some GPUs, restrict
# CUDA_VISIBLE_DEVICES before calling it.
# Environment: PQ_MPIRUN (the mpirun to use, default mpirun), PQ_MPIRUN_ARGS (extra mpirun flags, split on
# spaces); PIPEQUANT_TESTDATA is passed on to ranks on other nodes.
set -euo pipefail

usage() {
  echo "usage: $(basename "$0") -np N PROGRAM [ARGS...]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
np=""
case "$1" in
  -np | -n | --np)
    [ $# -ge 2 ] || usage
    np="$2"; shift 2 ;;
  -np=* | --np=* | -n=*)
    np="${1#*=}"; shift ;;
  *)
    if [[ "$1" =~ ^[0-9]+$ ]]; then np="$1"; shift; fi ;;
esac
[[ "$np" =~ ^[1-9][0-9]*$ ]] || { echo "$(basename "$0"): give the number of ranks first: -np N" >&2; usage; }
[ $# -ge 1 ] || usage

MPIRUN="${PQ_MPIRUN:-mpirun}"
args=(--oversubscribe --bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  args=(--allow-run-as-root "${args[@]}")
  # Open MPI also reads these; they keep child launches (singletons, tests) working as root
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# ranks on other nodes only see variables passed with -x
if [ -n "${PIPEQUANT_TESTDATA:-}" ]; then args+=(-x PIPEQUANT_TESTDATA); fi
extra=()
if [ -n "${PQ_MPIRUN_ARGS:-}" ]; then read -r -a extra <<<"$PQ_MPIRUN_ARGS"; fi

exec "$MPIRUN" "${args[@]}" "${extra[@]}" -np "$np" "$@"
